"""Every error the gateway makes uses the OpenAI envelope, with the status of CONTRACT §3."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import aiohttp
import pytest

from nexus.testing import CHAT, BackendFactory, NexusFactory, backend_entry


def assert_envelope(payload: dict[str, Any], *, type_: str | None = None, code: str | None = None) -> dict[str, Any]:
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if type_ is not None:
        assert error["type"] == type_
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (b'{"model": "test-model", "messages": [', None, "not valid JSON"),
        (b'{"messages": []}', "model", "Missing required parameter: 'model'"),
        (b'{"model": 42, "messages": []}', "model", "Expected `str`"),
        (b'{"model": "test-model", "messages": "hi"}', "messages", "Expected `array`"),
        (b'{"model": "test-model", "messages": [], "stream": "yes"}', "stream", "Expected `bool | null`"),
        (b'[1, 2]', None, "Expected `object`"),
    ],
)
async def test_bad_request_bodies_get_400_envelopes(nexus: NexusFactory, http: aiohttp.ClientSession,
                                                    body: bytes, param: str | None, fragment: str) -> None:
    gw = await nexus()
    async with http.post(f"{gw.url}/v1/chat/completions", data=body,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        assert resp.headers["X-Request-Id"]
        error = assert_envelope(await resp.json(), type_="invalid_request_error")
    assert error["param"] == param
    assert fragment in error["message"]


async def test_wrong_content_type_is_415(nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw = await nexus()
    async with http.post(f"{gw.url}/v1/chat/completions", data=json.dumps(CHAT),
                         headers={"Content-Type": "application/x-www-form-urlencoded"}) as resp:
        assert resp.status == 415
        assert_envelope(await resp.json(), code="unsupported_media_type")


async def test_body_over_the_limit_is_413(nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw = await nexus({"server": {"max_body_bytes": 1024}})
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}).encode()
    async with http.post(f"{gw.url}/v1/chat/completions", data=big,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413
        assert_envelope(await resp.json(), code="request_too_large")

    async def chunked():  # no Content-Length: the limit still holds while reading
        yield big

    async with http.post(f"{gw.url}/v1/chat/completions", data=chunked(),
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413
        assert_envelope(await resp.json(), code="request_too_large")


async def test_default_body_limit_is_10_mib(nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw = await nexus()
    big = b'{"model":"m","messages":[{"role":"user","content":"' + b"x" * (10 * 1024 * 1024) + b'"}]}'
    async with http.post(f"{gw.url}/v1/chat/completions", data=io.BytesIO(big),
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413


async def test_unknown_route_is_404_envelope(nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw = await nexus()
    async with http.get(f"{gw.url}/v1/nothing-here") as resp:
        assert resp.status == 404
        error = assert_envelope(await resp.json(), code="not_found")
    assert "/v1/nothing-here" in error["message"]


async def test_wrong_method_is_405_envelope(nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw = await nexus()
    async with http.get(f"{gw.url}/v1/chat/completions") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert_envelope(await resp.json(), code="method_not_allowed")


async def test_unknown_model_is_404_model_not_found(fake_backend: BackendFactory, nexus: NexusFactory,
                                                    http: aiohttp.ClientSession) -> None:
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "gpt-9"}) as resp:
        assert resp.status == 404
        error = assert_envelope(await resp.json(), type_="invalid_request_error", code="model_not_found")
    assert error["param"] == "model"
    assert error["message"] == "Model 'gpt-9' not found. Available: test-model"


async def test_unhealthy_backend_gives_actionable_503(fake_backend: BackendFactory, nexus: NexusFactory,
                                                      http: aiohttp.ClientSession) -> None:
    backend = await fake_backend()
    other = await fake_backend(name="other", models=["other-model"])
    gw = await nexus({"queue": {"enabled": False}, "backends": [backend_entry(backend), backend_entry(other)]})
    backend.models_status = 500
    await gw.check_health()
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 503
        payload = await resp.json()
        details = json.loads(resp.headers["X-Nexus-Rejection-Details"])
        reasons = resp.headers["X-Nexus-Rejection-Reasons"]
    assert_envelope(payload, type_="service_unavailable", code="service_unavailable")
    assert payload["context"] == {"available_backends": ["other"]}
    assert details == [{"backend": "fake", "reconciler": "scheduling", "reason": "Backend unhealthy: unhealthy",
                        "suggested_action": "Wait for the backend to recover or check its logs"}]
    assert reasons == "1 backends rejected by scheduling"


async def test_fallback_chain_exhausted_is_503_naming_every_model(fake_backend: BackendFactory,
                                                                  nexus: NexusFactory,
                                                                  http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(models=["big", "small"])
    gw = await nexus({"routing": {"fallbacks": {"big": ["small", "tiny"]}}, "backends": [backend_entry(backend)]})
    backend.models_status = 500
    await gw.check_health()
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "big"}) as resp:
        assert resp.status == 503
        payload = await resp.json()
    assert payload["context"]["models_tried"] == ["big", "small", "tiny"]


async def test_missing_capability_is_400_naming_it(fake_backend: BackendFactory, nexus: NexusFactory,
                                                   http: aiohttp.ClientSession) -> None:
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)]})
    image = {"role": "user", "content": [{"type": "text", "text": "what is this"},
                                         {"type": "image_url", "image_url": {"url": "data:,"}}]}
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "messages": [image]}) as resp:
        assert resp.status == 400
        error = assert_envelope(await resp.json(), type_="invalid_request_error")
    assert error["message"] == "Model 'test-model' lacks required capabilities: ['vision']"


async def test_capable_but_unavailable_backend_is_503_not_400(fake_backend: BackendFactory, nexus: NexusFactory,
                                                              http: aiohttp.ClientSession) -> None:
    seeing = await fake_backend(name="seeing", models=["llava"])
    gw = await nexus({"backends": [backend_entry(seeing)]})
    seeing.models_status = 500
    await gw.check_health()
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
    async with http.post(f"{gw.url}/v1/chat/completions", json={"model": "llava", "messages": [image]}) as resp:
        assert resp.status == 503


async def test_prompt_beyond_every_context_is_context_length_exceeded(fake_backend: BackendFactory,
                                                                      nexus: NexusFactory,
                                                                      http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(models=["tiny-4k"])
    gw = await nexus({"backends": [backend_entry(backend)]})
    huge = {"model": "tiny-4k", "messages": [{"role": "user", "content": "word " * 5000}]}
    async with http.post(f"{gw.url}/v1/chat/completions", json=huge) as resp:
        assert resp.status == 400
        error = assert_envelope(await resp.json(), code="context_length_exceeded")
    assert error["param"] == "messages"


async def test_malformed_http_framing_gets_an_envelope(nexus: NexusFactory) -> None:
    gw = await nexus()
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].endswith(b" 400 Bad Request")
    assert b"application/json" in head
    assert_envelope(json.loads(body), type_="invalid_request_error", code="bad_request")


async def test_health_and_models_reflect_backend_status(fake_backend: BackendFactory, nexus: NexusFactory,
                                                        http: aiohttp.ClientSession) -> None:
    a = await fake_backend(name="a", models=["m1"])
    c = await fake_backend(name="c", models=["m2"])
    b = await fake_backend(name="b", models=["m1", "m0"])
    gw = await nexus({"backends": [backend_entry(a), backend_entry(b), backend_entry(c)]})
    async with http.get(f"{gw.url}/health") as resp:
        health = await resp.json()
    assert health["status"] == "healthy"
    assert health["backends"] == {"total": 3, "healthy": 3, "unhealthy": 0}
    c.models_status = 500
    await gw.check_health()
    async with http.get(f"{gw.url}/health") as resp:
        assert resp.status == 200
        health = await resp.json()
    assert health["status"] == "degraded"
    assert health["backends"] == {"total": 3, "healthy": 2, "unhealthy": 1}
    assert health["models"] == 3
    async with http.get(f"{gw.url}/v1/models") as resp:
        listing = await resp.json()
    assert [(m["id"], m["owned_by"]) for m in listing["data"]] == [("m0", "b"), ("m1", "a"), ("m1", "b")]
    assert listing["data"][0]["capabilities"] == {"vision": False, "tools": True, "json_mode": True,
                                                  "embeddings": False}


async def test_health_with_no_backends_is_unhealthy(nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw = await nexus()
    async with http.get(f"{gw.url}/health") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "unhealthy"


async def test_missing_capability_is_400_even_with_fallbacks(fake_backend: BackendFactory, nexus: NexusFactory,
                                                             http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(models=["big", "small"])
    gw = await nexus({"routing": {"fallbacks": {"big": ["small"]}}, "backends": [backend_entry(backend)]})
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
    async with http.post(f"{gw.url}/v1/chat/completions", json={"model": "big", "messages": [image]}) as resp:
        assert resp.status == 400
