"""Non-streaming proxying: byte-exact bodies, headers, auth, failover and the error matrix."""

from __future__ import annotations

import json

import aiohttp

from nexus.testing import CHAT, BackendFactory, NexusFactory, backend_entry
from nexus.testing import completion

VISION = "test-vision-model"
RAW_BODY = (
    b'{ "model" : "test-vision-model", "messages": [{"role":"user","content":[{"type":"text","text":"look"},'
    b'{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]},'
    b'{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function",'
    b'"function":{"name":"f","arguments":"{\\"a\\": 1}"}}]},'
    b'{"role":"tool","tool_call_id":"call_1","content":"42"}],'
    b'"tools":[{"type":"function","function":{"name":"f","parameters":{}}}],'
    b'"x_unknown_field": {"nested": [1, 2.50, "\\u00e9"]},   "temperature": 0.7 }'
)


async def test_body_is_forwarded_byte_for_byte(fake_backend: BackendFactory, nexus: NexusFactory,
                                              http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(models=[VISION])
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", data=RAW_BODY,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert backend.chats[0].body == RAW_BODY
    assert json.loads(body) == completion(model=VISION)


async def test_response_body_is_returned_untouched(fake_backend: BackendFactory, nexus: NexusFactory,
                                                  http: aiohttp.ClientSession) -> None:
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        body = await resp.read()
    assert body == json.dumps(completion()).encode()  # aiohttp's json_response bytes, unchanged


async def test_alias_rewrites_only_the_model_field(fake_backend: BackendFactory, nexus: NexusFactory,
                                                  http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(models=[VISION])
    gw = await nexus({"backends": [backend_entry(backend)], "routing": {"aliases": {"gpt-4o": VISION}}})
    sent = RAW_BODY.replace(b'"model" : "test-vision-model"', b'"model" : "gpt-4o"')
    async with http.post(f"{gw.url}/v1/chat/completions", data=sent,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
    assert backend.chats[0].body == RAW_BODY


async def test_routed_response_carries_nexus_headers(fake_backend: BackendFactory, nexus: NexusFactory,
                                                    http: aiohttp.ClientSession) -> None:
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "req-42"}) as resp:
        assert resp.status == 200
        headers = resp.headers
    assert headers["X-Nexus-Backend"] == "fake"
    assert headers["X-Nexus-Backend-Type"] == "local"
    assert headers["X-Nexus-Route-Reason"] == "capability-match"
    assert headers["X-Nexus-Privacy-Zone"] == "restricted"
    assert headers["X-Request-Id"] == "req-42"
    assert "X-Nexus-Retries" not in headers and "X-Nexus-Fallback-Model" not in headers
    assert "X-Nexus-Cost-Estimated" not in headers  # local model, no price: cost is 0
    assert backend.chats[0].headers.get("X-Request-Id") == "req-42", backend.chats[0].headers


async def test_request_id_is_generated_when_absent_and_on_errors(nexus: NexusFactory,
                                                                 http: aiohttp.ClientSession) -> None:
    gw = await nexus()
    async with http.post(f"{gw.url}/v1/chat/completions", json={"model": "nope", "messages": []}) as resp:
        assert resp.status == 404
        assert len(resp.headers["X-Request-Id"]) == 32


async def test_client_authorization_is_forwarded_to_local_backend_without_key(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer X"}):
        pass
    assert backend.chats[0].headers["Authorization"] == "Bearer X"


async def test_configured_key_replaces_client_authorization(fake_backend: BackendFactory, nexus: NexusFactory,
                                                           http: aiohttp.ClientSession, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_KEY", "sk-configured")
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend, api_key_env="FAKE_KEY")]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer X"}):
        pass
    assert backend.chats[0].headers["Authorization"] == "Bearer sk-configured"


async def test_backend_with_missing_key_env_is_skipped(fake_backend: BackendFactory, nexus: NexusFactory,
                                                      monkeypatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend, api_key_env="NO_SUCH_KEY")]})
    assert gw.gateway.registry.get("fake") is None


async def test_failover_on_connection_refused(fake_backend: BackendFactory, nexus: NexusFactory,
                                              http: aiohttp.ClientSession) -> None:
    good = await fake_backend(name="b-good")
    dead = await fake_backend(name="a-dead")
    gw = await nexus({"backends": [backend_entry(dead, priority=1), backend_entry(good, priority=2)]})
    await dead.stop()  # healthy at the last check, refused now
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
        assert resp.headers["X-Nexus-Backend"] == "b-good"
        assert resp.headers["X-Nexus-Retries"] == "1"
        assert resp.headers["X-Nexus-Route-Reason"] == "failover"


async def test_failover_on_5xx_and_429(fake_backend: BackendFactory, nexus: NexusFactory,
                                       http: aiohttp.ClientSession) -> None:
    a = await fake_backend(name="a", mode="status:500")
    b = await fake_backend(name="b", mode="status:429")
    c = await fake_backend(name="c")
    gw = await nexus({"backends": [backend_entry(a, priority=1), backend_entry(b, priority=2),
                                   backend_entry(c, priority=3)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
        assert resp.headers["X-Nexus-Backend"] == "c"
        assert resp.headers["X-Nexus-Retries"] == "2"
    assert len(a.chats) == len(b.chats) == len(c.chats) == 1


async def test_failover_on_timeout_then_504_when_all_time_out(fake_backend: BackendFactory, nexus: NexusFactory,
                                                             http: aiohttp.ClientSession) -> None:
    slow = await fake_backend(name="a", mode="hang")
    fast = await fake_backend(name="b")
    gw = await nexus({"server": {"request_timeout_seconds": 0.3},
                      "backends": [backend_entry(slow, priority=1), backend_entry(fast, priority=2)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
        assert resp.headers["X-Nexus-Backend"] == "b"
    fast.mode = "hang"
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 504
        error = (await resp.json())["error"]
        assert error["code"] == "gateway_timeout"


async def test_retries_stop_at_max_retries(fake_backend: BackendFactory, nexus: NexusFactory,
                                           http: aiohttp.ClientSession) -> None:
    backends = [await fake_backend(name=f"b{i}", mode="status:503") for i in range(4)]
    gw = await nexus({"routing": {"max_retries": 1}, "backends": [backend_entry(b) for b in backends]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "bad_gateway"
    assert sum(len(b.chats) for b in backends) == 2


async def test_backend_openai_4xx_is_passed_through_unchanged(fake_backend: BackendFactory, nexus: NexusFactory,
                                                             http: aiohttp.ClientSession) -> None:
    a = await fake_backend(name="a", mode="status:400")
    b = await fake_backend(name="b")
    gw = await nexus({"backends": [backend_entry(a, priority=1), backend_entry(b, priority=2)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["message"] == "fake error 400"
        assert resp.headers["X-Nexus-Backend"] == "a"
    assert len(b.chats) == 0  # the client's own error is not retried


async def test_backend_plain_text_4xx_is_wrapped_in_envelope(fake_backend: BackendFactory, nexus: NexusFactory,
                                                            http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(mode="text-status:401")
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 401
        error = (await resp.json())["error"]
    assert error["message"] == "Backend returned 401: plain failure"


async def test_200_with_invalid_json_is_502(fake_backend: BackendFactory, nexus: NexusFactory,
                                            http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(mode="garbage")
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["message"].startswith("Invalid backend response")


async def test_connection_reset_by_backend_is_502(fake_backend: BackendFactory, nexus: NexusFactory,
                                                  http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(mode="reset")
    gw = await nexus({"routing": {"max_retries": 0}, "backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 502
    # one client attempt, plus the one invisible retry for a dead pooled connection
    assert len(backend.chats) == 2


async def test_fallback_model_serves_when_primary_unavailable(fake_backend: BackendFactory, nexus: NexusFactory,
                                                             http: aiohttp.ClientSession) -> None:
    primary = await fake_backend(name="p", models=["big"])
    fallback = await fake_backend(name="f", models=["small"])
    gw = await nexus({"routing": {"fallbacks": {"big": ["small"]}},
                      "backends": [backend_entry(primary), backend_entry(fallback)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "big"}) as resp:
        assert resp.status == 200
        assert "X-Nexus-Fallback-Model" not in resp.headers
    primary.models_status = 500
    await gw.check_health()
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "big"}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Nexus-Fallback-Model"] == "small"
        assert resp.headers["X-Nexus-Route-Reason"] == "failover"
    assert fallback.chats[0].json()["model"] == "small"


async def test_fallback_after_request_time_failures(fake_backend: BackendFactory, nexus: NexusFactory,
                                                    http: aiohttp.ClientSession) -> None:
    primary = await fake_backend(name="p", models=["big"], mode="status:500")
    fallback = await fake_backend(name="f", models=["small"])
    gw = await nexus({"routing": {"fallbacks": {"big": ["small"]}},
                      "backends": [backend_entry(primary), backend_entry(fallback)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "big"}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Nexus-Fallback-Model"] == "small"
        assert resp.headers["X-Nexus-Retries"] == "1"


async def test_completions_and_embeddings_are_routed(fake_backend: BackendFactory, nexus: NexusFactory,
                                                     http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(models=["test-model", "nomic-embed-text"])
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/completions", json={"model": "test-model", "prompt": "Say hi"}) as resp:
        assert resp.status == 200
    async with http.post(f"{gw.url}/v1/embeddings", json={"model": "nomic-embed-text", "input": ["a", "b"]}) as resp:
        assert resp.status == 200
        assert len((await resp.json())["data"]) == 2
        assert resp.headers["X-Nexus-Backend"] == "fake"
    async with http.post(f"{gw.url}/v1/embeddings", json={"model": "test-model", "input": "a"}) as resp:
        assert resp.status == 400  # not an embedding model
        assert "embeddings" in (await resp.json())["error"]["message"]
    assert [r.path for r in backend.chats] == ["/v1/completions", "/v1/embeddings"]


async def test_retry_after_from_a_backend_is_honoured(fake_backend: BackendFactory, nexus: NexusFactory,
                                                      http: aiohttp.ClientSession) -> None:
    limited = await fake_backend(name="a", mode="status:429", retry_after="30")
    other = await fake_backend(name="b")
    gw = await nexus({"backends": [backend_entry(limited, priority=1), backend_entry(other, priority=2)]})
    for _ in range(3):
        async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
            assert resp.headers["X-Nexus-Backend"] == "b"
    assert len(limited.chats) == 1  # asked once, then left alone for 30 s


async def test_prompt_text_is_logged_only_when_content_logging_is_enabled(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession, caplog) -> None:
    backend = await fake_backend()
    secret = {**CHAT, "messages": [{"role": "user", "content": "my secret prompt " + "x" * 200}]}
    quiet = await nexus({"backends": [backend_entry(backend)]})
    with caplog.at_level("DEBUG", logger="nexus"):
        async with http.post(f"{quiet.url}/v1/chat/completions", json=secret) as resp:
            assert resp.status == 200
    assert "my secret prompt" not in caplog.text
    loud = await nexus({"backends": [backend_entry(backend)], "logging": {"enable_content_logging": True}})
    with caplog.at_level("INFO", logger="nexus"):
        async with http.post(f"{loud.url}/v1/chat/completions", json=secret) as resp:
            assert resp.status == 200
    preview = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Prompt preview"))
    assert preview == "Prompt preview: my secret prompt " + "x" * 83 + "..."
