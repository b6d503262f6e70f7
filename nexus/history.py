"""Request history (``GET /v1/history``, the dashboard's live feed): the last 100 requests.

Every request, routed or refused, streamed or not, cancelled or cut, becomes one
:class:`~nexus.state.base.HistoryEntry` when it ends (``History.record`` is one of the
gateway's observers). The entry goes into an in-memory ring buffer -- the only thing
``/v1/history`` reads, so the endpoint never waits for storage -- and is queued to the
state store so history survives a restart (:meth:`History.load` reads it back at start).
Listeners (the WebSocket hub) get each entry as it is made, so the dashboard shows a
request within the same event-loop turn that finished it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from nexus.record import RequestRecord
from nexus.state.base import HistoryEntry, StateStore

log = logging.getLogger("nexus.history")

CAPACITY = 100  # entries kept in memory and served by /v1/history (upstream §2.8)
MAX_MODEL_CHARS = 256  # upstream truncates model names to 256 characters ...
MAX_ERROR_CHARS = 1024  # ... and error messages to 1024, so a hostile request cannot bloat history
MAX_FUTURE_SECONDS = 60.0  # a timestamp further ahead than this (clock jump) is clamped to now

_STATUS = {"success": "Success", "error": "Error", "cancelled": "Cancelled", "interrupted": "Interrupted"}


def _cut(text: str | None, limit: int) -> str | None:
    return text if text is None or len(text) <= limit else text[:limit]


def entry_of(record: RequestRecord, *, now: float | None = None) -> HistoryEntry:
    """The history entry of one finished request (its record after ``end()``)."""
    now = time.time() if now is None else now
    timestamp = record.timestamp
    if timestamp > now + MAX_FUTURE_SECONDS or timestamp < 0:
        timestamp = now
    return HistoryEntry(
        request_id=record.request_id,
        timestamp=round(timestamp, 3),
        endpoint=record.endpoint,
        model=_cut(record.model, MAX_MODEL_CHARS) or "",
        resolved_model=_cut(record.served_model, MAX_MODEL_CHARS),
        backend_id=record.backend or "none",
        backend_type=record.backend_type,
        route_reason=_cut(record.route_reason, MAX_MODEL_CHARS) or "",
        status=_STATUS.get(record.outcome, "Error"),
        status_code=record.status,
        duration_ms=record.duration_ms or 0.0,
        ttft_ms=record.ttft_ms,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        cost_usd=record.cost_usd,
        stream=record.stream,
        error_message=_cut(record.error, MAX_ERROR_CHARS),
    )


class History:
    """The newest :data:`CAPACITY` entries, oldest first, plus the store they are written to.

    ``store`` is set by :meth:`load` (the gateway calls it once its state store is open);
    until then entries are kept in memory only.
    """

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._entries: deque[HistoryEntry] = deque(maxlen=capacity)
        self.store: StateStore | None = None
        # Called with every new entry, on the event loop; must be cheap and never block.
        self.listeners: list[Callable[[HistoryEntry], None]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[HistoryEntry]:
        """Oldest first, as ``/v1/history`` returns them."""
        return list(self._entries)

    async def load(self, store: StateStore) -> None:
        """Write new entries to ``store`` from now on, and put its newest entries in front of
        anything recorded so far, so history survives a restart.

        Never raises because of what is stored: the stores skip rows they cannot decode,
        and a read that fails outright leaves the history empty (start-up goes on)."""
        self.store = store
        try:
            stored = await store.recent_history(self.capacity)
        except Exception as exc:
            log.warning("Could not read the stored request history (%s: %s); starting with an empty history",
                        type(exc).__name__, exc)
            return
        if stored:
            current = list(self._entries)
            self._entries.clear()
            self._entries.extend(stored)
            self._entries.extend(current)

    def record(self, record: RequestRecord) -> None:
        """Gateway observer: one entry per finished request."""
        entry = entry_of(record)
        self._entries.append(entry)
        if self.store is not None:
            try:
                self.store.append_history(entry)  # queued by the store: never blocks the request path
            except Exception:
                log.exception("Could not queue a history entry for the state store")
        for listener in self.listeners:
            try:
                listener(entry)
            except Exception:
                log.exception("History listener %r failed", listener)
