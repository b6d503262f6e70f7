"""Routing: strategies, priority, deterministic ties, aliases, and the pipeline contract."""

from __future__ import annotations

from collections import Counter

import aiohttp
import pytest

from nexus import config as config_mod
from nexus.adapters.generic import GenericAdapter
from nexus.config import BackendConfig
from nexus.registry import Backend, ModelInfo, Registry, Status
from nexus.routing.analysis import RequestAnalysis
from nexus.routing.intent import ReconcilerContext, Requirements, RoutingIntent
from nexus.routing.router import Pipeline, Router
from nexus.routing.scheduling import Scheduling, smart_score
from nexus.testing import CHAT, BackendFactory, NexusFactory, backend_entry


def make_registry(*specs: tuple[str, int], model: str = "m", status: Status = Status.HEALTHY) -> Registry:
    registry = Registry()
    for name, priority in specs:
        spec = BackendConfig(name=name, url=f"http://{name}.invalid", type="generic", priority=priority)
        backend = Backend(id=name, name=name, url=spec.url, adapter=GenericAdapter(spec, None),  # type: ignore[arg-type]
                          zone="restricted", tier=1, priority=priority)
        backend.status = status
        registry.add(backend)
        registry.set_models(backend, [ModelInfo(id=model, context_length=4096)])
    return registry


def make_router(registry: Registry, *extra_stages: object, **routing: object) -> Router:
    """A router with the built-in stages (request analysis, scheduling) plus ``extra_stages``."""
    config = config_mod.build({"routing": routing})
    context = ReconcilerContext(config=config, registry=registry)
    stages = [Scheduling(context), RequestAnalysis(context), *extra_stages]
    return Router(registry, Pipeline(stages), config.routing)  # type: ignore[arg-type]


def ranked_names(router: Router, model: str = "m", requirements: Requirements | None = None) -> list[str]:
    plan = router.plan(model, requirements or Requirements(), request_id="t")
    return [c.name for c in plan.first.ranked]


def test_pipeline_runs_in_declared_order_not_registration_order() -> None:
    registry = make_registry(("a", 50))
    router = make_router(registry)
    assert [r.name for r in router.pipeline.reconcilers] == ["request_analysis", "scheduling"]


def test_smart_score_matches_upstream_worked_examples() -> None:
    registry = make_registry(("a", 1))
    backend = registry.get("a")
    assert backend is not None
    backend.avg_latency_ms = 50
    weights = config_mod.WeightsConfig(priority=50, load=30, latency=20)
    candidate = RoutingIntent(request_id="", requested_model="m", model="m", requirements=Requirements(),
                              candidates=[]).candidates
    from nexus.routing.intent import Candidate

    assert smart_score(Candidate(backend, backend.models["m"]), weights) == 98
    backend.priority, backend.avg_latency_ms = 0, 0
    assert smart_score(Candidate(backend, backend.models["m"]), weights) == 100
    backend.priority, backend.pending, backend.avg_latency_ms = 500, 500, 5000
    assert smart_score(Candidate(backend, backend.models["m"]), weights) == 0
    assert candidate == []


def test_smart_prefers_lower_priority_and_breaks_ties_by_name() -> None:
    router = make_router(make_registry(("c", 10), ("b", 50), ("a", 50)))
    assert ranked_names(router) == ["c", "a", "b"]
    plan = router.plan("m", Requirements(), request_id="t")
    assert plan.first.route_reason == "highest_score:c:95"


def test_smart_prefers_less_loaded_backend() -> None:
    registry = make_registry(("a", 50), ("b", 50))
    backend_a = registry.get("a")
    assert backend_a is not None
    backend_a.pending = 40
    assert ranked_names(make_router(registry)) == ["b", "a"]


def test_priority_only_strategy() -> None:
    router = make_router(make_registry(("x", 3), ("y", 1), ("z", 1)), strategy="priority_only")
    assert ranked_names(router) == ["y", "z", "x"]


def test_round_robin_distributes_evenly() -> None:
    router = make_router(make_registry(("a", 1), ("b", 1), ("c", 1)), strategy="round_robin")
    firsts = Counter(ranked_names(router)[0] for _ in range(6))
    assert firsts == {"a": 2, "b": 2, "c": 2}


def test_random_strategy_returns_every_candidate() -> None:
    router = make_router(make_registry(("a", 1), ("b", 1), ("c", 1)), strategy="random")
    assert sorted(ranked_names(router)) == ["a", "b", "c"]


def test_only_candidate_reason() -> None:
    router = make_router(make_registry(("a", 1)), strategy="round_robin")
    assert router.plan("m", Requirements(), request_id="t").first.route_reason == "only_healthy_backend"


def test_unhealthy_and_unknown_backends_are_excluded() -> None:
    registry = make_registry(("a", 1), ("b", 2))
    backend_a = registry.get("a")
    assert backend_a is not None
    backend_a.status = Status.UNKNOWN
    assert ranked_names(make_router(registry)) == ["b"]


def test_context_length_excludes_small_backends_only() -> None:
    registry = make_registry(("small", 1))
    big = make_registry(("big", 2)).get("big")
    assert big is not None
    registry.add(big)
    registry.set_models(big, [ModelInfo(id="m", context_length=100_000)])
    assert ranked_names(make_router(registry), requirements=Requirements(estimated_tokens=10_000)) == ["big"]


def test_alias_chain_stops_after_three_hops() -> None:
    registry = make_registry(("d-backend", 1), model="d")
    router = make_router(registry, aliases={"a": "b", "b": "c", "c": "d", "d": "e"})
    plan = router.plan("a", Requirements(), request_id="t")
    assert plan.first.model == "d"
    assert plan.first.requested_model == "a"


def test_retries_walk_the_ranking_then_fallbacks() -> None:
    registry = make_registry(("a", 1), ("b", 2), ("c", 3))
    fb = make_registry(("f", 1), model="small").get("f")
    assert fb is not None
    registry.add(fb)
    registry.set_models(fb, [ModelInfo(id="small")])
    router = make_router(registry, max_retries=1, fallbacks={"m": ["small"]})
    attempts = list(router.plan("m", Requirements(), request_id="t"))
    assert [(a.candidate.name, a.model, a.fallback) for a in attempts] == [
        ("a", "m", False), ("b", "m", False), ("f", "small", True)]


class ExcludeEverything:
    name = "exclude_everything"
    order = 150

    def reconcile(self, intent: RoutingIntent) -> None:
        for candidate in list(intent.candidates):
            intent.exclude(candidate.id, "policy says no", "ask an admin")


def test_exclusions_are_final_and_recorded_with_their_stage() -> None:
    router = make_router(make_registry(("a", 1)), ExcludeEverything())
    with pytest.raises(Exception) as caught:
        router.plan("m", Requirements(), request_id="t")
    assert caught.value.status == 503  # type: ignore[attr-defined]
    assert "exclude_everything" in caught.value.headers["X-Nexus-Rejection-Reasons"]  # type: ignore[attr-defined]


async def test_configured_priority_is_honoured_end_to_end(fake_backend: BackendFactory, nexus: NexusFactory,
                                                          http: aiohttp.ClientSession) -> None:
    low = await fake_backend(name="low")
    high = await fake_backend(name="high")
    gw = await nexus({"routing": {"strategy": "priority_only"},
                      "backends": [backend_entry(low, priority=90), backend_entry(high, priority=5)]})
    for _ in range(3):
        async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.headers["X-Nexus-Backend"] == "high"
    assert len(low.chats) == 0


async def test_round_robin_end_to_end(fake_backend: BackendFactory, nexus: NexusFactory,
                                      http: aiohttp.ClientSession) -> None:
    backends = [await fake_backend(name=n) for n in ("a", "b", "c")]
    gw = await nexus({"routing": {"strategy": "round_robin"}, "backends": [backend_entry(b) for b in backends]})
    for _ in range(6):
        async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
    assert [len(b.chats) for b in backends] == [2, 2, 2]


class Broken:
    name = "broken"
    order = 300

    def reconcile(self, intent: RoutingIntent) -> None:
        raise RuntimeError("bug in a third-party stage")


class LateStage:
    name = "late"
    order = 950

    def reconcile(self, intent: RoutingIntent) -> None:
        intent.exclude("a", "after scheduling")


def test_a_failing_stage_fails_closed_with_a_clear_error() -> None:
    router = make_router(make_registry(("a", 1)), Broken())
    with pytest.raises(Exception) as caught:
        router.plan("m", Requirements(), request_id="t")
    assert caught.value.status == 500  # type: ignore[attr-defined]
    assert "Routing stage 'broken' failed" in str(caught.value)


def test_a_stage_after_scheduling_narrows_the_ranking() -> None:
    router = make_router(make_registry(("a", 1), ("b", 2)), LateStage())
    assert [c.name for c in router.plan("m", Requirements(), request_id="t").first.ranked] == ["b"]
