"""Runtime fleet changes: GET/POST /v1/backends and DELETE /v1/backends/{id} (loopback only)."""

from __future__ import annotations

import aiohttp

from nexus.testing import CHAT, BackendFactory, NexusFactory, backend_entry


async def test_add_route_and_remove_a_backend_at_runtime(fake_backend: BackendFactory, nexus: NexusFactory,
                                                         http: aiohttp.ClientSession) -> None:
    backend = await fake_backend()
    gw = await nexus()
    async with http.post(f"{gw.url}/v1/backends", json={"url": backend.url + "/v1/", "name": "added"}) as resp:
        assert resp.status == 201
        view = await resp.json()
    assert view["status"] == "healthy" and view["type"] == "generic" and view["source"] == "manual"
    assert view["url"] == backend.url and view["models"] == ["test-model"]
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.headers["X-Nexus-Backend"] == "added"
    async with http.post(f"{gw.url}/v1/backends", json={"url": backend.url, "name": "added"}) as resp:
        assert resp.status == 409
    async with http.delete(f"{gw.url}/v1/backends/added") as resp:
        assert resp.status == 200
    async with http.delete(f"{gw.url}/v1/backends/added") as resp:
        assert resp.status == 404
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 404


async def test_add_backend_validates_like_the_config(nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw = await nexus()
    cases = [
        ({"url": "ftp://x"}, "url"),
        ({"url": "http://127.0.0.1:1", "tier": 9}, "tier"),
        ({"url": "http://127.0.0.1:1", "type": "nope"}, "nope"),
        ({"url": "http://127.0.0.1:1", "colour": "red"}, "colour"),
        ({"name": "no-url"}, "url"),
    ]
    for body, fragment in cases:
        async with http.post(f"{gw.url}/v1/backends", json=body) as resp:
            assert resp.status == 400, body
            assert fragment in (await resp.json())["error"]["message"]


async def test_backend_list_shows_status_and_never_keys(fake_backend: BackendFactory, nexus: NexusFactory,
                                                        http: aiohttp.ClientSession, monkeypatch) -> None:
    monkeypatch.setenv("SECRET_KEY_ENV", "sk-very-secret")
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend, api_key_env="SECRET_KEY_ENV")]})
    async with http.get(f"{gw.url}/v1/backends") as resp:
        text = await resp.text()
    assert "sk-very-secret" not in text
    assert '"status":"healthy"' in text


async def test_a_password_in_a_backend_url_is_never_shown(fake_backend: BackendFactory, nexus: NexusFactory,
                                                          http: aiohttp.ClientSession) -> None:
    backend = await fake_backend()
    url = backend.url.replace("http://", "http://admin:hunter2@")
    gw = await nexus({"backends": [{**backend_entry(backend), "url": url}]})
    for path in ("/v1/backends", "/", "/v1/stats"):
        async with http.get(f"{gw.url}{path}") as resp:
            text = await resp.text()
        assert "hunter2" not in text, path
    async with http.get(f"{gw.url}/v1/backends") as resp:
        assert (await resp.json())["backends"][0]["url"] == backend.url.replace("http://", "http://admin:***@")
