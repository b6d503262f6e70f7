"""Discovery: sources report endpoints to a sink that registers and retires backends.

A source (registered through ``register_discovery_sources``) is a class with ``name``,
built as ``cls(config, settings)``, whose ``async def run(sink)`` runs until cancelled.
Static config wins over a discovered duplicate (same URL). A lost endpoint is kept for
``discovery.grace_period_seconds`` (status unknown, not probed) and removed only if it
does not come back in time; if it does, it keeps its id and is probed at once. The
built-in sources are ``nexus.discovery_mdns`` and ``nexus.discovery_probe``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import msgspec

from nexus.adapters.base import BackendAdapter, normalise_base_url
from nexus.config import BackendConfig, Config
from nexus.mdns import is_loopback, machine_addresses
from nexus.registry import Backend, Registry, Status

log = logging.getLogger("nexus.discovery")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class DiscoveredEndpoint(msgspec.Struct, kw_only=True, frozen=True):
    """What a source found. ``key`` identifies it across found/lost reports."""

    key: str
    name: str
    url: str
    type: str
    zone: str | None = None
    tier: int = 1
    priority: int = 50
    models: list[str] = msgspec.field(default_factory=list)
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


@runtime_checkable
class DiscoverySource(Protocol):
    name: str

    async def run(self, sink: DiscoverySink) -> None: ...


def readable_id(name: str, taken: Callable[[str], bool]) -> str:
    """A stable, readable backend id from a name: lower-case words joined by '-', de-duplicated."""
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "backend"
    candidate, n = base, 2
    while taken(candidate):
        candidate, n = f"{base}-{n}", n + 1
    return candidate


@dataclass
class _Tracked:
    """A reported endpoint: the backend it became, and its pending removal if it is lost."""

    backend_id: str
    endpoint: DiscoveredEndpoint
    source: str
    removal: asyncio.TimerHandle | None = None


class DiscoverySink:
    """Receives a source's reports and turns them into registry changes.

    ``backend_types`` are the installed adapter classes by type name, for sources that
    need them (the mDNS source checks TXT types, the port probe asks each adapter).
    """

    def __init__(
        self,
        registry: Registry,
        config: Config,
        build_backend: Callable[[BackendConfig, str, str], Backend | None],
        on_added: Callable[[Backend], Any],
        *,
        backend_types: Mapping[str, type[BackendAdapter]] | None = None,
    ) -> None:
        self.registry = registry
        self.grace = config.discovery.grace_period_seconds
        self.backend_types: Mapping[str, type[BackendAdapter]] = backend_types or {}
        self._build = build_backend
        self._on_added = on_added
        self._tracked: dict[str, _Tracked] = {}  # endpoint key -> its backend
        self._this_machine = {"localhost", *machine_addresses()}

    def found(self, endpoint: DiscoveredEndpoint, source: str) -> Backend | None:
        tracked = self._tracked.get(endpoint.key)
        backend = self.registry.get(tracked.backend_id) if tracked is not None else None
        url = normalise_base_url(endpoint.url)
        if tracked is not None and backend is not None and (backend.url, backend.type_name) == (url, endpoint.type):
            self._refresh(tracked, backend, endpoint)
            return backend
        backend_id = None
        if tracked is not None:  # it moved (new URL or type), or was removed by hand meanwhile
            self._forget(endpoint.key)
            if backend is not None and self.registry.remove(backend.id) is not None:
                backend_id = backend.id  # rebuilt under the same id
        owner = next((b for b in self.registry.all() if self._server(b.url) == self._server(url)), None)
        if owner is not None:
            log.debug("Ignoring %s at %s: backend %s has this URL", endpoint.name, url, owner.id)
            return None  # static config (or another source) already has it
        backend_id = backend_id or readable_id(endpoint.name, lambda i: self.registry.get(i) is not None)
        spec = BackendConfig(name=endpoint.name, url=endpoint.url, type=endpoint.type, zone=endpoint.zone,
                             tier=endpoint.tier, priority=endpoint.priority)
        backend = self._build(spec, backend_id, source)
        if backend is None:
            return None
        # Listed until the first successful probe replaces them (unlike a static backend's models).
        self.registry.set_models(backend, [backend.adapter.describe_model(m) for m in endpoint.models])
        self._tracked[endpoint.key] = _Tracked(backend.id, endpoint, source)
        log.info("Discovered backend %s at %s", backend.id, backend.url, extra={"source": source})
        self._on_added(backend)
        return backend

    def _server(self, url: str) -> tuple[str, str, int | None, str]:
        """What identifies a server in a URL. Loopback names and this machine's own
        addresses count as one host, so ``localhost:11434`` in the config and
        ``127.0.0.1:11434`` found by a probe are the same backend."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if host in self._this_machine or is_loopback(host):
            host = "this machine"
        return parts.scheme, host, parts.port or _DEFAULT_PORTS.get(parts.scheme), parts.path.rstrip("/")

    def _refresh(self, tracked: _Tracked, backend: Backend, endpoint: DiscoveredEndpoint) -> None:
        """The same endpoint again: take its new zone, tier and priority; back from lost if it was."""
        tracked.endpoint = endpoint
        backend.zone = (endpoint.zone or backend.adapter.default_zone()).lower()
        backend.tier, backend.priority = endpoint.tier, endpoint.priority
        if tracked.removal is not None:
            tracked.removal.cancel()
            tracked.removal = None
            backend.lost = False
            log.info("Discovered backend %s is back", backend.id, extra={"source": tracked.source})
            self._on_added(backend)  # probed at once: healthy again on the first success

    def lost(self, key: str) -> None:
        tracked = self._tracked.get(key)
        backend = self.registry.get(tracked.backend_id) if tracked is not None else None
        if tracked is None or backend is None or tracked.removal is not None:
            return
        backend.lost = True  # not probed (so it stays unknown) until it returns or is removed
        backend.set_status(Status.UNKNOWN, "endpoint disappeared; removing after the grace period")
        log.warning("Backend %s disappeared, removing in %gs unless it returns", backend.id, self.grace,
                    extra={"source": tracked.source})
        tracked.removal = asyncio.get_running_loop().call_later(self.grace, self._remove, key)

    def _remove(self, key: str) -> None:
        tracked = self._tracked.pop(key, None)
        if tracked is not None and self.registry.remove(tracked.backend_id) is not None:
            log.info("Removed backend %s after the grace period", tracked.backend_id,
                     extra={"source": tracked.source})

    def _forget(self, key: str) -> None:
        tracked = self._tracked.pop(key)
        if tracked.removal is not None:
            tracked.removal.cancel()

    def close(self) -> None:
        for key in list(self._tracked):
            self._forget(key)
