"""What happened to one request: built as it is served, handed to every observer when it ends.

One :class:`RequestRecord` is made per client request (routed, refused, queued or
cancelled). When the request ends, the gateway passes it to each observer in
``Gateway.observers`` -- statistics, metrics, history, budget settlement, the dashboard's
live feed -- and logs it as one line. Observers must be cheap and must not block: they
run on the event loop, on the request path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nexus.routing.router import Attempt

log = logging.getLogger("nexus.proxy")
_REFUSED = {400: "invalid_request", 404: "model_not_found", 413: "payload_too_large",
            415: "unsupported_media_type", 422: "invalid_request"}
_FAILED = {500: "internal_error", 502: "backend_error", 503: "unavailable", 504: "timeout"}
_NOT_LOGGED = frozenset({"started", "attempt_started", "first_byte_at", "timestamp", "request_id", "reservation"})


@dataclass(slots=True)
class RequestRecord:
    endpoint: str
    model: str  # as the client asked
    stream: bool
    request_id: str = ""
    timestamp: float = field(default_factory=time.time)  # wall clock, when the request arrived
    started: float = field(default_factory=time.monotonic)
    attempt_started: float = 0.0  # time.monotonic() when the current attempt was sent
    first_byte_at: float | None = None
    backend: str | None = None  # id of the backend that served (or last failed); None if none was tried
    backend_type: str | None = None  # "local" | "cloud"
    zone: str | None = None
    served_model: str | None = None
    route_reason: str = ""
    retries: int = 0
    fallback: bool = False
    status: int = 0
    outcome: str = "error"  # success | error | cancelled | interrupted
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None  # what this request cost, when the backend is priced
    cost_source: str | None = None  # usage | counted | estimate | unpriced
    duration_ms: float | None = None  # set when the request ends
    error: str | None = None
    reservation: object | None = None  # the budget's hold for this request, settled when it ends

    def attempt(self, attempt: Attempt) -> None:
        backend = attempt.candidate.backend
        self.backend = backend.id
        self.backend_type = "cloud" if backend.cloud else "local"
        self.zone = backend.zone
        self.served_model = attempt.model
        self.fallback = attempt.fallback
        self.route_reason = attempt.intent.route_reason

    def end(self) -> None:
        """Fix the duration; called once, just before observers see the record."""
        self.duration_ms = round((time.monotonic() - self.started) * 1000, 1)

    def error_kind(self) -> str:
        """What kind of error ended the request, from a small fixed set (metrics' ``error_type``,
        ``/v1/stats`` ``errors_by_type``)."""
        if self.outcome == "interrupted":
            return "stream_interrupted"
        status = self.status
        if 400 <= status < 500:
            if self.backend is not None and status not in (413, 415):
                return "backend_client_error"  # a backend's own 4xx, passed through
            return _REFUSED.get(status, "invalid_request")
        return _FAILED.get(status, "internal_error" if status == 0 else "other")

    def log(self) -> None:
        level = logging.INFO if self.outcome in ("success", "cancelled") else logging.WARNING
        if not log.isEnabledFor(level):
            return
        fields = {k: getattr(self, k) for k in self.__slots__
                  if k not in _NOT_LOGGED and getattr(self, k) is not None}
        log.log(level, "%s %s -> %s %s", self.endpoint, self.model, self.status, self.outcome, extra=fields)
