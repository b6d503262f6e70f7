"""Quality tracking (reference §5.12, §8 items 57-59; issue 5 "Build" 4): outcomes in
buckets, 1 h error rate, 24 h success rate, average TTFT, exclusion with a half-open
trial, and the TTFT penalty in smart scoring."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from nexus import config as config_mod
from nexus.adapters.generic import GenericAdapter
from nexus.errors import ServiceUnavailable
from nexus.plugins import create_host
from nexus.quality import BackendQuality
from nexus.registry import Backend, ModelInfo, Registry, Status
from nexus.routing.intent import ReconcilerContext, Requirements
from nexus.routing.router import Pipeline, Router
from nexus.testing import CHAT, BackendFactory, FakeBackend, NexusFactory, RunningNexus, backend_entry

STREAM = {**CHAT, "stream": True}
T = 29_000_000 * 60.0  # a wall-clock time on a minute boundary, for ``now=`` injection
MINUTE, HOUR = 60.0, 3600.0


def outcomes(quality: BackendQuality, ok: int = 0, failed: int = 0, *, at: float = T,
             ttft_ms: float | None = None) -> None:
    for _ in range(ok):
        quality.record(True, ttft_ms, now=at)
    for _ in range(failed):
        quality.record(False, None, now=at)


# -- BackendQuality ------------------------------------------------------------------------


def test_no_history_means_healthy_defaults_and_no_exclusion() -> None:
    quality = BackendQuality()
    quality.recompute(0.0, now=T)  # even the strictest threshold excludes nothing without failures
    assert (quality.error_rate_1h, quality.avg_ttft_ms, quality.success_rate_24h) == (0.0, 0.0, 1.0)
    assert quality.requests_1h == 0 and not quality.excluded


def test_error_rate_counts_the_last_hour_only() -> None:
    quality = BackendQuality()
    outcomes(quality, failed=5, at=T - 2 * HOUR)  # outside the hour, inside the day
    outcomes(quality, failed=1, at=T - HOUR)  # exactly one hour old: outside
    outcomes(quality, ok=3, failed=1, at=T - HOUR + MINUTE, ttft_ms=100.0)  # 59 minutes old: inside
    outcomes(quality, ok=1, failed=1, at=T + 59, ttft_ms=300.0)  # the current minute
    quality.recompute(0.9, now=T + 30)
    assert quality.requests_1h == 6
    assert quality.error_rate_1h == pytest.approx(2 / 6)
    assert quality.success_rate_24h == pytest.approx(4 / 12)
    assert quality.avg_ttft_ms == pytest.approx((3 * 100 + 300) / 4)  # failures carry no TTFT
    assert not quality.excluded


def test_the_window_moves_with_time() -> None:
    quality = BackendQuality()
    outcomes(quality, ok=1, failed=3, at=T, ttft_ms=50.0)
    quality.recompute(0.5, now=T)
    assert quality.error_rate_1h == 0.75 and quality.excluded
    quality.recompute(0.5, now=T + HOUR)  # an hour later the failures left the 1 h window
    assert quality.requests_1h == 0 and quality.error_rate_1h == 0.0 and quality.avg_ttft_ms == 0.0
    assert quality.success_rate_24h == 0.25 and not quality.excluded
    quality.recompute(0.5, now=T + 24 * HOUR - MINUTE)  # still within the day
    assert quality.success_rate_24h == 0.25
    quality.recompute(0.5, now=T + 24 * HOUR)  # and out of it
    assert quality.success_rate_24h == 1.0


def test_old_buckets_are_pruned_past_a_day() -> None:
    quality = BackendQuality()
    for minute in range(1500):
        quality.record(False, None, now=T + minute * MINUTE)
    quality.recompute(0.5, now=T + 1499 * MINUTE)
    assert quality.success_rate_24h == 0.0
    assert len(quality._buckets) <= 1440


@pytest.mark.parametrize(("ok", "failed", "threshold", "excluded"), [
    (5, 5, 0.5, True),  # exactly at the threshold: excluded (>=)
    (6, 4, 0.5, False),
    (4, 6, 0.5, True),  # item 57: 10 outcomes, 6 failures
    (99, 1, 0.0, True),  # threshold 0: any failure excludes
    (100, 0, 0.0, False),  # ... but no failure never does
    (1, 9, 1.0, False),  # threshold 1: only when every request failed
    (0, 3, 1.0, True),
])
def test_exclusion_at_threshold(ok: int, failed: int, threshold: float, excluded: bool) -> None:
    quality = BackendQuality()
    outcomes(quality, ok=ok, failed=failed)
    quality.recompute(threshold, now=T)
    assert quality.excluded is excluded
    assert quality.error_rate_1h == pytest.approx(failed / (ok + failed))


def test_exclusion_starts_the_cool_down() -> None:
    quality = BackendQuality(cooldown=60.0)
    outcomes(quality, failed=2)
    before = time.monotonic()
    quality.recompute(0.5, now=T)
    assert before + 60.0 <= quality.trial_at <= time.monotonic() + 60.0
    first_trial_at = quality.trial_at
    quality.recompute(0.5, now=T)  # still excluded: the cool-down is not pushed back
    assert quality.trial_at == first_trial_at


def test_trial_success_clears_the_record() -> None:
    quality = BackendQuality(cooldown=60.0)
    outcomes(quality, failed=4)
    quality.recompute(0.5, now=T)
    assert quality.excluded
    quality.record(True, 80.0, now=T)
    assert not quality.excluded and quality.error_rate_1h == 0.0
    quality.recompute(0.5, now=T)
    assert not quality.excluded
    assert (quality.requests_1h, quality.error_rate_1h, quality.avg_ttft_ms) == (1, 0.0, 80.0)


def test_trial_failure_restarts_the_cool_down() -> None:
    quality = BackendQuality(cooldown=60.0)
    outcomes(quality, failed=4)
    quality.recompute(0.5, now=T)
    quality.trial_at = time.monotonic() - 1  # the cool-down ran out
    before = time.monotonic()
    quality.record(False, None, now=T)
    assert quality.excluded
    assert quality.trial_at >= before + 60.0
    quality.recompute(0.5, now=T)
    assert quality.excluded and quality.error_rate_1h == 1.0


# -- the QualityGate in the pipeline -------------------------------------------------------


def build_router(*backends: tuple[str, int], retry_after: float = 60.0, **quality: Any) -> Router:
    """Healthy generic backends ``(name, priority)`` serving ``m``, with every built-in stage."""
    config = config_mod.build({"quality": {"retry_after_seconds": retry_after, **quality}})
    registry = Registry()
    for name, priority in backends:
        spec = config_mod.BackendConfig(name=name, url=f"http://{name}.invalid", type="generic", priority=priority)
        backend = Backend(id=name, name=name, url=spec.url, adapter=GenericAdapter(spec, None),  # type: ignore[arg-type]
                          zone="restricted", tier=1, priority=priority,
                          quality=BackendQuality(config.quality.retry_after_seconds))
        registry.add(backend)
        registry.set_models(backend, [ModelInfo(id="m")])
        backend.set_status(Status.HEALTHY)
    host = create_host(load_entry_points=False)
    pipeline = Pipeline(host.reconcilers(ReconcilerContext(config=config, registry=registry)))
    return Router(registry, pipeline, config.routing)


def ranked(router: Router) -> list[str]:
    return [c.name for c in router.plan("m", Requirements(), request_id="t").first.ranked]


def exclude(router: Router, name: str) -> BackendQuality:
    quality = router.registry.get(name).quality  # type: ignore[union-attr]
    outcomes(quality, ok=1, failed=3, at=time.time())
    quality.recompute(0.5)
    assert quality.excluded
    return quality


def test_gate_excludes_with_a_reason_and_lets_exactly_one_trial_through_after_the_cool_down() -> None:
    router = build_router(("a", 1), ("b", 50))
    quality = exclude(router, "a")
    assert ranked(router) == ["b"]
    try:  # the exclusion explains itself when nothing else is left
        router.registry.get("b").set_status(Status.UNHEALTHY)  # type: ignore[union-attr]
        with pytest.raises(ServiceUnavailable) as caught:
            router.plan("m", Requirements(), request_id="t")
    finally:
        router.registry.get("b").set_status(Status.HEALTHY)  # type: ignore[union-attr]
    details = caught.value.headers["X-Nexus-Rejection-Details"]
    assert '"backend":"a","reconciler":"quality"' in details and "75.0%" in details
    quality.trial_at = time.monotonic() - 0.001  # the cool-down ran out
    plan = router.plan("m", Requirements(), request_id="trial")
    assert [c.name for c in plan.first.ranked] == ["a", "b"]
    assert plan.first.annotations["quality_trial"] == "a"
    quality.start_trial()  # what the proxy does when it sends the trial request to "a"
    assert ranked(router) == ["b"]  # one trial per cool-down: the next request does not get one
    assert ranked(router) == ["b"]


def test_backends_without_failures_are_never_gated() -> None:
    router = build_router(("a", 1), ("b", 50))
    quality = router.registry.get("a").quality  # type: ignore[union-attr]
    outcomes(quality, ok=50, at=time.time())
    quality.recompute(0.0)
    assert ranked(router) == ["a", "b"]


def test_a_trial_that_was_not_used_is_not_spent() -> None:
    router = build_router(("a-preferred", 1), ("z-recovered", 90))
    quality = exclude(router, "z-recovered")
    quality.trial_at = time.monotonic() - 0.001
    attempts = list(router.plan("m", Requirements(), request_id="t"))
    assert attempts[0].candidate.name == "a-preferred"  # served there: z-recovered was not probed
    router.registry.get("a-preferred").set_status(Status.UNHEALTHY)  # type: ignore[union-attr]
    assert ranked(router) == ["z-recovered"]


# -- TTFT penalty --------------------------------------------------------------------------


@pytest.mark.parametrize(("ttft", "expected"), [
    (0.0, ["fast-start", "slow-start"]),  # no data: no penalty
    (100.0, ["fast-start", "slow-start"]),  # at the threshold: no penalty
    (150.0, ["slow-start", "fast-start"]),  # 1.5x: score halved
    (200.0, ["slow-start", "fast-start"]),  # 2x: score 0 (item 59)
])
def test_ttft_penalty_changes_the_smart_ranking(ttft: float, expected: list[str]) -> None:
    router = build_router(("fast-start", 10), ("slow-start", 40), ttft_penalty_threshold_ms=100.0)
    quality = router.registry.get("fast-start").quality  # type: ignore[union-attr]
    if ttft:
        for _ in range(3):
            quality.record(True, ttft)
        quality.recompute(0.5)
        assert quality.avg_ttft_ms == ttft
    assert ranked(router) == expected


def test_ttft_penalty_scores() -> None:
    from nexus.routing.scheduling import smart_score

    router = build_router(("a", 0))
    backend = router.registry.get("a")
    assert backend is not None
    candidate = router.candidates_for("m")[0]
    weights = config_mod.WeightsConfig(priority=50, load=30, latency=20)
    assert smart_score(candidate, weights, 100.0) == 100
    backend.quality.avg_ttft_ms = 150.0
    assert smart_score(candidate, weights, 100.0) == 50
    backend.quality.avg_ttft_ms = 200.0
    assert smart_score(candidate, weights, 100.0) == 0
    backend.quality.avg_ttft_ms = 10_000.0
    assert smart_score(candidate, weights, 100.0) == 0
    assert smart_score(candidate, weights, 0.0) == 100  # threshold 0: penalty off


# -- end to end ----------------------------------------------------------------------------


async def chat(http: aiohttp.ClientSession, gw: RunningNexus, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    async with http.post(f"{gw.url}/v1/chat/completions", json=body or CHAT) as resp:
        await resp.read()
        return resp.status, resp.headers


def recompute(gw: RunningNexus) -> None:
    """What the gateway's quality loop does every ``metrics_interval_seconds``."""
    threshold = gw.gateway.config.quality.error_rate_threshold
    for backend in gw.gateway.registry.all():
        backend.quality.recompute(threshold)


async def stats_by_backend(http: aiohttp.ClientSession, gw: RunningNexus) -> dict[str, Any]:
    async with http.get(f"{gw.url}/v1/stats") as resp:
        return {b["id"]: b for b in (await resp.json())["backends"]}


def quality_view(entry: dict[str, Any]) -> dict[str, Any]:
    """The quality fields of one ``/v1/stats`` backend (nested or flat, as upstream)."""
    return entry.get("quality") or entry


async def test_failing_backend_is_excluded_after_a_recompute_and_not_even_tried(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    flaky = await fake_backend(name="a-flaky", mode="status:500")
    good = await fake_backend(name="b-good")
    gw = await nexus({"backends": [backend_entry(flaky, priority=1), backend_entry(good, priority=50)]})
    for _ in range(3):  # each request tries the flaky backend first, then fails over
        status, headers = await chat(http, gw)
        assert (status, headers["X-Nexus-Backend"], headers["X-Nexus-Retries"]) == (200, "b-good", "1")
    assert len(flaky.chats) == 3
    recompute(gw)
    for _ in range(3):
        status, headers = await chat(http, gw)
        assert (status, headers["X-Nexus-Backend"]) == (200, "b-good")
        assert "X-Nexus-Retries" not in headers
        assert headers["X-Nexus-Route-Reason"] == "capability-match"
    assert len(flaky.chats) == 3  # never tried while excluded
    stats = await stats_by_backend(http, gw)
    assert quality_view(stats["a-flaky"])["error_rate_1h"] == 1.0
    assert quality_view(stats["a-flaky"])["excluded"] is True
    assert quality_view(stats["b-good"])["error_rate_1h"] == 0.0
    assert quality_view(stats["b-good"])["success_rate_24h"] == 1.0


async def test_error_rate_from_recorded_outcomes_shows_in_stats(fake_backend: BackendFactory, nexus: NexusFactory,
                                                                 http: aiohttp.ClientSession) -> None:
    """Item 57: 10 outcomes, 6 failures: excluded, and ``/v1/stats`` shows about 0.6."""
    x = await fake_backend(name="x")
    y = await fake_backend(name="y")
    gw = await nexus({"backends": [backend_entry(x, priority=1), backend_entry(y, priority=50)]})
    quality = gw.gateway.registry.get("x").quality  # type: ignore[union-attr]
    for i in range(10):
        quality.record(i >= 6, 20.0 if i >= 6 else None)
    recompute(gw)
    status, headers = await chat(http, gw)
    assert (status, headers["X-Nexus-Backend"]) == (200, "y")
    view = quality_view((await stats_by_backend(http, gw))["x"])
    assert view["error_rate_1h"] == pytest.approx(0.6)
    assert view["requests_1h"] == 10
    assert x.chats == []


async def test_stats_leave_out_quality_fields_of_a_backend_without_history(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(name="idle")
    gw = await nexus({"backends": [backend_entry(backend)]})
    recompute(gw)
    entry = (await stats_by_backend(http, gw))["idle"]
    assert "error_rate_1h" not in entry and "error_rate_1h" not in (entry.get("quality") or {})


async def test_half_open_trial_failure_costs_the_client_nothing_and_success_brings_it_back(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    flaky = await fake_backend(name="a-flaky", mode="status:500")
    good = await fake_backend(name="b-good")
    gw = await nexus({"quality": {"retry_after_seconds": 60},
                      "backends": [backend_entry(flaky, priority=1), backend_entry(good, priority=50)]})
    for _ in range(2):
        await chat(http, gw)
    recompute(gw)
    quality = gw.gateway.registry.get("a-flaky").quality  # type: ignore[union-attr]
    assert quality.excluded and len(flaky.chats) == 2

    quality.trial_at = time.monotonic() - 0.001  # the cool-down ran out; still broken
    status, headers = await chat(http, gw)
    assert (status, headers["X-Nexus-Backend"], headers["X-Nexus-Retries"]) == (200, "b-good", "1")
    assert len(flaky.chats) == 3  # the one trial
    assert quality.excluded and quality.trial_at > time.monotonic() + 50  # cool-down restarted
    status, headers = await chat(http, gw)
    assert "X-Nexus-Retries" not in headers and len(flaky.chats) == 3

    flaky.mode = "ok"  # recovered
    quality.trial_at = time.monotonic() - 0.001
    status, headers = await chat(http, gw)
    assert (status, headers["X-Nexus-Backend"]) == (200, "a-flaky")
    assert not quality.excluded
    recompute(gw)
    assert not quality.excluded
    for _ in range(2):  # back in normal rotation: it wins on priority again
        status, headers = await chat(http, gw)
        assert (status, headers["X-Nexus-Backend"]) == (200, "a-flaky")


async def test_half_open_trial_comes_after_the_configured_cool_down(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    flaky = await fake_backend(name="a-flaky", mode="status:500")
    good = await fake_backend(name="b-good")
    gw = await nexus({"quality": {"retry_after_seconds": 0.15},
                      "backends": [backend_entry(flaky, priority=1), backend_entry(good, priority=50)]})
    await chat(http, gw)
    recompute(gw)
    quality = gw.gateway.registry.get("a-flaky").quality  # type: ignore[union-attr]
    assert quality.excluded
    flaky.mode = "ok"  # recovered, but the cool-down is not over yet
    status, headers = await chat(http, gw)
    assert (status, headers["X-Nexus-Backend"]) == (200, "b-good") and len(flaky.chats) == 1
    await asyncio.sleep(max(0.0, quality.trial_at - time.monotonic()))  # the cool-down itself is under test
    status, headers = await chat(http, gw)
    assert (status, headers["X-Nexus-Backend"]) == (200, "a-flaky")
    assert not quality.excluded


async def test_concurrent_requests_share_a_single_half_open_trial(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    stuck = await fake_backend(name="a-stuck", mode="hang")  # each attempt there ends in a timeout
    flaky = await fake_backend(name="z-flaky", mode="status:500")
    gw = await nexus({"server": {"request_timeout_seconds": 0.2},
                      "backends": [backend_entry(stuck, priority=1), backend_entry(flaky, priority=90)]})
    quality = gw.gateway.registry.get("z-flaky").quality  # type: ignore[union-attr]
    outcomes(quality, failed=3, at=time.time())
    recompute(gw)
    assert quality.excluded
    quality.trial_at = time.monotonic() - 0.001  # the cool-down ran out
    results = await asyncio.gather(chat(http, gw), chat(http, gw), chat(http, gw))
    assert all(status in (502, 504) for status, _ in results)  # every attempt failed either way
    assert len(stuck.chats) == 3
    assert len(flaky.chats) == 1  # one trial, not one per request routed while it was due


async def test_gateway_quality_loop_recomputes_on_its_interval(fake_backend: BackendFactory, nexus: NexusFactory,
                                                               http: aiohttp.ClientSession) -> None:
    flaky = await fake_backend(name="a-flaky", mode="status:500")
    good = await fake_backend(name="b-good")
    gw = await nexus({"quality": {"metrics_interval_seconds": 0.01, "error_rate_threshold": 0.9},
                      "backends": [backend_entry(flaky, priority=1), backend_entry(good, priority=50)]})
    await chat(http, gw)
    quality = gw.gateway.registry.get("a-flaky").quality  # type: ignore[union-attr]
    async with asyncio.timeout(2):  # no event to await: a short bounded poll on the loop's result
        while not quality.excluded:
            await asyncio.sleep(0.005)
    assert quality.error_rate_1h == 1.0


async def test_ttft_penalty_moves_traffic_end_to_end(fake_backend: BackendFactory, nexus: NexusFactory,
                                                     http: aiohttp.ClientSession) -> None:
    sluggish = await fake_backend(name="a-sluggish")
    snappy = await fake_backend(name="b-snappy")
    gw = await nexus({"quality": {"ttft_penalty_threshold_ms": 100},
                      "backends": [backend_entry(sluggish, priority=1), backend_entry(snappy, priority=20)]})
    status, headers = await chat(http, gw)
    assert headers["X-Nexus-Backend"] == "a-sluggish"
    quality = gw.gateway.registry.get("a-sluggish").quality  # type: ignore[union-attr]
    for _ in range(5):
        quality.record(True, 250.0)
    recompute(gw)
    assert quality.avg_ttft_ms > 200.0
    for _ in range(2):
        status, headers = await chat(http, gw)
        assert (status, headers["X-Nexus-Backend"]) == (200, "b-snappy")


class LateFirstByte(FakeBackend):
    """A stream whose first event waits for ``first_byte``; the rest follows at once."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.first_byte = asyncio.Event()

    async def _stream(self, request: web.Request, model: str, include_usage: bool = False) -> web.StreamResponse:
        await self.first_byte.wait()
        return await super()._stream(request, model)


async def test_stream_ttft_is_the_time_to_the_first_event_not_to_the_end(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    pause = 0.25
    late = await LateFirstByte(name="late").start()
    slow = await fake_backend(name="slow", mode="slow")  # first event at once, then a pause
    try:
        gw = await nexus({"backends": [backend_entry(late), backend_entry(slow, models=["slow-model"])]})
        request = asyncio.ensure_future(chat(http, gw, STREAM))
        await late.got_request.wait()
        await asyncio.sleep(pause)  # the time being measured: nothing to await instead
        late.first_byte.set()
        status, _ = await request
        assert status == 200

        async with http.post(f"{gw.url}/v1/chat/completions", json={**STREAM, "model": "slow-model"}) as resp:
            await resp.content.readuntil(b"\n\n")
            await asyncio.sleep(pause)  # a long generation after the first token
            slow.release.set()
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        recompute(gw)
        late_ttft = gw.gateway.registry.get("late").quality.avg_ttft_ms  # type: ignore[union-attr]
        slow_ttft = gw.gateway.registry.get("slow").quality.avg_ttft_ms  # type: ignore[union-attr]
        assert late_ttft >= pause * 1000
        assert 0 < slow_ttft < pause * 1000  # not the whole stream's duration (upstream's quirk)
    finally:
        await late.stop()


async def test_streams_and_failed_attempts_count_in_quality(fake_backend: BackendFactory, nexus: NexusFactory,
                                                            http: aiohttp.ClientSession) -> None:
    cut = await fake_backend(name="cut", mode="cut")
    broken = await fake_backend(name="broken", models=["other"], mode="status:503")
    gw = await nexus({"routing": {"max_retries": 0},
                      "backends": [backend_entry(cut), backend_entry(broken)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=STREAM) as resp:
        assert b"[DONE]" not in await resp.read()  # cut after its first byte: a failure
    status, _ = await chat(http, gw, {**CHAT, "model": "other"})
    assert status == 502
    recompute(gw)
    for name in ("cut", "broken"):
        quality = gw.gateway.registry.get(name).quality  # type: ignore[union-attr]
        assert (quality.requests_1h, quality.error_rate_1h) == (1, 1.0), name
        assert quality.excluded


def test_quality_config_is_validated() -> None:
    for key, value in (("error_rate_threshold", 1.5), ("error_rate_threshold", -0.1),
                       ("retry_after_seconds", 0), ("metrics_interval_seconds", 0),
                       ("ttft_penalty_threshold_ms", -1)):
        with pytest.raises(config_mod.ConfigError, match=rf"quality\.{key}"):
            config_mod.build({"quality": {key: value}})
