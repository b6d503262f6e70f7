"""Quality tracking (reference §5.12, F16): per-backend outcomes in one-minute buckets.

Every attempt records its outcome (success, time to first token). Every
``quality.metrics_interval_seconds`` the checker recomputes the 1 h error rate, the 1 h
average TTFT and the 24 h success rate. A backend whose 1 h error rate reaches
``quality.error_rate_threshold`` is excluded from routing; after
``quality.retry_after_seconds`` one trial request may reach it (half-open): success clears
its record, failure restarts the cool-down. So a recovered backend is not shunned for an
hour.
"""

from __future__ import annotations

import time
from collections import deque

from nexus.state.base import QualityBucket

_HOUR, _DAY = 60, 1440  # in one-minute buckets


class _Bucket:
    __slots__ = ("minute", "ok", "failed", "ttft_sum", "ttft_count")

    def __init__(self, minute: int) -> None:
        self.minute = minute
        self.ok = self.failed = self.ttft_count = 0
        self.ttft_sum = 0.0


class BackendQuality:
    """Outcomes of one backend. Written on the event loop only."""

    __slots__ = ("_buckets", "_cooldown", "error_rate_1h", "avg_ttft_ms", "success_rate_24h", "requests_1h",
                 "excluded", "trial_at")

    def __init__(self, cooldown: float = 60.0) -> None:
        self._cooldown = cooldown  # quality.retry_after_seconds
        self._buckets: deque[_Bucket] = deque()
        self.error_rate_1h = 0.0
        self.avg_ttft_ms = 0.0
        self.success_rate_24h = 1.0
        self.requests_1h = 0
        self.excluded = False
        self.trial_at = 0.0  # time.monotonic() from which one trial request may pass

    def record(self, ok: bool, ttft_ms: float | None, *, now: float | None = None) -> None:
        """One attempt's outcome. An excluded backend's trial decides whether it is back."""
        if self.excluded:
            if ok:
                self.reset()
            else:
                self.trial_at = time.monotonic() + self._cooldown
        minute = int((now if now is not None else time.time()) // 60)
        if not self._buckets or self._buckets[-1].minute != minute:
            self._buckets.append(_Bucket(minute))
            while len(self._buckets) > _DAY:
                self._buckets.popleft()
        bucket = self._buckets[-1]
        if ok:
            bucket.ok += 1
        else:
            bucket.failed += 1
        if ttft_ms is not None:
            bucket.ttft_sum += ttft_ms
            bucket.ttft_count += 1

    def export(self) -> list[QualityBucket]:
        """The minute buckets, for the state store (quality history survives a restart)."""
        return [QualityBucket(b.minute, b.ok, b.failed, b.ttft_sum, b.ttft_count) for b in self._buckets]

    def restore(self, buckets: list[QualityBucket], *, now: float | None = None) -> None:
        """Put back stored buckets of the last 24 h (before any new outcome is recorded)."""
        oldest = int((now if now is not None else time.time()) // 60) - _DAY
        for stored in buckets:
            if stored.minute > oldest and (not self._buckets or stored.minute > self._buckets[-1].minute):
                bucket = _Bucket(stored.minute)
                bucket.ok, bucket.failed = stored.ok, stored.failed
                bucket.ttft_sum, bucket.ttft_count = stored.ttft_sum, stored.ttft_count
                self._buckets.append(bucket)

    def start_trial(self) -> None:
        """An excluded backend is being tried: no other request may try it until the
        outcome is known or the cool-down passes again."""
        if self.excluded:
            self.trial_at = time.monotonic() + self._cooldown

    @property
    def has_history(self) -> bool:
        return bool(self._buckets)

    def blocks(self, now: float) -> bool:
        """Excluded, with no trial due yet (``now`` is ``time.monotonic()``)."""
        return self.excluded and now < self.trial_at

    def reset(self) -> None:
        self._buckets.clear()
        self.excluded = False
        self.error_rate_1h = self.avg_ttft_ms = 0.0
        self.success_rate_24h = 1.0
        self.requests_1h = 0

    def recompute(self, threshold: float, *, now: float | None = None) -> None:
        minute = int((now if now is not None else time.time()) // 60)
        ok_1h = failed_1h = ok_24h = failed_24h = ttft_n = 0
        ttft_sum = 0.0
        for bucket in self._buckets:
            age = minute - bucket.minute
            if age >= _DAY:
                continue
            ok_24h += bucket.ok
            failed_24h += bucket.failed
            if age < _HOUR:
                ok_1h += bucket.ok
                failed_1h += bucket.failed
                ttft_sum += bucket.ttft_sum
                ttft_n += bucket.ttft_count
        self.requests_1h = ok_1h + failed_1h
        self.error_rate_1h = failed_1h / self.requests_1h if self.requests_1h else 0.0
        self.avg_ttft_ms = ttft_sum / ttft_n if ttft_n else 0.0
        self.success_rate_24h = ok_24h / (ok_24h + failed_24h) if ok_24h + failed_24h else 1.0
        should_exclude = failed_1h > 0 and self.error_rate_1h >= threshold
        if should_exclude and not self.excluded:
            self.trial_at = time.monotonic() + self._cooldown
        self.excluded = should_exclude

    def snapshot(self) -> dict[str, object]:
        return {
            "error_rate_1h": round(self.error_rate_1h, 4),
            "avg_ttft_ms": round(self.avg_ttft_ms, 1),
            "success_rate_24h": round(self.success_rate_24h, 4),
            "requests_1h": self.requests_1h,
            "excluded": self.excluded,
        }
