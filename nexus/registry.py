"""The backend registry: every known backend, its models, status and live counters."""

from __future__ import annotations

import enum
import logging
import time
from typing import TYPE_CHECKING

import msgspec

from nexus.quality import BackendQuality

if TYPE_CHECKING:
    from nexus.adapters.base import BackendAdapter

log = logging.getLogger("nexus.registry")


class Status(str, enum.Enum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    LOADING = "loading"  # up, but still loading its model: not routed to, not counted as down
    DRAINING = "draining"


class ModelInfo(msgspec.Struct, kw_only=True, frozen=True):
    """What a backend says (or heuristics guess) about one model it serves."""

    id: str
    context_length: int | None = None  # None: unknown, never used to exclude
    vision: bool = False
    tools: bool = False
    json_mode: bool = False
    embeddings: bool = False
    loaded: bool = True  # False: listed but not in memory (served after a load; ranked below loaded ones)


class Backend:
    """One backend. Counters are plain attributes: the event loop is the only writer."""

    __slots__ = (
        "id",
        "name",
        "url",
        "type_name",
        "adapter",
        "zone",
        "tier",
        "priority",
        "source",
        "cloud",
        "status",
        "models",
        "pending",
        "total_requests",
        "avg_latency_ms",
        "last_error",
        "last_health_check",
        "consecutive_failures",
        "consecutive_successes",
        "retry_after_until",
        "lost",
        "max_concurrent",
        "quality",
    )

    def __init__(
        self,
        *,
        id: str,
        name: str,
        url: str,
        adapter: BackendAdapter,
        zone: str,
        tier: int,
        priority: int,
        source: str = "static",
        max_concurrent: int | None = None,
        quality: BackendQuality | None = None,
    ) -> None:
        self.id = id
        self.name = name
        self.url = url
        self.adapter = adapter
        self.type_name = adapter.type_name
        self.cloud = adapter.cloud
        self.zone = zone
        self.tier = tier
        self.priority = priority
        self.source = source
        self.status = Status.UNKNOWN
        self.models: dict[str, ModelInfo] = {}
        self.pending = 0
        self.total_requests = 0
        self.avg_latency_ms = 0.0
        self.last_error: str | None = None
        self.last_health_check: float | None = None
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.retry_after_until = 0.0  # time.monotonic() before which the backend asked not to be sent work
        self.lost = False  # its discovery source reported it gone: not probed until it returns or is removed
        self.max_concurrent = max_concurrent  # None: no cap
        self.quality = quality or BackendQuality()

    @property
    def healthy(self) -> bool:
        return self.status is Status.HEALTHY

    @property
    def at_capacity(self) -> bool:
        return self.max_concurrent is not None and self.pending >= self.max_concurrent

    def can_serve_now(self, now: float) -> bool:
        """Healthy, below its concurrency cap, not asked by the backend to wait, and not
        excluded for its error rate (``now`` is ``time.monotonic()``)."""
        return (self.healthy and not self.at_capacity and self.retry_after_until <= now
                and not self.quality.blocks(now))

    def set_status(self, status: Status, error: str | None = None) -> None:
        if status is not self.status:
            log.info(
                "Backend status changed: %s %s -> %s%s",
                self.id,
                self.status.value,
                status.value,
                f" ({error})" if error else "",
            )
        self.status = status
        self.last_error = error
        self.last_health_check = time.time()


class DuplicateBackend(Exception):
    pass


class Registry:
    """Backends by id, plus a model -> backends index rebuilt whenever a model list changes."""

    def __init__(self) -> None:
        self._backends: dict[str, Backend] = {}
        self._by_model: dict[str, list[Backend]] = {}
        self.version = 0  # bumped whenever backends or their model lists change

    def __len__(self) -> int:
        return len(self._backends)

    def add(self, backend: Backend) -> None:
        if backend.id in self._backends:
            raise DuplicateBackend(backend.id)
        self._backends[backend.id] = backend
        self._reindex()

    def remove(self, backend_id: str) -> Backend | None:
        backend = self._backends.pop(backend_id, None)
        if backend is not None:
            self._reindex()
        return backend

    def get(self, backend_id: str) -> Backend | None:
        return self._backends.get(backend_id)

    def all(self) -> list[Backend]:
        return list(self._backends.values())

    def find_by_url(self, url: str) -> Backend | None:
        wanted = url.rstrip("/")
        return next((b for b in self._backends.values() if b.url.rstrip("/") == wanted), None)

    def set_models(self, backend: Backend, models: list[ModelInfo]) -> None:
        new = {m.id: m for m in models}
        if new != backend.models:
            backend.models = new
            self._reindex()

    def backends_for(self, model: str) -> list[Backend]:
        """Every registered backend (any status) that lists ``model``, ordered by name."""
        return self._by_model.get(model, [])

    def model_ids(self) -> list[str]:
        return sorted(self._by_model)

    def _reindex(self) -> None:
        index: dict[str, list[Backend]] = {}
        for backend in sorted(self._backends.values(), key=lambda b: b.name):
            for model_id in backend.models:
                index.setdefault(model_id, []).append(backend)
        self._by_model = index
        self.version += 1
