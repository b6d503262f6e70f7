"""Request statistics for ``/v1/stats``: real counters, fed by every proxied request's record."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nexus.budget import Budget
    from nexus.record import RequestRecord
    from nexus.queue import RequestQueue
    from nexus.registry import Registry
    from nexus.routing.router import Pipeline


@dataclass
class _ModelStats:
    requests: int = 0
    duration_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Stats:
    """Counts outcomes: ``success``, ``error``, ``cancelled``, ``interrupted`` (a stream cut
    after its first byte), plus errors by HTTP status and per-model totals."""

    started: float = field(default_factory=time.time)
    outcomes: Counter[str] = field(default_factory=Counter)
    error_statuses: Counter[int] = field(default_factory=Counter)
    error_kinds: Counter[str] = field(default_factory=Counter)
    models: dict[str, _ModelStats] = field(default_factory=dict)

    def record(self, record: RequestRecord) -> None:
        self.outcomes[record.outcome] += 1
        if record.outcome in ("error", "interrupted"):
            self.error_kinds[record.error_kind()] += 1
        if record.outcome == "error":
            self.error_statuses[record.status] += 1
        if record.backend is None:  # refused before any backend was tried
            return
        model = self.models.setdefault(record.served_model or record.model, _ModelStats())
        model.requests += 1
        model.duration_ms += record.duration_ms or 0.0
        model.prompt_tokens += record.prompt_tokens or 0
        model.completion_tokens += record.completion_tokens or 0

    def snapshot(self, registry: Registry, queue: RequestQueue, pipeline: Pipeline,
                 budget: Budget | None = None) -> dict[str, Any]:
        view = {
            "uptime_seconds": int(time.time() - self.started),
            "requests": {
                "total": sum(self.outcomes.values()),
                "success": self.outcomes["success"],
                "errors": self.outcomes["error"],
                "cancelled": self.outcomes["cancelled"],
                "interrupted": self.outcomes["interrupted"],
                "errors_by_status": {str(k): v for k, v in sorted(self.error_statuses.items())},
                "errors_by_type": dict(sorted(self.error_kinds.items())),
            },
            "backends": [
                {
                    "id": b.id, "name": b.name, "type": b.type_name, "status": b.status.value,
                    "source": b.source, "zone": b.zone, "tier": b.tier,
                    "requests": b.total_requests, "pending": b.pending, "max_concurrent": b.max_concurrent,
                    "average_latency_ms": round(b.avg_latency_ms, 1),
                    **({"quality": b.quality.snapshot()} if b.quality.has_history else {}),
                }
                for b in sorted(registry.all(), key=lambda b: b.name)
            ],
            "models": [
                {
                    "model": name, "requests": m.requests,
                    "average_duration_ms": round(m.duration_ms / m.requests, 1),
                    "prompt_tokens": m.prompt_tokens, "completion_tokens": m.completion_tokens,
                }
                for name, m in sorted(self.models.items())
            ],
            "queue": {"depth": queue.depth(), "max_size": queue.max_size, "enabled": queue.enabled,
                      "dispatched": queue.dispatched, "timed_out": queue.timed_out,
                      "rejected_full": queue.rejected_full},
            "routing": {"stage_seconds": {k: round(v, 6) for k, v in pipeline.stage_seconds.items()}},
        }
        if budget is not None:
            view["spend"] = budget.spend_snapshot()
            limited = budget.snapshot()
            if limited is not None:
                view["budget"] = limited
        return view
