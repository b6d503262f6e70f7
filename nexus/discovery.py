"""Discovery: sources report endpoints to a sink that registers and retires backends.

A source (registered through ``register_discovery_sources``) is a class with ``name``,
built as ``cls(config, settings)``, whose ``async def run(sink)`` runs until cancelled.
Static config wins over a discovered duplicate (same URL). A lost endpoint is kept for
``discovery.grace_period_seconds`` and removed only if it does not come back in time;
if it does, it keeps its id.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import msgspec

from nexus.adapters.base import normalise_base_url
from nexus.config import BackendConfig, Config
from nexus.registry import Backend, Registry, Status

log = logging.getLogger("nexus.discovery")


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


class DiscoverySink:
    """Receives a source's reports and turns them into registry changes."""

    def __init__(
        self,
        registry: Registry,
        config: Config,
        build_backend: Callable[[BackendConfig, str, str], Backend | None],
        on_added: Callable[[Backend], Any],
    ) -> None:
        self.registry = registry
        self.grace = config.discovery.grace_period_seconds
        self._build = build_backend
        self._on_added = on_added
        self._ids: dict[str, str] = {}  # endpoint key -> backend id
        self._removals: dict[str, asyncio.TimerHandle] = {}

    def found(self, endpoint: DiscoveredEndpoint, source: str) -> Backend | None:
        timer = self._removals.pop(endpoint.key, None)
        if timer is not None:
            timer.cancel()
            log.info("Discovered backend came back: %s", endpoint.name, extra={"source": source})
        known = self._ids.get(endpoint.key)
        if known is not None and self.registry.get(known) is not None:
            return self.registry.get(known)
        if self.registry.find_by_url(normalise_base_url(endpoint.url)) is not None:
            return None  # static config (or another source) already has it
        backend_id = readable_id(endpoint.name, lambda i: self.registry.get(i) is not None)
        spec = BackendConfig(
            name=endpoint.name, url=endpoint.url, type=endpoint.type, zone=endpoint.zone,
            tier=endpoint.tier, priority=endpoint.priority, models=list(endpoint.models),
        )
        backend = self._build(spec, backend_id, source)
        if backend is None:
            return None
        self._ids[endpoint.key] = backend.id
        log.info("Discovered backend %s at %s", backend.id, endpoint.url, extra={"source": source})
        self._on_added(backend)
        return backend

    def lost(self, key: str) -> None:
        backend_id = self._ids.get(key)
        backend = self.registry.get(backend_id) if backend_id else None
        if backend is None or key in self._removals:
            return
        backend.set_status(Status.UNKNOWN, "endpoint disappeared; removing after the grace period")
        log.warning("Backend %s disappeared, removing in %gs unless it returns", backend.id, self.grace)
        self._removals[key] = asyncio.get_running_loop().call_later(self.grace, self._remove, key)

    def _remove(self, key: str) -> None:
        self._removals.pop(key, None)
        backend_id = self._ids.pop(key, None)
        if backend_id and self.registry.remove(backend_id) is not None:
            log.info("Removed backend %s after the grace period", backend_id)

    def close(self) -> None:
        for timer in self._removals.values():
            timer.cancel()
        self._removals.clear()
