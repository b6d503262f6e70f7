"""Configuration: msgspec structs decoded from TOML, overlaid by ``NEXUS_*`` env and CLI flags.

Precedence, highest first: CLI flag, ``NEXUS_*`` environment variable, file, default.
Unknown keys are errors (a typo must not silently disable a setting). Every problem is
raised as one :class:`~nexus.errors.ConfigError` line naming the key, the bad value and
what is allowed. Plugin settings live under ``[plugins.<name>]`` and are validated by
the plugin itself.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import msgspec

from nexus.errors import ConfigError
from nexus.routing.glob import GlobError, compile_glob

LogLevel = Literal["trace", "debug", "info", "warn", "warning", "error"]
Strategy = Literal["smart", "round_robin", "priority_only", "random"]
ZONES = ("restricted", "open")
MAX_ALIAS_HOPS = 3


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 8000
    request_timeout_seconds: float = 300.0
    stream_idle_timeout_seconds: float = 120.0
    max_body_bytes: int = 10 * 1024 * 1024


class DiscoveryConfig(_Section):
    enabled: bool = True
    service_types: list[str] = msgspec.field(default_factory=lambda: ["_ollama._tcp.local.", "_llm._tcp.local."])
    grace_period_seconds: float = 60.0
    interfaces: list[str] | None = None
    announce: bool = False
    probe_localhost: bool = True
    probe_hosts: list[str] = msgspec.field(default_factory=list)
    probe_ports: list[Annotated[int, msgspec.Meta(ge=1, le=65535)]] | None = None
    probe_interval_seconds: Annotated[float, msgspec.Meta(gt=0)] = 30.0

    _SERVICE_TYPE: ClassVar[re.Pattern[str]] = re.compile(r"^_[A-Za-z0-9-]{1,15}\._(tcp|udp)\.local\.$")
    _HOSTNAME: ClassVar[re.Pattern[str]] = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")

    def __post_init__(self) -> None:
        """Append the trailing '.' a service type may lack (checked in :func:`validate`)."""
        self.service_types = [t if t.endswith(".") else f"{t}." for t in self.service_types]


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class HealthCheckConfig(_Section):
    enabled: bool = True
    interval_seconds: float = 30.0
    timeout_seconds: float = 5.0
    failure_threshold: int = 3
    recovery_threshold: int = 2


class WeightsConfig(_Section):
    priority: int
    load: int
    latency: int


class PolicyConfig(_Section):
    """One ``[[routing.policies]]`` entry: matched by glob, in order, first match wins."""

    model_pattern: str
    privacy: Literal["unrestricted", "restricted"] = "unrestricted"
    min_tier: int | None = None


NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class PriceConfig(_Section):
    """One model's price in USD per million tokens (``[routing.budget.prices."<model>"]``)."""

    input: NonNegative
    output: NonNegative
    cached_input: NonNegative | None = None  # prompt tokens the provider served from its cache


class BudgetConfig(_Section):
    """``[routing.budget]``: monthly spending limit (UTC calendar month) and prices."""

    monthly_limit_usd: NonNegative | None = None  # absent: spend is counted, nothing is limited
    soft_limit_percent: Annotated[float, msgspec.Meta(ge=0, le=100)] = 75.0
    hard_limit_action: Literal["warn", "block_cloud", "block_all"] = "warn"
    reconciliation_interval_secs: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    default_reserved_output_tokens: Annotated[int, msgspec.Meta(ge=1)] = 1024  # output reserved when a request sets none
    local_usd_per_gpu_second: NonNegative = 0.0  # energy price of local inference; 0 = local is free
    prices: dict[str, PriceConfig] = msgspec.field(default_factory=dict)


class RoutingConfig(_Section):
    strategy: Strategy = "smart"
    max_retries: int = 2
    weights: WeightsConfig = msgspec.field(default_factory=lambda: WeightsConfig(priority=50, load=30, latency=20))
    aliases: dict[str, str] = msgspec.field(default_factory=dict)
    fallbacks: dict[str, list[str]] = msgspec.field(default_factory=dict)
    policies: list[PolicyConfig] = msgspec.field(default_factory=list)
    budget: BudgetConfig = msgspec.field(default_factory=BudgetConfig)


class QualityConfig(_Section):
    error_rate_threshold: float = 0.5
    ttft_penalty_threshold_ms: float = 3000.0
    metrics_interval_seconds: float = 30.0
    retry_after_seconds: float = 60.0  # an excluded backend gets one trial request after this


class QueueConfig(_Section):
    enabled: bool = True
    max_size: int = 100
    max_wait_seconds: float = 30.0


class BackendConfig(_Section):
    name: str
    url: str
    type: str
    priority: int = 50
    api_key_env: str | None = None
    zone: str | None = None
    tier: int = 1
    models: list[str] = msgspec.field(default_factory=list)
    embedding_models: list[str] = msgspec.field(default_factory=list)
    max_concurrent: int | None = None


class StateConfig(_Section):
    """``[state]``: where spend, reservations, request history and quality history persist."""

    backend: Literal["sqlite", "redis", "memory"] = "sqlite"
    path: str | None = None  # sqlite file; default $XDG_DATA_HOME/nexus/state.db
    url: str | None = None  # redis, e.g. redis://127.0.0.1:6379/0
    key_prefix: str = "nexus"  # redis keys start with "<key_prefix>:"

    def sqlite_path(self) -> Path:
        if self.path:
            return Path(self.path).expanduser()
        data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return Path(data_home) / "nexus" / "state.db"


class LoggingConfig(_Section):
    level: LogLevel = "info"
    format: Literal["pretty", "json"] = "pretty"
    component_levels: dict[str, str] = msgspec.field(default_factory=dict)
    enable_content_logging: bool = False


class Config(_Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    discovery: DiscoveryConfig = msgspec.field(default_factory=DiscoveryConfig)
    health_check: HealthCheckConfig = msgspec.field(default_factory=HealthCheckConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    backends: list[BackendConfig] = msgspec.field(default_factory=list)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    quality: QualityConfig = msgspec.field(default_factory=QualityConfig)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    plugins: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("expected an integer") from None


def _parse_str(text: str) -> str:
    return text.strip()


# env var -> (config path, parser). Values that do not parse are rejected, like file values.
ENV_VARS: dict[str, tuple[tuple[str, str], Any]] = {
    "NEXUS_HOST": (("server", "host"), _parse_str),
    "NEXUS_PORT": (("server", "port"), _parse_int),
    "NEXUS_LOG_LEVEL": (("logging", "level"), lambda s: s.strip().lower()),
    "NEXUS_LOG_FORMAT": (("logging", "format"), lambda s: s.strip().lower()),
    "NEXUS_DISCOVERY": (("discovery", "enabled"), _parse_bool),
    "NEXUS_HEALTH_CHECK": (("health_check", "enabled"), _parse_bool),
}


def _set(raw: dict[str, Any], path: tuple[str, str], value: Any, source: str) -> None:
    section = raw.setdefault(path[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: {path[0]} = {section!r} is invalid: expected a table")
    section[path[1]] = value


def read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text (line {line})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None


def load(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: dict[tuple[str, str], Any] | None = None,
) -> Config:
    """Load the config: file (if given or ``nexus.toml`` exists), then env, then CLI overrides.

    An explicitly named file that does not exist is an error; the implicit
    ``nexus.toml`` may be absent (zero-config start).
    """
    env = os.environ if env is None else env
    explicit = path if path is not None else env.get("NEXUS_CONFIG") or None
    source = Path(explicit) if explicit else Path("nexus.toml")
    raw: dict[str, Any] = {}
    if explicit or source.exists():
        raw = read_file(source)
    origins: dict[str, str] = {}  # keys set outside the file, so their errors do not blame it
    for var, (key, parse) in ENV_VARS.items():
        if var in env:
            try:
                _set(raw, key, parse(env[var]), str(source))
            except ValueError as exc:
                raise ConfigError(f"environment {var}={env[var]!r} is invalid: {exc}") from None
            origins[".".join(key)] = f"environment {var}"
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(raw, key, value, str(source))
            origins[".".join(key)] = "command line"
    return build(raw, source=str(source), origins=origins)


_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\[(\.\.\.)\]")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _struct_at(struct: Any, field_type: Any) -> Any:
    """The Struct a field holds, directly or as the element of a list."""
    args = getattr(field_type, "__args__", None)
    inner = args[0] if args else field_type
    return inner if isinstance(inner, type) and issubclass(inner, msgspec.Struct) else None


def _converts(value: Any, declared: Any) -> bool:
    try:
        msgspec.convert(value, declared)
    except (msgspec.ValidationError, TypeError):
        return False
    return True


def _walk(raw: Any, raw_path: str) -> tuple[list[str | int], Any, Any]:
    """Follow a msgspec error path such as ``.backends[0].tier`` through the raw mapping.

    Returns the path as keys and indexes, the declared type there and the raw value.
    msgspec writes a mapping key as ``[...]``; the offending key is the first entry of
    that mapping whose value does not convert (msgspec checks entries in order).
    """
    parts: list[str | int] = []
    node: Any = raw
    declared: Any = Config
    for key, index, _ in _PART.findall(raw_path):
        if key:
            struct = _struct_at(None, declared)
            declared = {f.name: f.type for f in msgspec.structs.fields(struct)}.get(key) if struct else None
            parts.append(key)
            node = node.get(key) if isinstance(node, dict) else None
        elif index:
            args = getattr(declared, "__args__", None)
            declared = args[0] if args else None
            parts.append(int(index))
            node = node[int(index)] if isinstance(node, list) and int(index) < len(node) else None
        else:
            args = getattr(declared, "__args__", None)
            declared = args[1] if args and len(args) == 2 else Any
            entries = node.items() if isinstance(node, dict) else ()
            bad = next((k for k, v in entries if not _converts(v, declared)), None)
            parts.append("..." if bad is None else bad)
            node = None if bad is None else node[bad]
    return parts, declared, node


def _dotted(parts: list[str | int]) -> str:
    """``routing.fallbacks."llama3.1"`` / ``backends[0].tier``: TOML-style, quoting keys with dots."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            key = part if _BARE_KEY.match(part) else '"' + part.replace('"', '\\"') + '"'
            text += f".{key}" if text else key
    return text


def _allowed(declared: Any) -> str:
    struct = _struct_at(None, declared) if declared is not None else None
    if struct is not None:
        return ", ".join(f.name for f in msgspec.structs.fields(struct))
    values = [a for a in getattr(declared, "__args__", ()) if isinstance(a, str)]
    return ", ".join(repr(v) for v in values)


def explain(
    error: msgspec.ValidationError, raw: dict[str, Any], source: str, origins: Mapping[str, str] | None = None
) -> str:
    """Turn a msgspec validation error into one line naming key, value and what is allowed.

    ``origins`` maps keys set by the environment or the command line to what set them,
    so such a value is not blamed on the file.
    """
    text = str(error)
    match = _PATH.search(text)
    parts, declared, value = _walk(raw, match.group("path") if match else "")
    where = _dotted(parts) or "(top level)"
    detail = text[: match.start()] if match else text
    unknown = re.match(r"Object contains unknown field `(?P<key>[^`]+)`", detail)
    if unknown:
        key = _dotted([*parts, unknown["key"]])
        return f"{source}: unknown config key '{key}' (allowed here: {_allowed(declared)})"
    missing = re.match(r"Object missing required field `(?P<key>[^`]+)`", detail)
    if missing:
        return f"{source}: missing required key '{_dotted([*parts, missing['key']])}'"
    source = (origins or {}).get(where, source)
    if detail.startswith("Invalid enum value"):
        return f"{source}: {where} = {value!r} is invalid: expected one of {_allowed(declared)}"
    return f"{source}: {where} = {value!r} is invalid: {detail[0].lower() + detail[1:]}"


def build(raw: dict[str, Any], *, source: str = "config", origins: Mapping[str, str] | None = None) -> Config:
    """Validate a raw TOML mapping into a :class:`Config`, raising one-line ConfigErrors.

    ``origins`` names what set a key when it was not the file (``environment NEXUS_PORT``).
    """
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(explain(exc, raw, source, origins)) from None
    validate(config, source, origins)
    return config


def _check(ok: bool, source: str, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: {key} = {value!r} is invalid: {allowed}")


def _valid_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number 0-65535
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def validate(config: Config, source: str = "config", origins: Mapping[str, str] | None = None) -> None:
    """Semantic checks that types alone cannot express. Normalises ``zone`` to lower case."""
    s = config.server
    port_source = (origins or {}).get("server.port", source)
    _check(0 < s.port < 65536, port_source, "server.port", s.port, "expected a port 1-65535")
    # An empty host would make the server bind every interface: say 0.0.0.0 to mean that.
    _check(bool(s.host.strip()), (origins or {}).get("server.host", source), "server.host", s.host,
           "expected an address such as 127.0.0.1, or 0.0.0.0 for every interface")
    _check(s.request_timeout_seconds > 0, source, "server.request_timeout_seconds", s.request_timeout_seconds, "expected > 0")
    _check(
        s.stream_idle_timeout_seconds > 0,
        source,
        "server.stream_idle_timeout_seconds",
        s.stream_idle_timeout_seconds,
        "expected > 0",
    )
    _check(s.max_body_bytes > 0, source, "server.max_body_bytes", s.max_body_bytes, "expected > 0")
    h = config.health_check
    _check(h.interval_seconds > 0, source, "health_check.interval_seconds", h.interval_seconds, "expected > 0")
    _check(h.timeout_seconds > 0, source, "health_check.timeout_seconds", h.timeout_seconds, "expected > 0")
    _check(h.failure_threshold >= 1, source, "health_check.failure_threshold", h.failure_threshold, "expected >= 1")
    _check(h.recovery_threshold >= 1, source, "health_check.recovery_threshold", h.recovery_threshold, "expected >= 1")
    _check(
        config.discovery.grace_period_seconds >= 0,
        source,
        "discovery.grace_period_seconds",
        config.discovery.grace_period_seconds,
        "expected >= 0",
    )
    r = config.routing
    _check(r.max_retries >= 0, source, "routing.max_retries", r.max_retries, "expected >= 0")
    for name in ("priority", "load", "latency"):
        weight = getattr(r.weights, name)
        _check(weight >= 0, source, f"routing.weights.{name}", weight, "expected >= 0")
    d = config.discovery
    for i, service_type in enumerate(d.service_types):
        _check(bool(DiscoveryConfig._SERVICE_TYPE.match(service_type)), source, f"discovery.service_types[{i}]",
               service_type, "expected an mDNS service type such as '_llm._tcp.local.'")
    for i, address in enumerate(d.interfaces or []):
        _check(_is_ip_address(address), source, f"discovery.interfaces[{i}]", address,
               "expected an interface address such as '127.0.0.1'")
    for i, host in enumerate(d.probe_hosts):
        _check(_is_ip_address(host) or bool(DiscoveryConfig._HOSTNAME.match(host)), source,
               f"discovery.probe_hosts[{i}]", host, "expected an IP address or a host name")
    _check_aliases(r.aliases, source)
    for i, policy in enumerate(r.policies):
        key = f"routing.policies[{i}]"
        try:
            compile_glob(policy.model_pattern)
        except GlobError as exc:
            raise ConfigError(f"{source}: {key}.model_pattern = {policy.model_pattern!r} is invalid: {exc}") from None
        if policy.min_tier is not None:
            _check(1 <= policy.min_tier <= 5, source, f"{key}.min_tier", policy.min_tier, "expected a tier 1-5")
    q = config.quality
    _check(0 <= q.error_rate_threshold <= 1, source, "quality.error_rate_threshold", q.error_rate_threshold,
           "expected a rate from 0.0 to 1.0")
    _check(q.ttft_penalty_threshold_ms >= 0, source, "quality.ttft_penalty_threshold_ms",
           q.ttft_penalty_threshold_ms, "expected >= 0 (0 turns the penalty off)")
    _check(q.metrics_interval_seconds > 0, source, "quality.metrics_interval_seconds", q.metrics_interval_seconds,
           "expected > 0")
    _check(q.retry_after_seconds > 0, source, "quality.retry_after_seconds", q.retry_after_seconds, "expected > 0")
    _check(config.queue.max_size >= 0, source, "queue.max_size", config.queue.max_size, "expected >= 0 (0 disables)")
    _check(config.queue.max_wait_seconds > 0, source, "queue.max_wait_seconds", config.queue.max_wait_seconds,
           "expected > 0")
    st = config.state
    if st.backend == "redis":
        _check(bool(st.url) and urlsplit(st.url or "").scheme in ("redis", "rediss", "unix"), source, "state.url",
               st.url, "expected a redis:// URL when state.backend = 'redis'")
    levels = LogLevel.__args__
    for component, level in config.logging.component_levels.items():
        _check(level in levels, source, f"logging.component_levels.{component}", level,
               "expected one of " + ", ".join(repr(v) for v in levels))
    names: set[str] = set()
    for i, backend in enumerate(config.backends):
        key = f"backends[{i}]"
        _check(bool(backend.name.strip()), source, f"{key}.name", backend.name, "expected a non-empty name")
        _check(backend.name not in names, source, f"{key}.name", backend.name, "backend names must be unique")
        names.add(backend.name)
        _check(_valid_url(backend.url), source, f"{key}.url", backend.url,
               "expected an http:// or https:// URL with a host")
        if backend.max_concurrent is not None:
            _check(backend.max_concurrent >= 1, source, f"{key}.max_concurrent", backend.max_concurrent,
                   "expected >= 1 (leave it out for no cap)")
        _check(1 <= backend.tier <= 5, source, f"{key}.tier", backend.tier, "expected a tier 1-5")
        if backend.zone is not None:
            _check(backend.zone.lower() in ZONES, source, f"{key}.zone", backend.zone, "expected 'restricted' or 'open'")
            backend.zone = backend.zone.lower()


def _check_aliases(aliases: dict[str, str], source: str) -> None:
    for start in aliases:
        seen = [start]
        current = start
        while current in aliases:
            current = aliases[current]
            if current in seen:
                raise ConfigError(
                    f"{source}: routing.aliases has a cycle: '{start}' eventually points back to '{current}' "
                    f"({' -> '.join([*seen, current])})"
                )
            seen.append(current)


def resolve_alias(aliases: dict[str, str], model: str) -> str:
    """Follow aliases for at most :data:`MAX_ALIAS_HOPS` hops (upstream §5.5)."""
    for _ in range(MAX_ALIAS_HOPS):
        target = aliases.get(model)
        if target is None:
            break
        model = target
    return model


def documented_keys() -> list[str]:
    """Every config key as ``section.key`` (used by the docs test)."""
    keys: list[str] = []

    def walk(struct: type[msgspec.Struct], prefix: str) -> None:
        for field in msgspec.structs.fields(struct):
            inner = _struct_at(struct, field.type)
            if inner is not None:
                walk(inner, f"{prefix}{field.name}.")
            else:
                keys.append(f"{prefix}{field.name}")

    walk(Config, "")
    return keys
