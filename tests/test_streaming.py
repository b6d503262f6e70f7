"""Streaming (CONTRACT §3): first-byte headers, failover before it, event-by-event relay,
cut streams end with an error event and no [DONE], client disconnects close upstream."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp

from nexus import GenericAdapter, hookimpl
from nexus.testing import CHAT, BackendFactory, NexusFactory, backend_entry
from nexus.testing import chunk

STREAM = {**CHAT, "stream": True}


def events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


async def test_stream_is_relayed_event_by_event_with_headers(fake_backend: BackendFactory, nexus: NexusFactory,
                                                             http: aiohttp.ClientSession) -> None:
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=STREAM) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-Nexus-Backend"] == "fake"
        assert resp.headers["X-Nexus-Route-Reason"] == "capability-match"
        assert resp.headers["X-Nexus-Privacy-Zone"] == "restricted"
        body = await resp.read()
    expected = [chunk(t).rstrip(b"\n") for t in ["Hel", "lo", "!"]]
    assert events(body)[:3] == expected
    assert events(body)[-1] == b"data: [DONE]"
    assert body.endswith(b"data: [DONE]\n\n")


async def test_each_event_reaches_the_client_before_the_next_is_produced(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(mode="slow")
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=STREAM) as resp:
        first = await resp.content.readuntil(b"\n\n")  # arrives while the backend is paused
        assert first == chunk("Hel")
        backend.release.set()
        rest = await resp.read()
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_stream_cut_midway_ends_with_error_event_not_done(fake_backend: BackendFactory, nexus: NexusFactory,
                                                                http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(mode="cut")
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=STREAM) as resp:
        assert resp.status == 200
        body = await resp.read()
    received = events(body)
    assert received[:2] == [chunk("Hel").rstrip(b"\n"), chunk("lo").rstrip(b"\n")]
    assert b"[DONE]" not in body
    last = json.loads(received[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "stream_interrupted"
    assert sum(1 for e in received if e.startswith(b'data: {"error"')) == 1


async def test_stream_idle_timeout_cuts_the_stream(fake_backend: BackendFactory, nexus: NexusFactory,
                                                   http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(mode="slow")
    gw = await nexus({"server": {"stream_idle_timeout_seconds": 0.2}, "backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=STREAM) as resp:
        body = await resp.read()
    assert b"[DONE]" not in body
    assert b"stalled" in events(body)[-1]


async def test_failure_before_first_byte_fails_over(fake_backend: BackendFactory, nexus: NexusFactory,
                                                    http: aiohttp.ClientSession) -> None:
    broken = await fake_backend(name="a", mode="status:500")
    dead = await fake_backend(name="b")
    good = await fake_backend(name="c")
    gw = await nexus({"backends": [backend_entry(broken, priority=1), backend_entry(dead, priority=2),
                                   backend_entry(good, priority=3)]})
    await dead.stop()
    async with http.post(f"{gw.url}/v1/chat/completions", json=STREAM) as resp:
        assert resp.status == 200
        assert resp.headers["X-Nexus-Backend"] == "c"
        assert resp.headers["X-Nexus-Retries"] == "2"
        assert resp.headers["X-Nexus-Route-Reason"] == "failover"
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")


async def test_stream_that_fails_everywhere_gets_a_json_error(fake_backend: BackendFactory, nexus: NexusFactory,
                                                              http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(mode="status:503")
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=STREAM) as resp:
        assert resp.status == 502
        assert resp.headers["Content-Type"].startswith("application/json")
        assert (await resp.json())["error"]["code"] == "bad_gateway"


async def test_stream_first_byte_timeout_is_504(fake_backend: BackendFactory, nexus: NexusFactory,
                                                http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(mode="hang")
    gw = await nexus({"server": {"request_timeout_seconds": 0.2}, "backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=STREAM) as resp:
        assert resp.status == 504


async def test_stream_for_unknown_model_is_404_json(nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw = await nexus()
    async with http.post(f"{gw.url}/v1/chat/completions", json={**STREAM, "model": "nope"}) as resp:
        assert resp.status == 404
        assert resp.headers["Content-Type"].startswith("application/json")


async def test_client_disconnect_closes_the_upstream_stream(fake_backend: BackendFactory, nexus: NexusFactory,
                                                            http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(mode="slow")
    gw = await nexus({"backends": [backend_entry(backend)]})
    resp = await http.post(f"{gw.url}/v1/chat/completions", json=STREAM)
    await resp.content.readuntil(b"\n\n")
    resp.close()  # the client goes away mid-stream
    await asyncio.wait_for(backend.client_gone.wait(), 5)
    backend_state = gw.gateway.registry.get("fake")
    assert backend_state is not None and backend_state.pending == 0


async def test_client_disconnect_before_first_byte_closes_upstream(fake_backend: BackendFactory,
                                                                   nexus: NexusFactory,
                                                                   http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(mode="hang")
    gw = await nexus({"backends": [backend_entry(backend)]})
    task = asyncio.ensure_future(http.post(f"{gw.url}/v1/chat/completions", json=CHAT))
    await asyncio.wait_for(backend.got_request.wait(), 5)
    task.cancel()
    await asyncio.wait_for(backend.client_gone.wait(), 5)  # the gateway closed its upstream request


async def test_backend_ignoring_stream_flag_is_answered_as_json(fake_backend: BackendFactory, nexus: NexusFactory,
                                                                http: aiohttp.ClientSession) -> None:
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/completions", json={"model": "test-model", "prompt": "x",
                                                           "stream": False}) as resp:
        assert resp.status == 200
        assert (await resp.json())["object"] == "chat.completion"


async def test_shutdown_cuts_open_streams_with_an_error_event(fake_backend: BackendFactory, nexus: NexusFactory,
                                                              http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(mode="slow")
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=STREAM) as resp:
        await resp.content.readuntil(b"\n\n")
        cleanup = asyncio.ensure_future(gw.runner.cleanup())
        rest = await resp.read()
    await cleanup
    assert b"[DONE]" not in rest
    assert b"shutting down" in rest


async def test_stale_pooled_connection_is_retried_invisibly(nexus: NexusFactory,
                                                            http: aiohttp.ClientSession) -> None:
    """Like the native llama.cpp server: keep-alive is advertised, but a connection that
    already served one response is dead when reused."""
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length")), 0)
        await reader.readexactly(length)
        if head.startswith(b"GET"):
            body = b'{"object":"list","data":[{"id":"test-model","object":"model"}]}'
            ctype = b"application/json"
        else:
            body = chunk("hi") + b"data: [DONE]\n\n"
            ctype = b"text/event-stream"
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Type: " + ctype +
                     b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        await reader.read(1)  # the next request on this connection: hang up without answering
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await nexus({"routing": {"max_retries": 0},
                          "backends": [{"name": "llamacpp", "url": f"http://127.0.0.1:{port}", "type": "generic"}]})
        for _ in range(3):
            async with http.post(f"{gw.url}/v1/chat/completions", json=STREAM) as resp:
                assert resp.status == 200
                assert "X-Nexus-Retries" not in resp.headers
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        assert served == 4  # one probe + three streams, each on a fresh connection in the end
    finally:
        server.close()
        await server.wait_closed()


class RecordCollector(logging.Handler):
    """Collects the per-request record lines and signals when ``expected`` have arrived."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.expected = expected
        self.complete = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "outcome"):
            self.records.append(record)
            if len(self.records) >= self.expected:
                self.complete.set()


async def test_every_request_ends_in_one_record_line(fake_backend: BackendFactory, nexus: NexusFactory,
                                                     http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(mode="slow")
    gw = await nexus({"backends": [backend_entry(backend)]})
    collector = RecordCollector(expected=3)
    logger = logging.getLogger("nexus.proxy")
    logger.addHandler(collector)
    logger.setLevel(logging.INFO)
    try:
        async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
        backend.release.set()
        async with http.post(f"{gw.url}/v1/chat/completions", json=STREAM) as resp:
            await resp.read()
        backend.release.clear()
        resp = await http.post(f"{gw.url}/v1/chat/completions", json=STREAM)
        await resp.content.readuntil(b"\n\n")
        resp.close()
        await asyncio.wait_for(collector.complete.wait(), 5)  # written as the handler unwinds
    finally:
        logger.removeHandler(collector)
        logger.setLevel(logging.NOTSET)
    unary, streamed, cancelled = collector.records
    assert (unary.outcome, unary.status, unary.prompt_tokens, unary.completion_tokens) == ("success", 200, 3, 2)
    assert unary.backend == "fake" and unary.stream is False
    assert (streamed.outcome, streamed.stream) == ("success", True) and streamed.ttft_ms is not None
    assert cancelled.outcome == "cancelled"


class MarkingAdapter(GenericAdapter):
    """A translating adapter: tags every event it sees, and fails on the third when asked."""

    type_name = "marking"
    translates = True
    fail_on_event = 0

    def translate_event(self, endpoint: str, event: bytes) -> bytes:
        MarkingAdapter.seen += 1
        if MarkingAdapter.seen == self.fail_on_event:
            raise ValueError("cannot translate")
        return b": translated\n" + event

    seen = 0


class MarkingPlugin:
    @hookimpl
    def register_backend_types(self) -> list[type]:
        return [MarkingAdapter]


async def test_translating_adapter_sees_one_event_at_a_time(fake_backend: BackendFactory, nexus: NexusFactory,
                                                            http: aiohttp.ClientSession) -> None:
    backend = await fake_backend()
    gw = await nexus({"backends": [{**backend_entry(backend), "type": "marking"}]},
                     extra_plugins=[("marking", MarkingPlugin())])
    MarkingAdapter.seen, MarkingAdapter.fail_on_event = 0, 0
    async with http.post(f"{gw.url}/v1/chat/completions", json=STREAM) as resp:
        body = await resp.read()
    assert MarkingAdapter.seen == 5  # three chunks, the finish chunk, [DONE]
    assert body.count(b": translated\n") == 5
    MarkingAdapter.seen, MarkingAdapter.fail_on_event = 0, 3
    async with http.post(f"{gw.url}/v1/chat/completions", json=STREAM) as resp:
        body = await resp.read()
    assert b"[DONE]" not in body
    assert b"failed: cannot translate" in events(body)[-1]
