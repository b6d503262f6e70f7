"""Scheduling (order 900): drop what cannot serve now, rank the rest by the strategy."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable

from nexus.config import WeightsConfig
from nexus.registry import Status
from nexus.routing.intent import Candidate, ReconcilerContext, RoutingIntent


def smart_score(candidate: Candidate, weights: WeightsConfig) -> int:
    """Upstream §5.4: integer score over priority (lower is better), load and latency."""
    backend = candidate.backend
    priority = backend.priority
    priority = 0 if priority < 0 else 100 if priority > 100 else priority  # clamped, lower is better
    load = backend.pending if backend.pending < 100 else 100
    latency = int(backend.avg_latency_ms) // 10
    latency = latency if latency < 100 else 100
    return ((100 - priority) * weights.priority + (100 - load) * weights.load
            + (100 - latency) * weights.latency) // 100


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
        self._counter = itertools.count()
        self._rank: Callable[[list[Candidate]], tuple[list[Candidate], str]] = {
            "smart": self._smart,
            "priority_only": self._priority,
            "round_robin": self._round_robin,
            "random": self._random,
        }[routing.strategy]

    def reconcile(self, intent: RoutingIntent) -> None:
        now = 0.0
        for candidate in intent.candidates[:]:
            backend = candidate.backend
            if not backend.healthy:
                loading = backend.status is Status.LOADING
                intent.exclude(
                    candidate.id,
                    "Backend is loading its model" if loading else f"Backend unhealthy: {candidate.status}",
                    "Retry shortly" if loading else "Wait for the backend to recover or check its logs",
                    kind="unavailable",
                )
            elif backend.retry_after_until and backend.retry_after_until > (now := now or time.monotonic()):
                wait = backend.retry_after_until - now
                intent.exclude(
                    candidate.id,
                    f"Backend asked to retry after {wait:.0f}s (HTTP 429/503 Retry-After)",
                    f"Retry in {wait:.0f}s",
                    kind="unavailable",
                )
        survivors = intent.candidates
        if not survivors:
            return
        if len(survivors) == 1:
            intent.ranked = list(survivors)
            intent.route_reason = "only_healthy_backend"
            return
        ranked, intent.route_reason = self._rank(survivors)
        if not all(c.model.loaded for c in ranked):  # models in memory first (stable within each group)
            ranked = [c for c in ranked if c.model.loaded] + [c for c in ranked if not c.model.loaded]
        intent.ranked = ranked

    def _smart(self, candidates: list[Candidate]) -> tuple[list[Candidate], str]:
        weights = self.weights
        scored = sorted([(-smart_score(c, weights), c.backend.name, c) for c in candidates])  # names are unique
        best_score, best_name, _ = scored[0]
        return [c for _, _, c in scored], f"highest_score:{best_name}:{-best_score}"

    def _priority(self, candidates: list[Candidate]) -> tuple[list[Candidate], str]:
        ranked = sorted(candidates, key=lambda c: (c.priority, c.name))
        return ranked, f"priority:{ranked[0].name}:{ranked[0].priority}"

    def _round_robin(self, candidates: list[Candidate]) -> tuple[list[Candidate], str]:
        index = next(self._counter) % len(candidates)
        return candidates[index:] + candidates[:index], f"round_robin:index_{index}"

    def _random(self, candidates: list[Candidate]) -> tuple[list[Candidate], str]:
        ranked = random.sample(candidates, len(candidates))
        return ranked, f"random:{ranked[0].name}"
