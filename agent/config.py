"""Agent configuration: the seed's schema, strict and friendly.

The schema *is* the dataclasses below: field names are the config keys, type hints say what a
value must be, ``field(metadata=...)`` adds ranges and checks. ``load(path)`` parses YAML, expands
``${VAR}`` / ``${VAR:-default}`` in string values, and validates everything before anything is
loaded. Every problem is one ``ConfigError`` line: file, line, key path, expected, found.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml

DURATION = "duration"
ADDRESS = "address"
Duration = typing.Annotated[float, DURATION]  # seconds; written as 15s, 500ms, 2m, 1h
Address = typing.Annotated[str, ADDRESS]  # host:port

_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """A configuration problem, already formatted as one line for the operator."""


def _power_of_two_pages(value: int) -> Optional[str]:
    page = os.sysconf("SC_PAGE_SIZE")
    if value < page or value & (value - 1):
        return f"a power of two and at least the page size ({page})"
    return None


def _positive(value: float) -> Optional[str]:
    return None if value > 0 else "a value greater than 0"


EBPF_LABELS = ("comm", "container", "pod", "namespace")


def _labels(value: tuple[str, ...]) -> Optional[str]:
    bad = [v for v in value if v not in EBPF_LABELS]
    if bad:
        return f"labels drawn from {', '.join(EBPF_LABELS)} (not {bad[0]!r})"
    if not value or len(set(value)) != len(value):
        return "a non-empty list of distinct labels"
    return None


def _unix_socket(value: str) -> Optional[str]:
    path = value[len("unix://") :] if value.startswith("unix://") else value
    return None if not value or path.startswith("/") else '"" (auto-detect) or an absolute socket path or unix:///path'


@dataclass(frozen=True)
class CiliumConfig:
    """``integrations.ebpf.cilium``: the Hubble Relay connection and flow processing."""

    enabled: bool = False
    hubble_address: str = "hubble-relay.kube-system.svc:4245"
    hubble_tls_enabled: bool = True
    hubble_tls_cert: str = "/etc/hubble/tls.crt"
    hubble_tls_key: str = "/etc/hubble/tls.key"
    hubble_tls_ca: str = "/etc/hubble/ca.crt"
    collect_flows: bool = True
    collect_l7_flows: bool = True
    collect_drops: bool = True
    collect_policies: bool = True
    collect_services: bool = True
    kubernetes_enabled: bool = True
    watch_namespaces: tuple[str, ...] = ()
    exclude_namespaces: tuple[str, ...] = ("kube-system", "cilium")
    flow_buffer_size: int = field(default=4096, metadata={"min": 1})
    flow_sample_rate: int = field(default=1, metadata={"min": 1})
    max_flows_per_second: int = field(default=10000, metadata={"min": 1})
    aggregation_window: Duration = field(default=10.0, metadata={"check": _positive})
    # TLS name checked on the relay's certificate (Cilium issues *.hubble-relay.cilium.io); "" = the host.
    hubble_tls_server_name: str = "relay.hubble-relay.cilium.io"
    # node: only this node's flows (relay filter on node_name); cluster: all flows, series get a node label.
    flow_scope: Literal["node", "cluster"] = "node"
    node_name: str = ""  # "" = $NODE_NAME, else the host name
    max_series_per_metric: int = field(default=10000, metadata={"min": 1})


@dataclass(frozen=True)
class EbpfConfig:
    """``integrations.ebpf``: kernel collectors, filters and sampling."""

    enabled: bool = True
    programs_path: str = "/var/lib/tfo-agent/ebpf"
    pin_path: str = "/sys/fs/bpf/tfo-agent"
    scrape_interval: Duration = field(default=15.0, metadata={"check": _positive})
    collect_syscalls: bool = True
    collect_network: bool = True
    collect_file_io: bool = True
    collect_scheduler: bool = False
    collect_memory: bool = False
    collect_tcp_events: bool = True
    collect_dns: bool = False
    collect_http: bool = False
    process_filter: tuple[str, ...] = ()
    container_filter: tuple[str, ...] = ()
    namespace_filter: tuple[str, ...] = ()
    exclude_processes: tuple[str, ...] = ("tfo-agent", "systemd")
    sample_rate: int = field(default=100, metadata={"min": 1, "max": 100})
    # Distinct comm label values per per-process family, comm="other" included; the rest fold into it.
    max_comm_series: int = field(default=100, metadata={"min": 1})
    # Labels of per-process families (and, beyond comm, of the syscall families): comm, container, pod, namespace.
    labels: tuple[str, ...] = field(default=("comm",), metadata={"check": _labels})
    # The container runtime's CRI socket for pod metadata; "" = the containerd or CRI-O default socket.
    container_runtime_endpoint: str = field(default="", metadata={"check": _unix_socket})
    ring_buffer_size: int = field(default=65536, metadata={"check": _power_of_two_pages})
    perf_buffer_size: int = field(default=8192, metadata={"min": 1})
    max_stack_depth: int = field(default=20, metadata={"min": 1, "max": 127})
    btf_path: str = " "
    cilium: CiliumConfig = field(default_factory=CiliumConfig)

    @property
    def container_labels(self) -> bool:
        """True when per-process families carry container, pod or namespace labels."""
        return any(n != "comm" for n in self.labels)

    @property
    def btf_custom_path(self) -> Optional[str]:
        """The custom BTF file, or None when the seed's blank means auto-detect."""
        return self.btf_path.strip() or None


@dataclass(frozen=True)
class IntegrationsConfig:
    """``integrations``."""

    ebpf: EbpfConfig = field(default_factory=EbpfConfig)


@dataclass(frozen=True)
class ListenerTlsConfig:
    """``exporters.prometheus.tls``: serve HTTPS when both files are set."""

    cert_file: str = ""
    key_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file or self.key_file)


@dataclass(frozen=True)
class BasicAuthConfig:
    """``exporters.prometheus.basic_auth``: require these credentials when a username is set."""

    username: str = ""
    password: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.username)


@dataclass(frozen=True)
class PrometheusConfig:
    """``exporters.prometheus``: the scrape endpoint (9435 by default), with /healthz and /readyz."""

    enabled: bool = True
    listen_address: Address = "0.0.0.0:9435"
    tls: ListenerTlsConfig = field(default_factory=ListenerTlsConfig)
    basic_auth: BasicAuthConfig = field(default_factory=BasicAuthConfig)


@dataclass(frozen=True)
class OtlpTlsConfig:
    """``exporters.otlp.tls``."""

    enabled: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    insecure_skip_verify: bool = False


@dataclass(frozen=True)
class OtlpConfig:
    """``exporters.otlp``: push to an OpenTelemetry endpoint."""

    enabled: bool = False
    endpoint: str = "localhost:4317"
    protocol: Literal["grpc", "http/protobuf"] = "grpc"
    interval: Duration = field(default=15.0, metadata={"check": _positive})
    timeout: Duration = field(default=10.0, metadata={"check": _positive})
    headers: dict[str, str] = field(default_factory=dict)
    compression: Literal["none", "gzip"] = "none"
    resource_attributes: dict[str, str] = field(default_factory=dict)
    tls: OtlpTlsConfig = field(default_factory=OtlpTlsConfig)
    # After a failed export the next one waits interval x 2^(failures-1), at most this long.
    max_backoff: Duration = field(default=60.0, metadata={"check": _positive})


@dataclass(frozen=True)
class ExportersConfig:
    """``exporters``."""

    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    otlp: OtlpConfig = field(default_factory=OtlpConfig)


@dataclass(frozen=True)
class LoggingConfig:
    """``logging``."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class Config:
    """The whole agent configuration."""

    integrations: IntegrationsConfig = field(default_factory=IntegrationsConfig)
    exporters: ExportersConfig = field(default_factory=ExportersConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = field(default="<defaults>", compare=False, metadata={"internal": True})

    @property
    def ebpf(self) -> EbpfConfig:
        return self.integrations.ebpf


class _Ctx:
    """Where we are while converting: the file and the key path, for error lines."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[str, int] = {}

    def error(self, node: yaml.Node, path: str, expected: str, found: str) -> ConfigError:
        line = node.start_mark.line + 1
        return ConfigError(f"{self.source}:{line}: {path}: expected {expected}, found {found}")


def _found(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return repr(node.value) if node.style else str(node.value) or "an empty value"
    return "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"


def _expand_env(text: str, ctx: _Ctx, node: yaml.Node, path: str) -> str:
    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ctx.error(node, path, f"environment variable {name} to be set", f"'{m.group(0)}'")

    return _ENV_RE.sub(repl, text)


def _scalar(node: yaml.Node, ctx: _Ctx, path: str, expected: str) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise ctx.error(node, path, expected, _found(node))
    return _expand_env(node.value, ctx, node, path)


def parse_duration(text: str) -> Optional[float]:
    """``15s`` -> 15.0; None when malformed."""
    m = _DURATION_RE.match(text.strip())
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)] if m else None


def parse_address(text: str) -> Optional[tuple[str, int]]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); None when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or any(c.isspace() for c in host):
        return None
    return host, int(port)


def _convert(tp: Any, node: yaml.Node, ctx: _Ctx, path: str, meta: typing.Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        _base, tag = typing.get_args(tp)[:2]
        text = _scalar(node, ctx, path, "a duration like 15s" if tag == DURATION else "host:port")
        if tag == DURATION:
            value = parse_duration(text)
            if value is None:
                raise ctx.error(node, path, "a duration like 500ms, 15s, 2m or 1h", repr(text))
            return value
        if parse_address(text) is None:
            raise ctx.error(node, path, "an address host:port with a port 1-65535", repr(text))
        return text
    if is_dataclass(tp):
        return _build(tp, node, ctx, path)
    if origin is Literal:
        choices = typing.get_args(tp)
        text = _scalar(node, ctx, path, "one of " + ", ".join(choices))
        if text not in choices:
            raise ctx.error(node, path, "one of " + ", ".join(choices), repr(text))
        return text
    if origin is tuple:
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return ()
        if not isinstance(node, yaml.SequenceNode):
            raise ctx.error(node, path, "a list of strings", _found(node))
        items = []
        for i, item in enumerate(node.value):
            text = _scalar(item, ctx, f"{path}[{i}]", "a string")
            if not text:
                raise ctx.error(item, f"{path}[{i}]", "a non-empty string", "an empty value")
            items.append(text)
        return tuple(items)
    if origin is dict:
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise ctx.error(node, path, "a mapping of strings", _found(node))
        return {
            _scalar(k, ctx, path, "a string key"): _scalar(v, ctx, f"{path}.{k.value}", "a string")
            for k, v in node.value
        }
    if tp is bool:
        text = _scalar(node, ctx, path, "true or false").lower()
        if text not in ("true", "false"):
            raise ctx.error(node, path, "true or false", _found(node))
        return text == "true"
    if tp is int:
        text = _scalar(node, ctx, path, "an integer")
        if not re.fullmatch(r"[+-]?\d+", text.strip()):
            raise ctx.error(node, path, "an integer", _found(node))
        value = int(text)
        lo, hi = meta.get("min"), meta.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"{lo} to {hi}" if hi is not None else f"at least {lo}"
            raise ctx.error(node, path, f"an integer {rng}", str(value))
        return value
    if tp is str:
        return _scalar(node, ctx, path, "a string")
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _build(cls: type, node: yaml.Node, ctx: _Ctx, path: str) -> Any:
    if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
        return cls()
    if not isinstance(node, yaml.MappingNode):
        raise ctx.error(node, path or "<top>", "a mapping", _found(node))
    hints = typing.get_type_hints(cls, include_extras=True)
    known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    values: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
        key_path = f"{path}.{key}" if path else key
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
            want = f"'{close[0]}' (did you mean it?)" if close else "one of " + ", ".join(sorted(known))
            raise ctx.error(key_node, key_path, want, f"unknown key '{key}'")
        if key in values:
            raise ctx.error(key_node, key_path, "each key once", "a duplicate key")
        f = known[key]
        value = _convert(hints[key], value_node, ctx, key_path, f.metadata)
        check: Optional[Callable[[Any], Optional[str]]] = f.metadata.get("check")
        if check and (want := check(value)):
            raise ctx.error(value_node, key_path, want, repr(value))
        values[key] = value
        ctx.lines[key_path] = key_node.start_mark.line + 1
    return cls(**values)


def _check_files(cfg: Config, ctx: _Ctx) -> None:
    """Cross-key checks that need the whole tree (TLS files when TLS is on)."""
    cil = cfg.ebpf.cilium
    wanted: list[tuple[str, str]] = []
    if cil.enabled and cil.hubble_tls_enabled and not cil.hubble_address.startswith("unix://"):
        wanted += [
            (f"integrations.ebpf.cilium.{k}", getattr(cil, k))
            for k in ("hubble_tls_ca", "hubble_tls_cert", "hubble_tls_key")
        ]
    otlp = cfg.exporters.otlp
    if otlp.enabled and otlp.tls.enabled:
        wanted += [
            (f"exporters.otlp.tls.{k}", getattr(otlp.tls, k))
            for k in ("ca_file", "cert_file", "key_file")
            if getattr(otlp.tls, k)
        ]
    if otlp.enabled and otlp.tls.enabled and otlp.tls.insecure_skip_verify and otlp.protocol == "grpc":
        line = ctx.lines.get("exporters.otlp.tls.insecure_skip_verify")
        raise ConfigError(
            f"{ctx.source}:{line}: exporters.otlp.tls.insecure_skip_verify: expected false with protocol grpc"
            " (gRPC cannot skip certificate verification; set ca_file), found true"
        )
    prom = cfg.exporters.prometheus
    if prom.enabled and prom.tls.enabled:
        wanted += [(f"exporters.prometheus.tls.{k}", getattr(prom.tls, k)) for k in ("cert_file", "key_file")]
    if prom.basic_auth.password and not prom.basic_auth.username:
        line = ctx.lines.get("exporters.prometheus.basic_auth.password")
        raise ConfigError(
            f"{ctx.source}:{line}: exporters.prometheus.basic_auth.username: expected a user name with the password,"
            " found an empty value"
        )
    btf = cfg.ebpf.btf_custom_path
    if cfg.ebpf.enabled and btf:
        wanted.append(("integrations.ebpf.btf_path", btf))
    for key, path in wanted:
        if not os.access(path, os.R_OK):
            why = "missing" if not os.path.exists(path) else "not readable"
            line = ctx.lines.get(key)
            where = f"{ctx.source}:{line}" if line else f"{ctx.source} (default value)"
            raise ConfigError(f"{where}: {key}: expected a readable file, found {path!r} ({why})")


def parse(text: str, source: str = "<string>") -> Config:
    """Parse and validate config text; raises ConfigError."""
    ctx = _Ctx(source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}{where}: not valid YAML: {problem}") from None
    cfg = Config() if node is None else _build(Config, node, ctx, "")
    cfg = dataclasses.replace(cfg, source=source)
    _check_files(cfg, ctx)
    return cfg


def load(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a config file; raises ConfigError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc}") from None
    return parse(text, str(p))


def listen_pair(address: str) -> tuple[str, int]:
    """The (host, port) of an already validated listen address."""
    pair = parse_address(address)
    if pair is None:
        raise ConfigError(f"bad listen address {address!r}")
    return pair
