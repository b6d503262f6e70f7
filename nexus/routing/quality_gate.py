"""Quality (order 600): keep requests away from backends that keep failing (reference §5.12)."""

from __future__ import annotations

import time

from nexus.routing.intent import ReconcilerContext, RoutingIntent


class QualityGate:
    """Excludes backends whose 1 h error rate reached ``quality.error_rate_threshold``.

    Half-open: once ``quality.retry_after_seconds`` have passed, one request may try the
    backend again (its outcome decides: success clears the record, failure restarts
    the cool-down). Backends with no recent failures are never excluded.
    """

    name = "quality"
    order = 600

    def __init__(self, context: ReconcilerContext) -> None:
        self.threshold = context.config.quality.error_rate_threshold

    def reconcile(self, intent: RoutingIntent) -> None:
        now = 0.0
        for candidate in intent.candidates[:]:
            quality = candidate.backend.quality
            if not quality.excluded:
                continue
            now = now or time.monotonic()
            if now >= quality.trial_at:  # eligible for the one trial; spent only if it is tried
                intent.annotate("quality_trial", candidate.id)
                continue
            intent.exclude(
                candidate.id,
                f"Error rate {quality.error_rate_1h:.1%} over the last hour reached the threshold "
                f"{self.threshold:.1%}",
                f"Check the backend; one trial request will be let through in {quality.trial_at - now:.0f}s",
                kind="policy",
            )
