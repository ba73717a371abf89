"""Command line: ``tfo-agent run | check | config validate | cleanup | version | hubble replay``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Optional

from agent import __version__, config, host

if TYPE_CHECKING:
    from agent.manager import IntegrationManager

DEFAULT_CONFIG = "/etc/tfo-agent/config.yaml"
log = logging.getLogger("tfo-agent")


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line (no usage dump) on bad flags."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"tfo-agent: {message} (see 'tfo-agent --help')\n")


def _load(path: Optional[str]) -> config.Config:
    if path:
        return config.load(path)
    if os.path.exists(DEFAULT_CONFIG):
        return config.load(DEFAULT_CONFIG)
    return config.parse("", "<built-in defaults>")


def setup_logging(cfg: config.LoggingConfig) -> None:
    """Log to stderr at ``logging.level``, as text or one JSON object per line (``logging.format``)."""
    level = getattr(logging, cfg.level.upper())
    handler = logging.StreamHandler(sys.stderr)
    if cfg.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # library warnings go through the same handler and format
    # The OTLP SDK logs every failed attempt; the agent reports the first failure and the recovery.
    logging.getLogger("opentelemetry").setLevel(level if level <= logging.DEBUG else logging.CRITICAL)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _reload(path: Optional[str], manager: IntegrationManager) -> None:
    """SIGHUP: re-read and validate; apply a valid config, keep the running one on any error."""
    try:
        new = _load(path)
    except config.ConfigError as exc:
        manager.reload_failed()
        log.error("reload rejected, keeping the running config: %s", exc)
        return
    if new.logging != manager.cfg.logging:
        setup_logging(new.logging)
    try:
        changes = manager.reload(new)
    except Exception:
        manager.reload_failed()
        log.exception("reload of %s failed part way; the rest keeps running", new.source)
        return
    log.info("reloaded %s: %s", new.source, ", ".join(changes) or "nothing changed")


def cmd_run(args: argparse.Namespace) -> int:
    from agent.manager import IntegrationManager
    from agent.registry import Registry

    cfg = _load(args.config)
    setup_logging(cfg.logging)
    # Blocked before any thread exists, so only the sigwait below receives them (no handler races).
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    host.set_process_name("tfo-agent")
    log.info("tfo-agent %s starting with %s", __version__, cfg.source)
    manager = IntegrationManager(cfg, Registry())
    try:
        manager.start()
    except OSError as exc:
        manager.stop()
        print(f"tfo-agent: cannot start: {exc}", file=sys.stderr)
        return 1
    while (sig := signal.sigwait(signals)) == signal.SIGHUP:
        log.info("SIGHUP: reloading the configuration")
        _reload(args.config, manager)
    log.info("%s: stopping", signal.Signals(sig).name)
    manager.stop()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from agent.collectors import CollectorError
    from agent.collectors.catalog import COLLECTORS
    from agent.collectors.selftest import SelfTestFailed, self_test
    from agent.manager import unavailable_features, wants_pods

    cfg = _load(args.config)
    ebpf = cfg.ebpf
    checks = host.requirements(ebpf.btf_custom_path, ebpf.pin_path) if ebpf.enabled else []
    for cls in COLLECTORS:
        if not (ebpf.enabled and getattr(ebpf, cls.switch)):
            continue
        try:
            mode = self_test(cls, ebpf)
            checks.append(host.Check(f"collector {cls.name}", "ok", f"attaches via {mode} and counts a test workload"))
        except SelfTestFailed as exc:
            checks.append(
                host.Check(f"collector {cls.name}", "fail", str(exc), "Mode counts wrong on this kernel: report a bug")
            )
        except CollectorError as exc:
            checks.append(
                host.Check(
                    f"collector {cls.name}", "fail", str(exc), "Program load failed: check kernel version compatibility"
                )
            )
    if wants_pods(cfg):
        from agent.cri.status import runtime_check

        checks.append(runtime_check(ebpf.container_runtime_endpoint))
    cilium = ebpf.cilium
    if cilium.enabled and "cilium" not in unavailable_features(cfg):
        from agent.hubble.status import hubble_checks

        checks += hubble_checks(cilium)
    for feature in unavailable_features(cfg):
        checks.append(
            host.Check(
                feature,
                "warn",
                f"enabled but not available in tfo-agent {__version__}",
                f"set {feature} to its default/off or upgrade tfo-agent",
            )
        )
    ok = all(c.ok for c in checks)
    if args.json:
        print(
            json.dumps({"ok": ok, "config": cfg.source, "checks": [vars(c) | {"ok": c.ok} for c in checks]}, indent=2)
        )
    else:
        for c in checks:
            print(f"[{c.level.upper():4}] {c.name}: {c.found}" + (f" -> {c.remedy}" if c.remedy else ""))
        print("host can run this configuration" if ok else "host cannot run this configuration")
    return 0 if ok else 1


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = config.load(args.file)
    print(f"{cfg.source}: valid")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from agent.collectors.catalog import COLLECTORS
    from agent.filters import Filters

    cfg = _load(args.config)
    for cls in COLLECTORS:
        cls(cfg.ebpf, Filters.from_config(cfg.ebpf)).remove_pins()
    with contextlib.suppress(OSError):
        os.rmdir(cfg.ebpf.pin_path)
    print(f"removed pinned maps under {cfg.ebpf.pin_path}")
    return 0


def cmd_version(_: argparse.Namespace) -> int:
    print(f"tfo-agent {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tfo-agent", description="eBPF and Cilium Hubble observability agent.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run the agent")
    run.add_argument("-c", "--config", help=f"config file (default {DEFAULT_CONFIG} if present, else built-in)")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="can this host run the configuration? (exit 0 yes, 1 no)")
    check.add_argument("-c", "--config")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=cmd_check)
    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    validate = cfg_sub.add_parser("validate", help="validate a config file (exit 2 when invalid)")
    validate.add_argument("file")
    validate.set_defaults(func=cmd_validate)
    cleanup = sub.add_parser("cleanup", help="remove the pinned maps (counters restart from zero)")
    cleanup.add_argument("-c", "--config")
    cleanup.set_defaults(func=cmd_cleanup)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    hubble = sub.add_parser("hubble", help="Hubble tools", add_help=False)
    hubble.add_argument("hubble_args", nargs=argparse.REMAINDER)
    hubble.set_defaults(func=None)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["hubble", "replay"]:
        from agent.hubble.replay import main as replay_main

        return replay_main(argv[2:])
    args = build_parser().parse_args(argv)
    if args.func is None:
        print("tfo-agent: usage: tfo-agent hubble replay [options]", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except config.ConfigError as exc:
        print(f"tfo-agent: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
