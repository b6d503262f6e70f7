"""mDNS discovery (reference §4.5, with its recommended fixes): browse, resolve, report.

Browses ``discovery.service_types`` plus the service types that installed adapters
declare (``BackendAdapter.mdns_service_types``) on ``discovery.interfaces``. A resolved
service becomes a :class:`DiscoveredEndpoint`; a removed one is reported lost (the sink
keeps it for the grace period). If mDNS cannot start, one warning is logged and the
gateway runs on without it.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import Callable, Mapping
from typing import Any

from zeroconf import BadTypeInNameException, IPVersion, ServiceStateChange, Zeroconf, service_type_name
from zeroconf import Error as ZeroconfError
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo

from nexus.adapters.base import BackendAdapter, normalise_base_url
from nexus.config import ZONES, Config
from nexus.discovery import DiscoveredEndpoint, DiscoverySink
from nexus.mdns import declared_service_types, open_zeroconf

log = logging.getLogger("nexus.discovery.mdns")
RESOLVE_TIMEOUT_MS = 3000
TYPE_ALIASES = {"llama.cpp": "llamacpp"}


def _integer(text: str, low: int, high: int) -> int | None:
    try:
        value = int(text)
    except ValueError:
        return None
    return value if low <= value <= high else None


def _api_path(text: str) -> str | None:
    return text if text.startswith("/") and not any(c.isspace() or c in "?#" for c in text) else None


def _models(text: str) -> list[str] | None:
    return list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip())) or None


# TXT key -> parser of its value (None: malformed, ignored).
_TXT_PARSERS: dict[str, Callable[[str], object | None]] = {
    "type": lambda text: TYPE_ALIASES.get(text.strip().lower(), text.strip().lower()) or None,
    "api_path": _api_path,
    "version": lambda text: text.strip() or None,
    "zone": lambda text: text.strip().lower() if text.strip().lower() in ZONES else None,
    "tier": lambda text: _integer(text, 1, 5),
    "priority": lambda text: _integer(text, 0, 100),
    "models": _models,
}


def parse_txt(properties: Mapping[bytes, bytes | None], service: str = "") -> dict[str, Any]:
    """The TXT keys Nexus reads, parsed. A value that is missing, not UTF-8 or not valid for
    its key is left out (with a debug line); other keys are ignored."""
    parsed: dict[str, Any] = {}
    for raw_key, raw_value in properties.items():
        key = raw_key.decode("utf-8", errors="replace").lower()
        if key not in _TXT_PARSERS or raw_value is None:
            continue
        try:
            value = _TXT_PARSERS[key](raw_value.decode("utf-8"))
        except UnicodeDecodeError:
            value = None
        if value is None:
            log.debug("Ignoring TXT %s=%r of %s: not a valid value", key, raw_value, service)
        else:
            parsed[key] = value
    return parsed


def backend_type(txt_type: str | None, service_type: str, types: Mapping[str, type[BackendAdapter]]) -> str:
    """TXT ``type`` if that type is installed (and not a cloud type), else the type that
    declares the service type, else ``generic``."""
    if txt_type is not None:
        adapter_cls = types.get(txt_type)
        if adapter_cls is not None and not adapter_cls.cloud:
            return txt_type
        log.debug("TXT type=%s is not an installed local backend type; using generic", txt_type)
        return "generic"
    return declared_service_types(types).get(service_type.lower(), "generic")


def host_for_url(info: AsyncServiceInfo) -> str | None:
    """The first IPv4 address; else an IPv6 one (global before link-local), in brackets."""
    ipv4 = info.parsed_addresses(IPVersion.V4Only)
    if ipv4:
        return ipv4[0]
    ipv6 = sorted(info.parsed_scoped_addresses(IPVersion.V6Only),
                  key=lambda a: ipaddress.ip_address(a.split("%")[0]).is_link_local)
    return f"[{ipv6[0].replace('%', '%25')}]" if ipv6 else None


def instance_label(name: str, service_type: str) -> str:
    """The instance part of a service name, ``_`` read as a space: "Lab_Ollama" -> "Lab Ollama"."""
    suffix = f".{service_type}"
    label = name[: -len(suffix)] if name.lower().endswith(suffix.lower()) else name.split(".")[0]
    return label.replace("_", " ").strip() or name


def endpoint_from_service(info: AsyncServiceInfo, service_type: str,
                          types: Mapping[str, type[BackendAdapter]]) -> DiscoveredEndpoint | None:
    """The endpoint a resolved service describes; ``None`` (with a debug line) without an
    address or port."""
    host = host_for_url(info)
    if host is None or not info.port:
        log.debug("Ignoring mDNS service %s: no address or port", info.name)
        return None
    txt = parse_txt(info.properties, info.name)
    type_name = backend_type(txt.get("type"), service_type, types)
    url = normalise_base_url(f"http://{host}:{info.port}{txt.get('api_path', '')}")
    metadata = {"mdns_instance": info.name, "service_type": service_type}
    if "version" in txt:
        metadata["version"] = txt["version"]
    return DiscoveredEndpoint(
        key=info.name.lower(), name=instance_label(info.name, service_type), url=url, type=type_name,
        zone=txt.get("zone"), tier=txt.get("tier", 1), priority=txt.get("priority", 50),
        models=txt.get("models", []), metadata=metadata,
    )


class MdnsDiscovery:
    """The ``mdns`` discovery source."""

    name = "mdns"

    def __init__(self, config: Config, settings: Mapping[str, Any]) -> None:
        self.config = config.discovery
        self._resolving: dict[str, asyncio.Task[None]] = {}  # service name (lower case) -> its resolution

    def browsed_types(self, types: Mapping[str, type[BackendAdapter]]) -> list[str]:
        """The configured service types, then the valid ones adapters declare, each once."""
        browsed: dict[str, str] = {t.lower(): t for t in self.config.service_types}
        for declared, type_name in declared_service_types(types).items():
            try:
                service_type_name(declared, strict=True)
            except BadTypeInNameException:
                log.warning("Not browsing %r, declared by backend type %s: not an mDNS service type",
                            declared, type_name)
                continue
            browsed.setdefault(declared, declared)
        return list(browsed.values())

    async def run(self, sink: DiscoverySink) -> None:
        service_types = self.browsed_types(sink.backend_types)
        try:
            mdns = open_zeroconf(self.config.interfaces)
        except (OSError, ZeroconfError) as exc:
            log.warning("mDNS discovery is unavailable, continuing without it: %s", exc)
            return

        def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
            key = name.lower()
            pending = self._resolving.pop(key, None)
            if pending is not None:
                pending.cancel()
            if state_change is ServiceStateChange.Removed:
                sink.lost(key)
                return
            # Added or Updated: (re)read its address, port and TXT record
            task = asyncio.ensure_future(self._resolve(zeroconf, service_type, name, sink))
            self._resolving[key] = task
            task.add_done_callback(functools.partial(self._resolved, key))

        browser = AsyncServiceBrowser(mdns.zeroconf, service_types, handlers=[on_change])
        log.debug("Browsing mDNS for %s", ", ".join(service_types))
        try:
            await asyncio.Event().wait()  # until the gateway cancels the source
        finally:
            for task in self._resolving.values():
                task.cancel()
            await browser.async_cancel()
            await mdns.async_close()

    def _resolved(self, key: str, task: asyncio.Task[None]) -> None:
        if self._resolving.get(key) is task:
            del self._resolving[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("Resolving mDNS service %s failed: %r", key, task.exception())

    async def _resolve(self, zc: Zeroconf, service_type: str, name: str, sink: DiscoverySink) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zc, RESOLVE_TIMEOUT_MS):
            log.debug("mDNS service %s did not resolve", name)
            return
        endpoint = endpoint_from_service(info, service_type, sink.backend_types)
        if endpoint is not None:
            sink.found(endpoint, self.name)
