"""/ws pushes what the dashboard shows, and / renders it escaped."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import pytest

from aiohttp import web

from nexus import live
from nexus.dashboard import DashboardPanel
from nexus.hookspecs import hookimpl
from nexus.testing import CHAT, BackendFactory, NexusFactory, backend_entry

EVIL = "<img src=x onerror=alert(1)>"


async def next_update(ws: aiohttp.ClientWebSocketResponse, update_type: str, timeout: float = 1.0) -> Any:
    """The data of the next message of ``update_type`` (others are skipped), within ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            message = await ws.receive()
            assert message.type is aiohttp.WSMsgType.TEXT, message
            update = json.loads(message.data)
            assert set(update) == {"update_type", "data"}
            if update["update_type"] == update_type:
                return update["data"]


async def test_request_complete_arrives_within_a_second_for_every_request(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(name="gpu-1")
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.ws_connect(f"{gw.url}/ws") as ws:
        views = await next_update(ws, "BackendStatus")  # a snapshot on connect
        assert [v["id"] for v in views] == ["gpu-1"]
        stats = await next_update(ws, "StatsUpdate")
        assert stats["budget"] is None and stats["queue"]["depth"] == {"high": 0, "normal": 0}

        async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "plain"}) as resp:
            assert resp.status == 200
        entry = await next_update(ws, "RequestComplete")
        assert entry["request_id"] == "plain" and entry["status"] == "Success" and entry["backend_id"] == "gpu-1"

        async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True},
                             headers={"X-Request-Id": "stream"}) as resp:
            await resp.read()
        entry = await next_update(ws, "RequestComplete")
        assert entry["request_id"] == "stream" and entry["stream"] and entry["ttft_ms"] is not None

        async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "nope"},
                             headers={"X-Request-Id": "refused"}) as resp:
            assert resp.status == 404
        entry = await next_update(ws, "RequestComplete")
        assert entry["request_id"] == "refused" and entry["backend_id"] == "none"


async def test_backend_status_after_every_health_cycle_and_model_changes(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live, "STATS_INTERVAL", 3600)  # only the messages this test causes
    backend = await fake_backend(name="gpu-1", models=["llama3"])
    gw = await nexus({"backends": [backend_entry(backend, zone="open", tier=3)]})
    async with http.ws_connect(f"{gw.url}/ws") as ws:
        await next_update(ws, "StatsUpdate")  # the snapshot on connect: BackendStatus, then StatsUpdate
        await gw.check_health()
        update = json.loads((await ws.receive(timeout=1)).data)  # models unchanged: no ModelChange
        assert update["update_type"] == "BackendStatus"
        (view,) = update["data"]
        assert view["status"] == "healthy" and view["zone"] == "open" and view["tier"] == 3
        assert view["source"] == "static" and view["pending"] == 0 and view["total_requests"] == 0
        assert view["models"] == [{"id": "llama3", "context_length": None, "vision": False, "tools": True,
                                   "json_mode": True, "embeddings": False, "loaded": True}]
        assert {"avg_latency_ms", "quality", "max_concurrent", "last_health_check", "url"} <= set(view)

        backend.models = ["llama3", "qwen2.5-vl"]
        await gw.check_health()
        change = await next_update(ws, "ModelChange")
        assert change["backend_id"] == "gpu-1"
        assert [(m["id"], m["vision"]) for m in change["models"]] == [("llama3", False), ("qwen2.5-vl", True)]
        await next_update(ws, "BackendStatus")

        backend.models_status = 500
        await gw.check_health()
        (view,) = await next_update(ws, "BackendStatus")
        assert view["status"] == "unhealthy" and view["last_error"]


async def test_stats_update_is_pushed_periodically(fake_backend: BackendFactory, nexus: NexusFactory,
                                                   http: aiohttp.ClientSession,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live, "STATS_INTERVAL", 0.05)
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)], "routing": {"budget": {"monthly_limit_usd": 10.0}}})
    async with http.ws_connect(f"{gw.url}/ws") as ws:
        await next_update(ws, "StatsUpdate")  # the one sent on connect
        async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
        stats = await next_update(ws, "StatsUpdate")  # a periodic one
        assert stats["requests"]["success"] == 1 and stats["recent"]["requests"] == 1
        assert stats["budget"]["monthly_limit_usd"] == 10.0 and stats["budget"]["status"] == "Normal"


async def test_client_frames_are_ignored_and_close_is_clean(fake_backend: BackendFactory, nexus: NexusFactory,
                                                            http: aiohttp.ClientSession) -> None:
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)]})
    hub = gw.app[live.LIVE]
    async with http.ws_connect(f"{gw.url}/ws") as ws:
        await next_update(ws, "StatsUpdate")
        await ws.send_str('{"update_type": "please"}')
        await ws.send_bytes(b"\x00\x01")
        async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
        await next_update(ws, "RequestComplete")
        assert len(hub.clients) == 1
    async with asyncio.timeout(1):
        while hub.clients:  # the server side notices the close
            await asyncio.sleep(0)
    assert hub._ticker is None or hub._ticker.done() or hub._ticker.cancelling()


def test_a_slow_client_loses_the_oldest_messages_not_memory() -> None:
    client = live._Client(ws=None, request=None, size=3)  # type: ignore[arg-type]
    for i in range(5):
        client.push(str(i).encode())
    assert list(client.pending) == [b"2", b"3", b"4"] and client.dropped == 2


async def test_oversized_messages_are_dropped_not_truncated(nexus: NexusFactory) -> None:
    gw = await nexus()
    hub = gw.app[live.LIVE]
    client = live._Client(ws=None, request=None)  # type: ignore[arg-type]
    hub.clients.add(client)
    try:
        hub.broadcast("BackendStatus", ["x" * live.MAX_MESSAGE_BYTES])
        hub.broadcast("BackendStatus", [])
    finally:
        hub.clients.discard(client)
    assert [json.loads(m) for m in client.pending] == [{"update_type": "BackendStatus", "data": []}]
    assert hub.dropped_oversize == 1


async def test_dashboard_escapes_names_models_and_errors(fake_backend: BackendFactory, nexus: NexusFactory,
                                                         http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(name=EVIL, models=[EVIL, "llava-1.6"])
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": EVIL}) as resp:
        assert resp.status == 200
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "</script><script>alert(2)</script>"}) as resp:
        assert resp.status == 404
    async with http.get(f"{gw.url}/") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
        page = await resp.text()
    assert EVIL not in page and "<script>alert" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "No limit configured" in page
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", page, flags=re.DOTALL)
    assert len(scripts) == 2  # dashboard.js (empty element) and the initial data; nothing injected
    initial = json.loads(re.search(r'<script type="application/json" id="initial-data">(.*?)</script>',
                                   page, flags=re.DOTALL).group(1))  # type: ignore[union-attr]
    assert [b["name"] for b in initial["backends"]] == [EVIL]
    assert {m["id"] for m in initial["models"]} == {EVIL, "llava-1.6"}
    assert [e["model"] for e in initial["history"]] == [EVIL, "</script><script>alert(2)</script>"]
    assert set(initial) == {"stats", "backends", "models", "history"}
    async with http.get(f"{gw.url}/dashboard/static/dashboard.js") as resp:
        assert resp.status == 200 and "innerHTML" not in await resp.text()
    async with http.get(f"{gw.url}/dashboard/static/dashboard.css") as resp:
        assert resp.status == 200 and resp.content_type == "text/css"


class PanelPlugin:
    @staticmethod
    @hookimpl
    def register_dashboard_panels() -> list[DashboardPanel | dict[str, Any]]:
        return [
            DashboardPanel(title="Backends by zone", template="<p>{{ backends | length }} backend: {{ backends[0].name }}</p>"),
            {"title": "Callable", "render": lambda data: EVIL},  # plain text: escaped
            {"title": "Broken", "template": "{% if %}"},  # reported and skipped
            {"title": "no body"},  # reported and skipped
        ]


async def test_plugin_panels_render_escaped_and_broken_ones_are_skipped(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)]}, extra_plugins=[("panels", PanelPlugin)])
    async with http.get(f"{gw.url}/") as resp:
        page = await resp.text()
    assert "Backends by zone" in page and "<p>1 backend: fake</p>" in page
    assert "Callable" in page and "Broken" not in page
    assert EVIL not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    errors = gw.gateway.host.plugins["panels"].errors
    assert any("template error" in e for e in errors) and any("exactly one of" in e for e in errors)


async def test_history_route_and_dashboard_need_no_backends(nexus: NexusFactory,
                                                            http: aiohttp.ClientSession) -> None:
    gw = await nexus()
    async with http.get(f"{gw.url}/v1/history") as resp:
        assert resp.status == 200 and await resp.json() == []
    async with http.get(f"{gw.url}/") as resp:
        page = await resp.text()
    assert "No backends configured." in page and "No models available." in page and "No requests yet." in page
    assert '<noscript><meta http-equiv="refresh" content="5"></noscript>' in page
    async with http.get(f"{gw.url}/ws") as resp:  # not a WebSocket upgrade
        assert resp.status == 400 and "error" in await resp.json()


async def test_connections_beyond_the_limit_get_503(nexus: NexusFactory, http: aiohttp.ClientSession,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live, "MAX_CLIENTS", 1)
    gw = await nexus()
    async with http.ws_connect(f"{gw.url}/ws") as ws:
        await next_update(ws, "StatsUpdate")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{gw.url}/ws")
        assert refused.value.status == 503


async def test_a_page_of_another_origin_cannot_open_the_feed(fake_backend: BackendFactory, nexus: NexusFactory,
                                                            http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(name="gpu-1")
    gw = await nexus({"backends": [backend_entry(backend)]})
    hub = gw.app[live.LIVE]
    port = gw.url.rsplit(":", 1)[1]
    for origin in ("http://evil.example", f"http://evil.example:{port}", f"http://localhost:{port}",
                   "http://127.0.0.1", "null", f"file://127.0.0.1:{port}"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{gw.url}/ws", origin=origin)
        assert refused.value.status == 403, origin
    async with http.get(f"{gw.url}/ws", headers={"Origin": "http://evil.example"}) as resp:  # refused before the upgrade
        assert resp.status == 403
        error = (await resp.json())["error"]
    assert error["type"] == "permission_error" and error["code"] == "permission_denied"
    assert not hub.clients

    for origin in (gw.url, None):  # the page's own origin (the dashboard's script); not a browser
        async with http.ws_connect(f"{gw.url}/ws", origin=origin) as ws:
            views = await next_update(ws, "BackendStatus")
            assert [v["id"] for v in views] == ["gpu-1"]


async def test_a_client_joining_as_the_last_one_leaves_still_gets_periodic_stats(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live, "STATS_INTERVAL", 0.05)
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)]})
    hub = gw.app[live.LIVE]
    held, gate = asyncio.Event(), asyncio.Event()
    prepare = web.WebSocketResponse.prepare

    async def gated_prepare(self: web.WebSocketResponse, request: web.Request) -> Any:
        result = await prepare(self, request)
        if "X-Gated" in request.headers:  # the second client waits here, upgraded but not yet joined
            held.set()
            await gate.wait()
        return result

    class GateOnDiscard(set[Any]):
        def discard(self, client: Any) -> None:  # the leaving client's finally releases the joining one
            super().discard(client)
            gate.set()  # so it resumes in the same loop turn as the ticker's cancellation

    monkeypatch.setattr(web.WebSocketResponse, "prepare", gated_prepare)
    first = await http.ws_connect(f"{gw.url}/ws")
    await next_update(first, "StatsUpdate")
    await next_update(first, "StatsUpdate")  # the ticker runs
    async with http.ws_connect(f"{gw.url}/ws", headers={"X-Gated": "1"}) as second:
        await held.wait()
        hub.clients = GateOnDiscard(hub.clients)
        await first.close()  # the last joined client leaves: its finally cancels the ticker
        await next_update(second, "StatsUpdate")  # the snapshot on connect
        await next_update(second, "StatsUpdate")  # a periodic one: the ticker was restarted
        assert hub._ticker is not None and not hub._ticker.done()
