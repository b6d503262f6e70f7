"""Concurrency caps and the request queue (reference §5.13, §8 items 64-68; CONTRACT §4):
wait for capacity, dispatch the moment it frees, priorities, bounds, timeouts, shutdown,
clients that give up, and what is never queued."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from nexus.config import QueueConfig
from nexus.errors import ServiceUnavailable
from nexus.queue import RequestQueue, priority_of
from nexus.registry import Status
from nexus.routing.router import Unavailable
from nexus.testing import CHAT, BackendFactory, NexusFactory, RunningNexus, backend_entry

STREAM = {**CHAT, "stream": True}
NEXUS_HEADERS = ("X-Nexus-Backend", "X-Nexus-Backend-Type", "X-Nexus-Route-Reason", "X-Nexus-Privacy-Zone",
                 "X-Request-Id")


def say(text: str, **extra: Any) -> dict[str, Any]:
    """A chat whose message identifies the request at the backend."""
    return {**CHAT, "messages": [{"role": "user", "content": text}], **extra}


def said(backend: Any) -> list[str]:
    return [json.loads(r.body)["messages"][0]["content"] for r in backend.chats]


async def chat(http: aiohttp.ClientSession, gw: RunningNexus, body: dict[str, Any] | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    async with http.post(f"{gw.url}/v1/chat/completions", json=body or CHAT, headers=headers or {}) as resp:
        return resp.status, resp.headers, await resp.read()


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """A short bounded poll, for states no event announces (a request entering the queue)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.002)


def depth(gw: RunningNexus) -> int:
    return len(gw.gateway.queue)


async def capped(fake_backend: BackendFactory, nexus: NexusFactory, *, queue: dict[str, Any] | None = None,
                 **raw: Any) -> tuple[RunningNexus, Any]:
    """One slow-streaming backend with ``max_concurrent = 1``."""
    backend = await fake_backend(mode="slow")
    gw = await nexus({"queue": queue or {}, "backends": [backend_entry(backend, max_concurrent=1)], **raw})
    return gw, backend


class Held:
    """A streaming request that keeps the backend busy until ``finish()``."""

    def __init__(self, http: aiohttp.ClientSession, gw: RunningNexus, backend: Any, text: str = "held") -> None:
        self.http, self.gw, self.backend, self.text = http, gw, backend, text

    async def __aenter__(self) -> Held:
        self.backend.release.clear()
        self._cm = self.http.post(f"{self.gw.url}/v1/chat/completions", json=say(self.text, stream=True))
        self.resp = await self._cm.__aenter__()
        assert self.resp.status == 200
        await self.resp.content.readuntil(b"\n\n")  # first event: the request holds its slot
        return self

    async def finish(self) -> bytes:
        self.backend.release.set()
        return await self.resp.read()

    async def __aexit__(self, *exc: object) -> None:
        self.backend.release.set()
        await self._cm.__aexit__(*exc)


# -- waiting for capacity ------------------------------------------------------------------


async def test_request_at_cap_waits_and_is_dispatched_when_capacity_frees(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw, backend = await capped(fake_backend, nexus)
    async with Held(http, gw, backend) as held:
        waiting = asyncio.ensure_future(chat(http, gw, say("queued")))
        await until(lambda: depth(gw) == 1)
        assert not waiting.done()
        assert said(backend) == ["held"]  # never sent while the backend is at its cap
        assert gw.gateway.queue.dispatched == 0
        assert (await held.finish()).endswith(b"data: [DONE]\n\n")
        status, headers, body = await waiting
    assert status == 200
    assert json.loads(body)["object"] == "chat.completion"
    assert said(backend) == ["held", "queued"]
    assert gw.gateway.queue.dispatched == 1 and depth(gw) == 0
    for name in NEXUS_HEADERS:  # served after queuing, with the normal headers
        assert headers.get(name), name
    assert headers["X-Nexus-Backend"] == "fake"
    assert headers["X-Nexus-Route-Reason"] == "capability-match"
    assert gw.gateway.registry.get("fake").pending == 0  # type: ignore[union-attr]


async def test_streaming_requests_queue_too(fake_backend: BackendFactory, nexus: NexusFactory,
                                            http: aiohttp.ClientSession) -> None:
    gw, backend = await capped(fake_backend, nexus)
    async with Held(http, gw, backend) as held:
        waiting = asyncio.ensure_future(chat(http, gw, say("queued stream", stream=True)))
        await until(lambda: depth(gw) == 1)
        await held.finish()
        status, headers, body = await waiting
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["X-Nexus-Backend"] == "fake" and headers["X-Nexus-Privacy-Zone"] == "restricted"
    assert body.endswith(b"data: [DONE]\n\n")
    assert gw.gateway.queue.dispatched == 1


async def test_high_priority_is_dispatched_before_normal_each_fifo(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    """Items 65 and 67: every high request (FIFO), then every normal one (FIFO)."""
    gw, backend = await capped(fake_backend, nexus)
    arrivals = [("normal-1", None), ("high-1", "HIGH"), ("normal-2", "1"), ("high-2", " high "),
                ("normal-3", "urgent")]
    async with Held(http, gw, backend) as held:
        waiting = []
        for i, (text, priority) in enumerate(arrivals, start=1):
            headers = {"X-Nexus-Priority": priority} if priority is not None else {}
            waiting.append(asyncio.ensure_future(chat(http, gw, say(text), headers)))
            await until(lambda: depth(gw) == i)  # noqa: B023 - awaited within the iteration
        assert gw.gateway.queue.depth() == {"high": 2, "normal": 3}
        await held.finish()
        results = await asyncio.gather(*waiting)
    assert [status for status, _, _ in results] == [200] * 5
    assert said(backend) == ["held", "high-1", "high-2", "normal-1", "normal-2", "normal-3"]


@pytest.mark.parametrize(("header", "expected"), [
    (None, "normal"), ("high", "high"), ("HIGH", "high"), (" High ", "high"), ("normal", "normal"),
    ("1", "normal"), ("5", "normal"), ("", "normal"), ("highest", "normal"),
])
def test_priority_header_parsing(header: str | None, expected: str) -> None:
    assert priority_of(header) == expected


async def test_queue_full_is_rejected_at_once(fake_backend: BackendFactory, nexus: NexusFactory,
                                              http: aiohttp.ClientSession) -> None:
    """Item 64: max_size 5, 6 requests: 5 wait, the 6th gets 503 at once."""
    gw, backend = await capped(fake_backend, nexus, queue={"max_size": 5, "max_wait_seconds": 30})
    async with Held(http, gw, backend) as held:
        waiting = []
        for i in range(5):
            waiting.append(asyncio.ensure_future(chat(http, gw, say(f"q{i}"))))
            await until(lambda: depth(gw) == i + 1)  # noqa: B023
        started = time.monotonic()
        status, headers, body = await chat(http, gw, say("one too many"))
        assert time.monotonic() - started < 1.0
        assert status == 503
        error = json.loads(body)
        assert "queue is full" in error["error"]["message"]
        assert error["error"]["type"] == "service_unavailable"
        assert "available_backends" in error["context"]
        assert headers.get("X-Request-Id")
        async with http.get(f"{gw.url}/v1/stats") as resp:
            queue_stats = (await resp.json())["queue"]
        assert queue_stats["depth"] == {"high": 0, "normal": 5}
        assert queue_stats["rejected_full"] == 1
        await held.finish()
        results = await asyncio.gather(*waiting)
    assert [r[0] for r in results] == [200] * 5
    assert said(backend) == ["held", "q0", "q1", "q2", "q3", "q4"]  # the rejected one never reached it


async def test_wait_timeout_is_503_with_retry_after_max_wait(fake_backend: BackendFactory, nexus: NexusFactory,
                                                             http: aiohttp.ClientSession) -> None:
    """Item 66."""
    gw, backend = await capped(fake_backend, nexus, queue={"max_wait_seconds": 1})
    async with Held(http, gw, backend):
        started = time.monotonic()
        status, headers, body = await chat(http, gw, say("too late"))
        waited = time.monotonic() - started
    assert status == 503
    assert headers["Retry-After"] == "1"
    error = json.loads(body)
    assert "timed out" in error["error"]["message"]
    assert error["context"]["eta_seconds"] == 1
    assert 0.9 <= waited < 3
    assert gw.gateway.queue.timed_out == 1 and depth(gw) == 0
    assert said(backend) == ["held"]


async def test_queue_disabled_at_cap_is_503_at_once(fake_backend: BackendFactory, nexus: NexusFactory,
                                                    http: aiohttp.ClientSession) -> None:
    gw, backend = await capped(fake_backend, nexus, queue={"enabled": False})
    async with Held(http, gw, backend):
        status, headers, body = await chat(http, gw, say("refused"))
    assert status == 503
    error = json.loads(body)
    assert "capacity" in json.loads(headers["X-Nexus-Rejection-Details"])[0]["reason"]
    assert error["context"]["available_backends"] == ["fake"]
    assert said(backend) == ["held"]


async def test_request_waits_for_an_unhealthy_backend_to_recover(fake_backend: BackendFactory, nexus: NexusFactory,
                                                                 http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(models_status=500)
    gw = await nexus({"backends": [backend_entry(backend, models=["test-model"])]})
    assert gw.gateway.registry.get("fake").status is Status.UNHEALTHY  # type: ignore[union-attr]
    waiting = asyncio.ensure_future(chat(http, gw, say("patient")))
    await until(lambda: depth(gw) == 1)
    backend.models_status = 200
    await gw.check_health()
    assert not waiting.done()  # one success is not a recovery yet (recovery_threshold 2)
    await gw.check_health()  # healthy: the queue is told at once
    status, headers, _ = await waiting
    assert (status, headers["X-Nexus-Backend"]) == (200, "fake")
    assert gw.gateway.queue.dispatched == 1


async def test_backend_retry_after_queues_requests_until_it_runs_out(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(mode="status:429", retry_after="1")
    gw = await nexus({"backends": [backend_entry(backend)]})
    status, _, body = await chat(http, gw, say("first"))
    assert status == 502 and b"429" in body  # the only candidate asked to wait
    backend.mode = "ok"
    started = time.monotonic()
    status, headers, _ = await chat(http, gw, say("second"))
    waited = time.monotonic() - started
    assert (status, headers["X-Nexus-Backend"]) == (200, "fake")
    assert 0.8 <= waited < 2.5  # dispatched when the Retry-After ran out, not at the 30 s timeout
    assert gw.gateway.queue.dispatched == 1
    assert said(backend) == ["first", "second"]


async def test_a_second_retry_after_episode_also_wakes_the_queue(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(mode="status:429", retry_after="0.2")
    gw = await nexus({"queue": {"max_wait_seconds": 10}, "backends": [backend_entry(backend)]})
    for episode in range(2):
        backend.mode = "status:429"
        status, _, _ = await chat(http, gw, say(f"refused {episode}"))
        assert status == 502
        backend.mode = "ok"
        waiting = asyncio.ensure_future(chat(http, gw, say(f"queued {episode}")))
        done, _ = await asyncio.wait({waiting}, timeout=1.5)
        if not done:
            waiting.cancel()
        assert done, f"episode {episode}: still queued 1.5 s after a 0.2 s Retry-After"
        assert waiting.result()[0] == 200


async def test_queue_wake_up_timer_is_rearmed_after_it_fired() -> None:
    queue = RequestQueue(QueueConfig(max_size=10, max_wait_seconds=5))
    free_at = [time.monotonic() + 0.02]

    def route() -> Any:
        wait = free_at[0] - time.monotonic()
        if wait > 0:
            raise Unavailable(ServiceUnavailable("busy", context={}), wait)
        return "plan"

    for _ in range(2):
        free_at[0] = time.monotonic() + 0.02
        with pytest.raises(Unavailable) as busy:
            route()
        async with asyncio.timeout(1):
            assert await queue.wait(route, busy.value, "normal") == "plan"


# -- shutdown and clients that give up -----------------------------------------------------


async def test_shutdown_answers_queued_requests_503_retry_after_5(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(models_status=500)
    gw = await nexus({"queue": {"max_wait_seconds": 30}, "backends": [backend_entry(backend, models=["test-model"])]})
    waiting = asyncio.ensure_future(chat(http, gw, say("caught by shutdown")))
    await until(lambda: depth(gw) == 1)
    cleanup = asyncio.ensure_future(gw.runner.cleanup())
    try:
        done, _ = await asyncio.wait({waiting}, timeout=2)
        assert done, "the queued request was not answered within 2 s of the shutdown starting"
        status, headers, body = waiting.result()
        assert status == 503
        assert headers["Retry-After"] == "5"
        assert "shutting down" in json.loads(body)["error"]["message"]
    finally:
        waiting.cancel()
        gw.gateway.queue.close()  # let the runner finish now if the request was still waiting
        await cleanup
    assert backend.chats == []


async def test_queue_close_answers_every_waiter_503_retry_after_5(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    """What the gateway's stop does to the queue, and that a closed queue takes nobody new."""
    gw, backend = await capped(fake_backend, nexus)
    async with Held(http, gw, backend):
        waiting = []
        for i, priority in enumerate(["high", "normal"]):
            waiting.append(asyncio.ensure_future(chat(http, gw, say(priority), {"X-Nexus-Priority": priority})))
            await until(lambda: depth(gw) == i + 1)  # noqa: B023
        gw.gateway.queue.close()
        results = await asyncio.gather(*waiting)
        late = await chat(http, gw, say("after close"))
    for status, headers, body in [*results, late]:
        assert status == 503
        assert headers["Retry-After"] == "5"
        assert "shutting down" in json.loads(body)["error"]["message"]
    assert depth(gw) == 0
    assert said(backend) == ["held"]


async def test_client_that_gives_up_while_queued_is_removed_and_never_sent(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw, backend = await capped(fake_backend, nexus)
    async with Held(http, gw, backend) as held:
        quitter = asyncio.ensure_future(chat(http, gw, say("gave up")))
        await until(lambda: depth(gw) == 1)
        stayer = asyncio.ensure_future(chat(http, gw, say("stayed")))
        await until(lambda: depth(gw) == 2)
        quitter.cancel()  # the client closes its connection
        await until(lambda: depth(gw) == 1)
        assert gw.gateway.queue.depth() == {"high": 0, "normal": 1}
        await held.finish()
        status, _, _ = await stayer
    assert status == 200
    assert said(backend) == ["held", "stayed"]
    assert gw.gateway.queue.dispatched == 1 and depth(gw) == 0
    async with http.get(f"{gw.url}/v1/stats") as resp:
        stats = await resp.json()
    assert stats["queue"]["timed_out"] == 0


async def test_client_that_gives_up_leaves_the_queue_empty(fake_backend: BackendFactory, nexus: NexusFactory,
                                                           http: aiohttp.ClientSession) -> None:
    gw, backend = await capped(fake_backend, nexus)
    async with Held(http, gw, backend) as held:
        quitters = []
        for i in range(3):
            quitters.append(asyncio.ensure_future(chat(http, gw, say(f"gone {i}", stream=i == 1))))
            await until(lambda: depth(gw) == i + 1)  # noqa: B023
        for task in quitters:
            task.cancel()
        await until(lambda: depth(gw) == 0)
        await held.finish()
    status, _, _ = await chat(http, gw, say("next"))  # nothing stale is left to dispatch
    assert status == 200
    assert said(backend) == ["held", "next"]
    assert gw.gateway.queue.dispatched == 0


async def test_client_that_gives_up_while_queued_is_recorded_as_cancelled(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw, backend = await capped(fake_backend, nexus)
    async with Held(http, gw, backend) as held:
        quitter = asyncio.ensure_future(chat(http, gw, say("gave up")))
        await until(lambda: depth(gw) == 1)
        quitter.cancel()
        await until(lambda: depth(gw) == 0)
        await held.finish()
    async with http.get(f"{gw.url}/v1/stats") as resp:
        requests = (await resp.json())["requests"]
    assert requests["cancelled"] == 1
    assert requests["total"] == 2  # the held stream and the one that gave up


# -- what is never queued ------------------------------------------------------------------


async def test_unknown_model_is_404_at_once_never_queued(fake_backend: BackendFactory, nexus: NexusFactory,
                                                         http: aiohttp.ClientSession) -> None:
    gw, backend = await capped(fake_backend, nexus, queue={"max_wait_seconds": 30})
    async with Held(http, gw, backend):
        for body in (say("x", model="no-such-model"), say("x", model="no-such-model", stream=True)):
            async with asyncio.timeout(2):
                status, _, raw = await chat(http, gw, body)
            assert status == 404
            assert json.loads(raw)["error"]["code"] == "model_not_found"
    assert depth(gw) == 0 and gw.gateway.queue.timed_out == 0


async def test_privacy_and_tier_rejections_are_503_at_once_never_queued(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    cloud = await fake_backend(name="cloud", models=["private-model"])
    small = await fake_backend(name="small", models=["big-model"])
    gw = await nexus({
        "queue": {"enabled": True, "max_wait_seconds": 30},
        "routing": {"policies": [{"model_pattern": "private-*", "privacy": "restricted"},
                                 {"model_pattern": "big-*", "min_tier": 4}]},
        "backends": [backend_entry(cloud, zone="open"), backend_entry(small, tier=1)]})
    for model, key, value in (("private-model", "privacy_zone_required", "restricted"),
                              ("big-model", "required_tier", 4)):
        async with asyncio.timeout(2):
            status, headers, raw = await chat(http, gw, say("x", model=model))
        assert status == 503, model
        assert json.loads(raw)["context"][key] == value
        assert "Retry-After" not in headers
        assert "X-Nexus-Rejection-Details" in headers
    assert depth(gw) == 0 and gw.gateway.queue.dispatched == 0 and gw.gateway.queue.timed_out == 0
    assert cloud.chats == [] and small.chats == []


async def test_request_waits_for_a_busy_restricted_backend_while_an_open_one_is_free(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    local = await fake_backend(name="local", mode="slow")
    cloud = await fake_backend(name="cloud")
    gw = await nexus({"routing": {"policies": [{"model_pattern": "test-*", "privacy": "restricted"}]},
                      "backends": [backend_entry(local, max_concurrent=1), backend_entry(cloud, zone="open")]})
    async with Held(http, gw, local) as held:
        waiting = asyncio.ensure_future(chat(http, gw, say("private")))
        await until(lambda: depth(gw) == 1 or waiting.done())
        if waiting.done():
            status, _, body = waiting.result()
            pytest.fail(f"answered {status} at once instead of queuing: {body[:200]!r}")
        await held.finish()
        status, headers, _ = await waiting
    assert (status, headers["X-Nexus-Backend"], headers["X-Nexus-Privacy-Zone"]) == (200, "local", "restricted")
    assert cloud.chats == []


async def test_dispatched_request_that_loses_its_slot_keeps_waiting(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw, backend = await capped(fake_backend, nexus)
    fake = gw.gateway.registry.get("fake")
    assert fake is not None and gw.gateway.proxy is not None
    dispatch = gw.gateway.proxy.on_release
    stolen = []

    def release() -> None:
        dispatch()  # the freed slot goes to the queued request...
        if not stolen:  # ...and a request routed in the same loop iteration takes it first
            fake.pending += 1
            stolen.append(True)

    gw.gateway.proxy.on_release = release
    async with Held(http, gw, backend) as held:
        waiting = asyncio.ensure_future(chat(http, gw, say("queued")))
        await until(lambda: depth(gw) == 1)
        await held.finish()
        assert stolen
        done, _ = await asyncio.wait({waiting}, timeout=0.3)  # nothing announces "still waiting"
        assert not done, f"answered {waiting.result()[0]} instead of waiting for the next free slot"
        fake.pending -= 1  # the other request finished
        dispatch()
        status, _, _ = await waiting
    assert status == 200
