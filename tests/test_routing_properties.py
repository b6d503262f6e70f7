"""Property-based tests (hypothesis) of the routing invariants of issue 5 ("Tests"):

* a request matched by a restricted policy never reaches an open backend, fallbacks included;
* strict mode never routes below ``min_tier`` (flexible only when no min-tier backend can serve);
* every attempt's backend lists the model and can serve now (healthy, below its cap, not
  asking to wait, not excluded for its error rate); the router refuses only when no
  backend is eligible, and offers to queue only for transient reasons;
* ranking is deterministic for equal inputs, ties broken by name;
* the request queue never holds more than ``max_size``, dispatches high before normal
  (FIFO within each), dispatches the moment capacity frees, times out exactly at
  ``max_wait_seconds``, and every request ends exactly once.

The router is exercised directly (``Router.plan``) with every built-in stage, built
through the plugin host as the gateway builds it. The queue runs on an event loop with a
virtual clock, so its timeouts are exact and cost no real time.
"""

from __future__ import annotations

import asyncio
import math
import selectors
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from nexus import config as config_mod
from nexus.adapters.generic import GenericAdapter
from nexus.config import QueueConfig
from nexus.errors import ModelNotFound, NexusError, ServiceUnavailable
from nexus.plugins import create_host
from nexus.quality import BackendQuality
from nexus.queue import RequestQueue
from nexus.registry import Backend, ModelInfo, Registry, Status
from nexus.routing.intent import ReconcilerContext, Requirements
from nexus.routing.router import Pipeline, Router, Unavailable
from nexus.routing.scheduling import smart_score

# -- fleets, policies and headers ------------------------------------------------------------

MODELS = ["alpha", "beta", "gamma"]
UNKNOWN = "delta"  # no backend ever lists it
ALIAS = "chat"  # an alias of alpha
# glob -> an independent oracle of what it matches
PATTERNS: dict[str, Callable[[str], bool]] = {
    "alpha": lambda m: m == "alpha",
    "a*": lambda m: m.startswith("a"),
    "*": lambda m: True,
    "b?ta": lambda m: len(m) == 4 and m[0] == "b" and m[2:] == "ta",
    "{beta,gamma}": lambda m: m in ("beta", "gamma"),
    "g*": lambda m: m.startswith("g"),
    "zzz": lambda m: m == "zzz",
}
NAMES = ["ada", "bob", "cy", "dee", "eve", "fay", "gus", "hal"]
FUTURE = 1e9  # a Retry-After that has not run out


@dataclass
class Spec:
    name: str
    zone: str
    tier: int
    priority: int
    status: Status
    max_concurrent: int | None
    pending: int
    retry_after: bool
    quality_excluded: bool
    latency_ms: float
    models: list[str]

    def usable(self) -> bool:
        """Healthy, below its cap, not asking to wait, not excluded for its error rate."""
        at_cap = self.max_concurrent is not None and self.pending >= self.max_concurrent
        return self.status is Status.HEALTHY and not at_cap and not self.retry_after and not self.quality_excluded


specs = st.builds(
    Spec,
    name=st.just(""),
    zone=st.sampled_from(["restricted", "open"]),
    tier=st.integers(1, 5),
    priority=st.sampled_from([0, 1, 10, 10, 50, 100, 150]),  # repeats make ties
    status=st.sampled_from([Status.HEALTHY] * 4 + [Status.UNHEALTHY, Status.UNKNOWN, Status.LOADING]),
    max_concurrent=st.one_of(st.none(), st.integers(1, 3)),
    pending=st.integers(0, 4),
    retry_after=st.sampled_from([False, False, False, True]),
    quality_excluded=st.sampled_from([False, False, False, True]),
    latency_ms=st.sampled_from([0.0, 50.0, 50.0, 300.0]),
    models=st.lists(st.sampled_from(MODELS), min_size=1, max_size=3, unique=True),
)
fleets = st.lists(specs, min_size=1, max_size=7).flatmap(
    lambda fleet: st.permutations(NAMES).map(
        lambda names: [Spec(**{**vars(s), "name": n}) for s, n in zip(fleet, names)]))
policies = st.lists(
    st.fixed_dictionaries(
        {"model_pattern": st.sampled_from(sorted(PATTERNS))},
        optional={"privacy": st.sampled_from(["restricted", "unrestricted"]), "min_tier": st.integers(1, 5)},
    ),
    max_size=3,
)
fallbacks = st.dictionaries(
    st.sampled_from(MODELS),
    st.lists(st.sampled_from([*MODELS, UNKNOWN]), max_size=2, unique=True),
    max_size=3,
).map(lambda d: {k: [m for m in v if m != k] for k, v in d.items()})
tier_headers = st.fixed_dictionaries({}, optional={
    "X-Nexus-Strict": st.sampled_from(["true", "", "false", "1"]),
    "X-Nexus-Flexible": st.sampled_from(["true", "true", "TRUE", "yes", "false", "1"]),  # exactly "true"
    "X-Nexus-Privacy-Zone": st.sampled_from(["open", "restricted"]),  # must change nothing
})


@dataclass
class World:
    fleet: list[Spec]
    policies: list[dict[str, Any]]
    fallbacks: dict[str, list[str]]
    headers: dict[str, str]
    strategy: str
    max_retries: int
    requested: str

    @property
    def flexible(self) -> bool:
        return "X-Nexus-Strict" not in self.headers and self.headers.get("X-Nexus-Flexible") == "true"

    def resolved(self) -> str:
        return "alpha" if self.requested == ALIAS else self.requested

    def chain(self) -> list[str]:
        primary = self.resolved()
        return [primary, *self.fallbacks.get(primary, [])]

    def policy(self, model: str) -> dict[str, Any] | None:
        return next((p for p in self.policies if PATTERNS[p["model_pattern"]](model)), None)

    def binding(self, model: str) -> tuple[bool, int | None]:
        """(restricted, min tier): the strictest of the primary's policy and ``model``'s."""
        restricted, min_tier = False, None
        for policy in (self.policy(self.resolved()), self.policy(model)):
            if policy is None:
                continue
            restricted = restricted or policy.get("privacy") == "restricted"
            if policy.get("min_tier") is not None:
                min_tier = max(min_tier or 0, policy["min_tier"])
        return restricted, min_tier

    def listing(self, model: str) -> list[Spec]:
        return [s for s in self.fleet if model in s.models]

    def eligible(self, model: str) -> list[str]:
        """Names of the backends that should serve ``model`` now (CONTRACT §10 "Tiers":
        flexible lets a lower tier serve only when no min-tier backend can serve now)."""
        restricted, min_tier = self.binding(model)
        allowed = [s for s in self.listing(model) if not restricted or s.zone == "restricted"]
        if min_tier is not None:
            at_least = [s for s in allowed if s.tier >= min_tier]
            if not self.flexible or any(s.usable() for s in at_least):
                allowed = at_least
        return [s.name for s in allowed if s.usable()]


worlds = st.builds(
    World,
    fleet=fleets,
    policies=policies,
    fallbacks=fallbacks,
    headers=tier_headers,
    strategy=st.sampled_from(["smart", "smart", "priority_only", "round_robin", "random"]),
    max_retries=st.integers(0, 3),
    requested=st.sampled_from([*MODELS, ALIAS, UNKNOWN]),
)


def build(world: World) -> Router:
    config = config_mod.build({
        "routing": {"strategy": world.strategy, "max_retries": world.max_retries, "policies": world.policies,
                    "fallbacks": world.fallbacks, "aliases": {ALIAS: "alpha"}},
        "quality": {"ttft_penalty_threshold_ms": 100},
    })
    registry = Registry()
    now = time.monotonic()
    for spec in world.fleet:
        backend_config = config_mod.BackendConfig(name=spec.name, url=f"http://{spec.name}.invalid", type="generic")
        backend = Backend(id=spec.name, name=spec.name, url=backend_config.url,
                          adapter=GenericAdapter(backend_config, None),  # type: ignore[arg-type]
                          zone=spec.zone, tier=spec.tier, priority=spec.priority,
                          max_concurrent=spec.max_concurrent, quality=BackendQuality(60.0))
        registry.add(backend)
        registry.set_models(backend, [ModelInfo(id=m) for m in spec.models])
        backend.status = spec.status
        backend.pending = spec.pending
        backend.avg_latency_ms = spec.latency_ms
        if spec.retry_after:
            backend.retry_after_until = now + FUTURE
        if spec.quality_excluded:
            backend.quality.excluded = True
            backend.quality.error_rate_1h = 0.9
            backend.quality.trial_at = math.inf  # no half-open trial during the example
    pipeline = Pipeline(create_host(load_entry_points=False).reconcilers(ReconcilerContext(config=config,
                                                                                           registry=registry)))
    return Router(registry, pipeline, config.routing)


def plan(router: Router, world: World) -> list[tuple[str, str]] | NexusError:
    headers = CIMultiDictProxy(CIMultiDict(world.headers))
    try:
        attempts = router.plan(world.requested, Requirements(), request_id="prop", headers=headers)
        return [(a.candidate.name, a.model) for a in attempts]
    except NexusError as exc:
        return exc


def outcome(result: list[tuple[str, str]] | NexusError) -> object:
    """A comparable form of a plan or a refusal."""
    if isinstance(result, NexusError):
        return type(result).__name__, result.status, result.message, result.context, result.headers
    return result


PROPERTY_SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(worlds)
def test_privacy_and_tiers_hold_on_every_attempt_including_fallbacks(world: World) -> None:
    router = build(world)
    result = plan(router, world)
    if isinstance(result, NexusError):
        return
    by_name = {s.name: s for s in world.fleet}
    chain = world.chain()
    assert result, "a plan without attempts"
    for name, model in result:
        spec = by_name[name]
        restricted, min_tier = world.binding(model)
        if restricted:
            assert spec.zone == "restricted", (name, model)
        if min_tier is not None and spec.tier < min_tier:
            assert world.flexible, f"strict mode routed {model} to tier {spec.tier} < {min_tier}"
            ge_min = [s for s in world.listing(model) if s.tier >= min_tier
                      and (not restricted or s.zone == "restricted")]
            assert not any(s.usable() for s in ge_min), "flexible overflow while a min-tier backend was free"
        assert model in spec.models
        assert spec.usable(), f"{name} cannot serve now: {spec}"
        assert model in chain


@PROPERTY_SETTINGS
@given(worlds)
def test_router_refuses_only_when_nothing_is_eligible_and_plans_exactly_the_eligible(world: World) -> None:
    router = build(world)
    result = plan(router, world)
    chain = world.chain()
    eligible = {m: world.eligible(m) for m in chain}
    first = next((m for m in chain if eligible[m]), None)
    if first is None:
        assert isinstance(result, NexusError), result
        if not world.listing(chain[0]) and len(chain) == 1:
            assert isinstance(result, ModelNotFound)
            return
        assert isinstance(result, ServiceUnavailable) and not isinstance(result, ModelNotFound)
        assert result.status == 503
        assert result.context is not None and "available_backends" in result.context
        details = result.headers.get("X-Nexus-Rejection-Details", "")
        # Offered to the queue exactly when some backend policy allows is held back only for
        # a transient reason (the scheduling stage); policy exclusions alone never queue.
        assert isinstance(result, Unavailable) == ('"reconciler":"scheduling"' in details)
        return
    assert not isinstance(result, NexusError), f"refused although {eligible[first]} could serve {first}"
    limit = world.max_retries + 1
    models_in_order = list(dict.fromkeys(model for _, model in result))
    assert models_in_order[0] == first
    assert models_in_order == [m for m in chain if eligible[m]]  # every eligible model, in chain order
    for model in models_in_order:
        planned = [name for name, m in result if m == model]
        assert len(planned) == len(set(planned)) == min(limit, len(eligible[model]))
        assert set(planned) <= set(eligible[model])


@PROPERTY_SETTINGS
@given(worlds.filter(lambda w: w.strategy in ("smart", "priority_only")))
def test_ranking_is_deterministic_with_ties_broken_by_name(world: World) -> None:
    router = build(world)
    first = plan(router, world)
    assert outcome(plan(build(world), world)) == outcome(first)  # a fresh router, same inputs
    assert outcome(plan(router, world)) == outcome(first)  # the same router again
    if isinstance(first, NexusError):
        return
    headers = CIMultiDictProxy(CIMultiDict(world.headers))
    intent = router.plan(world.requested, Requirements(), request_id="prop", headers=headers).first
    ranked = intent.ranked
    if world.strategy == "smart":
        scheduling = next(r for r in router.pipeline.reconcilers if r.name == "scheduling")
        weights = scheduling.weights  # type: ignore[attr-defined]
        keys = [(-smart_score(c, weights, 100.0), c.name) for c in ranked]
    else:
        keys = [(c.priority, c.name) for c in ranked]
    assert keys == sorted(keys)


# -- the request queue, on a virtual clock -------------------------------------------------


class _VirtualSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Never sleeps: a wait for the next timer advances the loop's clock instead."""

    loop: VirtualClockLoop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("virtual clock: nothing scheduled and nothing ready (the test would hang)")
        self.loop.now += timeout
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 1000.0
        selector = _VirtualSelector()
        selector.loop = self
        super().__init__(selector)

    def time(self) -> float:
        return self.now

    def idle(self) -> bool:
        return not self._ready  # type: ignore[attr-defined]


async def settle() -> None:
    """Run every ready callback (a chain of dispatches included) without advancing the clock."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualClockLoop)
    await asyncio.sleep(0)
    while not loop.idle():
        await asyncio.sleep(0)


@dataclass
class Sim:
    """A fleet of ``capacity`` interchangeable slots, and requests that use them like the proxy."""

    queue: RequestQueue
    capacity: int
    in_flight: int = 0
    seq: int = 0
    waiting: dict[int, tuple[str, int, float]] = field(default_factory=dict)  # rid -> (priority, seq, admitted)
    holders: list[tuple[int, asyncio.Event]] = field(default_factory=list)
    tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    ends: dict[int, list[str]] = field(default_factory=dict)
    dispatch_order: list[tuple[str, int]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def end(self, rid: int, how: str) -> None:
        self.ends.setdefault(rid, []).append(how)

    def route_for(self, rid: int) -> Callable[[], Any]:
        def route() -> Any:
            if self.in_flight >= self.capacity:
                raise Unavailable(ServiceUnavailable("all busy", context={"available_backends": []}), None)
            if rid in self.waiting:  # called by the queue's dispatch
                priority, seq, _ = self.waiting.pop(rid)
                for other, (other_priority, other_seq, _) in self.waiting.items():
                    if priority == "normal" and other_priority == "high":
                        self.violations.append(f"normal #{rid} dispatched before waiting high #{other}")
                    if other_priority == priority and other_seq < seq:
                        self.violations.append(f"#{rid} dispatched before older {priority} #{other}")
                self.dispatch_order.append((priority, seq))
            return ("plan", rid)
        return route

    async def request(self, rid: int, priority: str) -> None:
        route = self.route_for(rid)
        loop = asyncio.get_running_loop()
        try:
            try:
                route()
            except Unavailable as busy:
                self.seq += 1
                self.waiting[rid] = (priority, self.seq, loop.time())
                admitted = loop.time()
                try:
                    await self.queue.wait(route, busy, priority)
                except ServiceUnavailable as refused:
                    message = refused.message
                    if "timed out" in message:
                        if loop.time() - admitted < self.queue.max_wait - 1e-9:
                            self.violations.append(f"#{rid} timed out early")
                        self.end(rid, "timed_out")
                    elif "queue is full" in message:
                        self.end(rid, "full")
                    elif "shutting down" in message:
                        self.end(rid, "shutdown")
                    else:
                        self.end(rid, f"refused: {message}")
                    return
                finally:
                    self.waiting.pop(rid, None)
        except asyncio.CancelledError:
            self.end(rid, "cancelled")
            raise
        # Take the slot before the first await, as the proxy does.
        if self.in_flight >= self.capacity:
            self.violations.append(f"#{rid} was handed a plan with no free slot")
        self.in_flight += 1
        release = asyncio.Event()
        self.holders.append((rid, release))
        try:
            await release.wait()
        finally:
            self.in_flight -= 1
            self.queue.dispatch()  # the proxy's on_release
        self.end(rid, "served")

    def check(self, loop: VirtualClockLoop) -> None:
        queue = self.queue
        assert len(queue) <= queue.max_size, f"queue holds {len(queue)} > max_size {queue.max_size}"
        assert len(queue) == len(self.waiting), "a request left in the queue, or missing from it"
        if self.in_flight < self.capacity:
            assert not self.waiting, "a request is still waiting although a slot is free"
        for rid, (_, _, admitted) in self.waiting.items():
            assert loop.time() - admitted < queue.max_wait, f"#{rid} is waiting past its deadline"
        assert not self.violations, self.violations


ADVANCES = [0.25, 0.5, 0.999, 1.0, 1.5]  # in units of max_wait_seconds (1.0)
operations = st.lists(
    st.tuples(
        # weighted towards arrivals and releases, so that the queue fills and drains
        st.sampled_from(["arrive"] * 5 + ["finish"] * 3 + ["cancel", "advance", "grow"]),
        st.integers(0, 9),  # which request, which priority (odd: high), how long
    ),
    min_size=4,
    max_size=40,
)


async def run_queue(capacity: int, max_size: int, ops: list[tuple[str, int]]) -> Sim:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualClockLoop)
    sim = Sim(RequestQueue(QueueConfig(enabled=True, max_size=max_size, max_wait_seconds=1.0)), capacity)
    for rid, (op, arg) in enumerate(ops):
        if op == "arrive":
            sim.tasks[rid] = asyncio.ensure_future(sim.request(rid, "high" if arg % 2 else "normal"))
        elif op == "finish" and sim.holders:
            _, release = sim.holders.pop(arg % len(sim.holders))
            release.set()
        elif op == "cancel" and sim.waiting:
            victim = sorted(sim.waiting)[arg % len(sim.waiting)]
            sim.tasks[victim].cancel()
        elif op == "advance":
            await asyncio.sleep(ADVANCES[arg % len(ADVANCES)])
        elif op == "grow":  # a backend became healthy: capacity, and the queue is told
            sim.capacity += 1
            sim.queue.dispatch()
        await settle()
        sim.check(loop)
    sim.queue.close()  # shutdown
    await settle()
    assert not sim.waiting and len(sim.queue) == 0
    for _, release in sim.holders:
        release.set()
    await settle()
    await asyncio.gather(*sim.tasks.values(), return_exceptions=True)
    return sim


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.sampled_from([0, 1, 1, 2]), max_size=st.integers(1, 4), ops=operations)
def test_queue_invariants_under_any_sequence_of_arrivals_releases_cancels_and_time(
        capacity: int, max_size: int, ops: list[tuple[str, int]]) -> None:
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        sim = runner.run(run_queue(capacity, max_size, ops))
    for how in {e[0] for e in sim.ends.values()}:
        event(f"some request {how}")
    if sim.dispatch_order:
        event("dispatched from the queue")
    if len({p for p, _ in sim.dispatch_order}) == 2:
        event("both priorities dispatched")
    arrivals = [rid for rid, (op, _) in enumerate(ops) if op == "arrive"]
    assert sorted(sim.ends) == arrivals, "a request never ended"
    for rid, ends in sim.ends.items():
        assert len(ends) == 1, f"#{rid} ended {ends}"
        assert ends[0] in ("served", "timed_out", "full", "shutdown", "cancelled"), ends
    kinds = [e[0] for e in sim.ends.values()]
    assert sim.queue.timed_out == kinds.count("timed_out")
    assert sim.queue.rejected_full == kinds.count("full")
    assert sim.queue.dispatched == len(sim.dispatch_order)
    assert not sim.violations, sim.violations


def test_virtual_clock_makes_a_queue_timeout_exact() -> None:
    """The harness itself: a lone waiter times out at exactly max_wait, in no real time."""

    async def scenario() -> tuple[float, str]:
        loop = asyncio.get_running_loop()
        queue = RequestQueue(QueueConfig(max_size=1, max_wait_seconds=30.0))
        started = loop.time()
        try:
            await queue.wait(lambda: (_ for _ in ()).throw(Unavailable(ServiceUnavailable("x", context={}), None)),
                             Unavailable(ServiceUnavailable("x", context={}), None), "normal")
        except ServiceUnavailable as exc:
            return loop.time() - started, exc.headers["Retry-After"]
        raise AssertionError("not timed out")

    real = time.monotonic()
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        waited, retry_after = runner.run(scenario())
    assert waited == 30.0 and retry_after == "30"
    assert time.monotonic() - real < 1.0
