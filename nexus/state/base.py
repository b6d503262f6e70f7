"""The state-store interface and the in-memory implementation."""

from __future__ import annotations

import abc
import logging
from collections import deque
from collections.abc import Iterable

import msgspec

from nexus.config import StateConfig
from nexus.errors import ConfigError

log = logging.getLogger("nexus.state")


class HistoryEntry(msgspec.Struct, kw_only=True):
    """One finished request as ``/v1/history``, the dashboard and the store see it.

    Fields whose absence has a plain meaning (unknown, empty, not a stream) have defaults,
    so a stored row written by an older or newer Nexus (fields missing, or extra ones,
    which are ignored) still decodes; the rest identify the request and stay required.
    """

    request_id: str
    timestamp: float  # unix seconds, when the request arrived
    endpoint: str
    model: str  # as the client asked
    resolved_model: str | None = None  # what was served (alias or fallback applied)
    backend_id: str  # "none" when no backend was tried
    backend_type: str | None = None  # local | cloud
    route_reason: str = ""
    status: str  # Success | Error | Cancelled | Interrupted
    status_code: int
    duration_ms: float
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    stream: bool = False
    error_message: str | None = None


_history_decoder = msgspec.json.Decoder(HistoryEntry)


def decode_history(rows: Iterable[bytes | str]) -> list[HistoryEntry]:
    """Stored history rows, oldest first, decoded row by row: a bad row (another version's,
    or damaged) loses only itself, with one warning per read."""
    entries: list[HistoryEntry] = []
    skipped: list[Exception] = []
    for data in rows:
        try:
            entries.append(_history_decoder.decode(data))
        except (msgspec.DecodeError, TypeError, ValueError) as exc:
            skipped.append(exc)
    if skipped:
        log.warning("Skipped %d stored history row(s) that could not be decoded (first: %s)",
                    len(skipped), skipped[0])
    return entries


class QualityBucket(msgspec.Struct, array_like=True):
    """One backend's outcomes in one UTC minute (``minute`` = unix seconds // 60)."""

    minute: int
    ok: int
    failed: int
    ttft_sum: float
    ttft_count: int


class StateStore(abc.ABC):
    """Where state survives a restart. Amounts are USD; ``month`` is ``"YYYY-MM"`` (UTC).

    The budget ledger is atomic in each implementation: ``reserve`` checks and holds in
    one step, so concurrent requests (and, with Redis, several gateways) cannot together
    pass the limit by more than what is held.
    """

    kind: str = ""

    async def open(self) -> None:
        """Connect or create; raise :class:`ConfigError` (one line) when that is impossible."""

    async def close(self) -> None:
        """Write out everything queued, then release the file or connection."""

    # -- budget ledger -----------------------------------------------------------------------

    @abc.abstractmethod
    async def reserve(self, month: str, reservation_id: str, amount: float, limit: float | None) -> bool:
        """Hold ``amount`` if ``spent + reserved + amount <= limit`` (always when ``limit`` is
        None); return whether it was held. A held reservation outlives a crash."""

    @abc.abstractmethod
    async def settle(self, month: str, reservation_id: str, actual: float) -> None:
        """Release the reservation and add ``actual`` to the month's spend, atomically. With an
        empty ``reservation_id``, just add ``actual``. When the hold is gone (a ``reclaim``
        already charged its reserved amount), add nothing: the worst case stands."""

    @abc.abstractmethod
    async def totals(self, month: str) -> tuple[float, float]:
        """``(spent, reserved)`` for ``month``, across every gateway sharing this store."""

    async def touch(self, month: str, reservation_ids: list[str]) -> None:
        """Mark holds of requests that are still running as young, so an age-based
        ``reclaim`` by another gateway never charges them (a long stream, say)."""

    @abc.abstractmethod
    async def reclaim(self, older_than_seconds: float) -> float:
        """Settle reservations left by gateways that died (older than the given age, or owned
        by a process that no longer exists) at their reserved amount; return the USD moved."""

    # -- request history ---------------------------------------------------------------------

    @abc.abstractmethod
    def append_history(self, entry: HistoryEntry) -> None:
        """Queue one entry for writing (never blocks). The store keeps the newest 1000."""

    @abc.abstractmethod
    async def recent_history(self, limit: int) -> list[HistoryEntry]:
        """The newest ``limit`` entries, oldest first."""

    # -- quality history ---------------------------------------------------------------------

    @abc.abstractmethod
    def save_quality(self, backend_id: str, buckets: list[QualityBucket]) -> None:
        """Queue the backend's current minute buckets (replacing what was stored for it)."""

    @abc.abstractmethod
    async def load_quality(self, backend_id: str) -> list[QualityBucket]:
        """The stored buckets of ``backend_id``, oldest first (empty when none)."""


class MemoryStore(StateStore):
    """Nothing survives a restart (``[state] backend = "memory"``); used by most tests."""

    kind = "memory"

    def __init__(self) -> None:
        self._spent: dict[str, float] = {}
        self._held: dict[str, tuple[str, float]] = {}  # reservation id -> (month, amount)
        self._history: deque[HistoryEntry] = deque(maxlen=1000)
        self._quality: dict[str, list[QualityBucket]] = {}

    async def reserve(self, month: str, reservation_id: str, amount: float, limit: float | None) -> bool:
        if reservation_id in self._held:  # as the durable stores: a repeated hold is not counted twice
            return True
        spent, reserved = self._totals(month)
        if limit is not None and spent + reserved + amount > limit:
            return False
        self._held[reservation_id] = (month, amount)
        return True

    async def settle(self, month: str, reservation_id: str, actual: float) -> None:
        if reservation_id and self._held.pop(reservation_id, None) is None:
            return  # as the durable stores: a hold already reclaimed is not charged twice
        self._spent[month] = self._spent.get(month, 0.0) + actual

    def _totals(self, month: str) -> tuple[float, float]:
        return self._spent.get(month, 0.0), sum(a for m, a in self._held.values() if m == month)

    async def totals(self, month: str) -> tuple[float, float]:
        return self._totals(month)

    async def reclaim(self, older_than_seconds: float) -> float:
        return 0.0  # nothing outlives this process

    def append_history(self, entry: HistoryEntry) -> None:
        self._history.append(entry)

    async def recent_history(self, limit: int) -> list[HistoryEntry]:
        return list(self._history)[-limit:] if limit > 0 else []

    def save_quality(self, backend_id: str, buckets: list[QualityBucket]) -> None:
        self._quality[backend_id] = list(buckets)

    async def load_quality(self, backend_id: str) -> list[QualityBucket]:
        return list(self._quality.get(backend_id, []))


def open_store(config: StateConfig) -> StateStore:
    """The store ``config`` names (not yet opened: await ``open()``)."""
    if config.backend == "memory":
        return MemoryStore()
    if config.backend == "sqlite":
        from nexus.state.sqlite import SqliteStore

        return SqliteStore(config.sqlite_path())
    if config.backend == "redis":
        from nexus.state.redis import RedisStore

        return RedisStore(config.url or "", config.key_prefix)
    raise ConfigError(f"state.backend = {config.backend!r} is invalid: expected 'sqlite', 'redis' or 'memory'")
