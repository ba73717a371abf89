# tfo-agent: the two commands of the README are `make run` and `make test`.
# Both set up what they need on a fresh Debian 12 host (Debian packages, a virtualenv, BPF objects).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
APT_PACKAGES := $(shell grep -v '^\#' apt-packages.txt)

.PHONY: setup apt venv bpf protos run test pytest pytest-fallbacks lint bench package molecule clean

setup: apt venv bpf protos

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[hubble,otlp]' -r requirements-dev.txt
	touch $@

venv: $(STAMP)

bpf: apt
	$(MAKE) -s -C bpf

protos: venv
	$(PY) agent/hubble/build_protos.py

TFO_HUBBLE ?= 127.0.0.1:4245
export TFO_HUBBLE

run: setup
	$(VENV)/bin/tfo-agent hubble replay --demo --listen $(TFO_HUBBLE) & demo=$$!; \
	trap 'kill $$demo 2>/dev/null' EXIT; \
	$(VENV)/bin/tfo-agent run -c config/dev.yaml

# The whole suite: lint, pytest (real BPF, packages, gRPC…), the eBPF accuracy tests again on the
# fallbacks older kernels use, then the role on real VMs.
test: pytest pytest-fallbacks molecule

pytest: setup
	$(VENV)/bin/ruff check agent tests bench packaging molecule
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The accuracy tests forced onto the compat build (kernels before 5.11) and onto the network
# collector's syscall mode (kernels before 6.3), so each fallback is proven on this kernel too.
BPF_TESTS := tests/test_syscalls.py tests/test_file_io.py tests/test_network.py tests/test_tcp_events.py \
	tests/test_scheduler.py tests/test_memory.py tests/test_comm_cap.py tests/test_selftest.py tests/test_pods.py \
	tests/test_dns.py tests/test_http.py
pytest-fallbacks: setup
	TFO_AGENT_FORCE_VARIANT=compat $(PY) -m pytest -q $(BPF_TESTS)
	TFO_AGENT_FORCE_ATTACH=network=raw_tp/syscalls $(PY) -m pytest -q tests/test_network.py tests/test_selftest.py

lint: venv
	$(VENV)/bin/ruff check agent tests bench packaging molecule
	$(VENV)/bin/ruff format --check agent tests bench packaging molecule

# Packages: dist/tfo-agent_<version>_amd64.deb and dist/tfo-agent-<version>.x86_64.rpm (packaging/README.md).
PKG_VENV := build/pkg-venv
$(PKG_VENV)/.stamp: packaging/build-requirements.txt
	$(PYTHON) -m venv $(PKG_VENV)
	$(PKG_VENV)/bin/pip install -q -r packaging/build-requirements.txt
	touch $@

package: bpf $(PKG_VENV)/.stamp
	$(PKG_VENV)/bin/python packaging/build.py

# The role and playbooks on real qemu VMs (Debian 12, its 6.1 kernel), with the package built here.
# On failure the failed verify tests are printed again last (molecule's destroy output follows them).
molecule: setup package
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/molecule test || \
		{ cat build/molecule-verify-failures.txt 2>/dev/null; exit 1; }

clean:
	$(MAKE) -C bpf clean
	rm -rf $(VENV) build dist *.egg-info
