"""Scheduling (order 900): drop what cannot serve now, rank the rest by the strategy."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable

from nexus.config import WeightsConfig
from nexus.registry import Status
from nexus.routing.intent import Candidate, ReconcilerContext, RoutingIntent


def smart_score(candidate: Candidate, weights: WeightsConfig, ttft_threshold_ms: float = 0.0) -> int:
    """Upstream §5.4: integer score over priority (lower is better), load and latency,
    less the TTFT penalty: above ``ttft_threshold_ms`` (0: off) the score shrinks in
    proportion, down to 0 at twice the threshold."""
    return smart_scores([candidate], weights.priority, weights.load, weights.latency, ttft_threshold_ms)[0]


def smart_scores(candidates: list[Candidate], w_priority: int, w_load: int, w_latency: int,
                 ttft_threshold_ms: float) -> list[int]:
    """:func:`smart_score` of every candidate, in one pass (this runs for every request)."""
    scores = [
        ((100 - (0 if (p := c.priority) < 0 else 100 if p > 100 else p)) * w_priority
         + (100 - (n if (n := (b := c.backend).pending) < 100 else 100)) * w_load
         + (100 - (ms if (ms := int(b.avg_latency_ms) // 10) < 100 else 100)) * w_latency) // 100
        for c in candidates
    ]
    if ttft_threshold_ms:
        for i, c in enumerate(candidates):
            ttft = c.backend.quality.avg_ttft_ms
            if ttft > ttft_threshold_ms:
                scores[i] -= int(scores[i] * min((ttft - ttft_threshold_ms) / ttft_threshold_ms, 1.0))
    return scores


class Scheduling:
    """Excludes non-healthy candidates, then orders the survivors best first.

    Strategies: ``smart`` (score, ties by name), ``priority_only`` (priority, then
    name), ``round_robin`` (rotation by one global counter), ``random``.
    """

    name = "scheduling"
    order = 900

    def __init__(self, context: ReconcilerContext) -> None:
        routing = context.config.routing
        self.weights = routing.weights
        self.ttft_threshold = context.config.quality.ttft_penalty_threshold_ms
        self._counter = itertools.count()
        self._rank: Callable[[list[Candidate]], tuple[list[Candidate], str]] = {
            "smart": self._smart,
            "priority_only": self._priority,
            "round_robin": self._round_robin,
            "random": self._random,
        }[routing.strategy]

    def reconcile(self, intent: RoutingIntent) -> None:
        now = 0.0
        healthy = Status.HEALTHY
        for candidate in intent.candidates:
            backend = candidate.backend
            cap = backend.max_concurrent
            if backend.status is healthy and (cap is None or backend.pending < cap) and not backend.retry_after_until:
                continue  # the common case, checked without a call
            if not backend.healthy:
                loading = backend.status is Status.LOADING
                intent.exclude(
                    candidate.id,
                    "Backend is loading its model" if loading else f"Backend unhealthy: {candidate.status}",
                    "Retry shortly" if loading else "Wait for the backend to recover or check its logs",
                    kind="unavailable",
                )
            elif backend.at_capacity:
                intent.exclude(
                    candidate.id,
                    f"Backend at capacity ({backend.pending}/{backend.max_concurrent} requests)",
                    "Wait for a request to finish (the request is queued when the queue is on)",
                    kind="unavailable",
                )
            elif backend.retry_after_until and backend.retry_after_until > (now := now or time.monotonic()):
                wait = backend.retry_after_until - now
                intent.exclude(
                    candidate.id,
                    f"Backend asked to retry after {wait:.0f}s (HTTP 429/503 Retry-After)",
                    f"Retry in {wait:.0f}s",
                    kind="unavailable",
                    retry_in=wait,
                )
        survivors = intent.candidates
        if not survivors:
            return
        if len(survivors) == 1:
            intent.ranked = list(survivors)
            intent.route_reason = "only_healthy_backend"
            return
        factor = intent.annotations.get("cloud_score_factor")  # set by the budget stage at its soft limit
        if factor is not None and self._rank == self._smart:
            ranked, intent.route_reason = self._smart(survivors, factor)
        else:
            ranked, intent.route_reason = self._rank(survivors)
        if not all([c.model.loaded for c in ranked]):  # models in memory first (stable within each group)
            ranked = [c for c in ranked if c.model.loaded] + [c for c in ranked if not c.model.loaded]
        intent.ranked = ranked

    def _smart(self, candidates: list[Candidate], cloud_factor: float = 1.0) -> tuple[list[Candidate], str]:
        w = self.weights
        scores = smart_scores(candidates, w.priority, w.load, w.latency, self.ttft_threshold)
        if cloud_factor != 1.0:
            scores = [int(s * cloud_factor) if c.backend.cloud else s for s, c in zip(scores, candidates)]
        order = sorted(range(len(candidates)), key=scores.__getitem__, reverse=True)  # stable: ties keep name order
        ranked = [candidates[i] for i in order]
        return ranked, f"highest_score:{ranked[0].name}:{scores[order[0]]}"

    def _priority(self, candidates: list[Candidate]) -> tuple[list[Candidate], str]:
        ranked = sorted(candidates, key=lambda c: (c.priority, c.name))
        return ranked, f"priority:{ranked[0].name}:{ranked[0].priority}"

    def _round_robin(self, candidates: list[Candidate]) -> tuple[list[Candidate], str]:
        index = next(self._counter) % len(candidates)
        return candidates[index:] + candidates[:index], f"round_robin:index_{index}"

    def _random(self, candidates: list[Candidate]) -> tuple[list[Candidate], str]:
        ranked = random.sample(candidates, len(candidates))
        return ranked, f"random:{ranked[0].name}"
