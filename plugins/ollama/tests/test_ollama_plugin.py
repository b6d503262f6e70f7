"""The Ollama adapter against a fake that follows Ollama's documented API (nexus.testing.ollama)."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest

import nexus_plugin_ollama
from nexus import ProbeFailed
from nexus.config import BackendConfig
from nexus.errors import ModelNotFound
from nexus.registry import Backend, Status
from nexus.testing import (
    CHAT,
    BackendFactory,
    FakeBackend,
    NexusFactory,
    RunningNexus,
    chunk,
    completion,
    installed_plugin,
)
from nexus.testing.ollama import FakeOllama, OllamaModel, vector
from nexus_plugin_ollama import OllamaAdapter

PLUGINS: list[tuple[str, object]] = [("ollama", nexus_plugin_ollama)]
OllamaFactory = Callable[..., Awaitable[FakeOllama]]

CHATTY = OllamaModel("qwen3:8b", capabilities=["completion", "tools", "thinking"], context_length=40960,
                     architecture="qwen3")
SEEING = OllamaModel("gemma3:4b", capabilities=["completion", "vision"], context_length=131072,
                     architecture="gemma3")
EMBEDDER = OllamaModel("nomic-embed-text:latest", capabilities=["embedding"], context_length=2048,
                       architecture="nomic-bert", embedding_length=4)
# Its name says "vision" but Ollama says it cannot see: the real capabilities must win.
MISLEADING = OllamaModel("my-vision-tuned:latest", capabilities=["completion"], context_length=4096)


def catalog(*models: OllamaModel) -> list[OllamaModel]:
    """Fresh copies, so a test may change a model without touching the others."""
    return [OllamaModel(m.name, list(m.capabilities or []) or None, m.context_length, m.architecture,
                        m.embedding_length) for m in models]


@pytest.fixture
def ollama(fake_backend: BackendFactory) -> OllamaFactory:
    return functools.partial(fake_backend, FakeOllama)  # type: ignore[return-value]


def entry(fake: FakeBackend, name: str = "ollama", **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": fake.url, "type": "ollama", **extra}


async def gateway(nexus: NexusFactory, *backends: dict[str, Any], **raw: Any) -> RunningNexus:
    return await nexus({"backends": list(backends), **raw}, extra_plugins=PLUGINS)


def backend(gw: RunningNexus, name: str = "ollama") -> Backend:
    state = gw.gateway.registry.get(name)
    assert state is not None
    return state


def adapter(gw: RunningNexus, name: str = "ollama") -> OllamaAdapter:
    found = backend(gw, name).adapter
    assert isinstance(found, OllamaAdapter)
    return found


# -- models and capabilities -----------------------------------------------------------------


async def test_capabilities_and_context_length_come_from_api_show(nexus: NexusFactory, ollama: OllamaFactory,
                                                                  http: aiohttp.ClientSession) -> None:
    fake = await ollama(catalog=catalog(CHATTY, SEEING, EMBEDDER, MISLEADING))
    gw = await gateway(nexus, entry(fake))
    state = backend(gw)
    assert state.status is Status.HEALTHY
    qwen, gemma, embed, misleading = (state.models[m.name] for m in (CHATTY, SEEING, EMBEDDER, MISLEADING))
    assert (qwen.context_length, qwen.tools, qwen.vision, qwen.json_mode, qwen.embeddings) == (40960, True, False,
                                                                                              True, False)
    assert (gemma.context_length, gemma.vision, gemma.tools, gemma.json_mode) == (131072, True, False, True)
    assert (embed.context_length, embed.embeddings, embed.json_mode, embed.tools) == (2048, True, False, False)
    assert (misleading.vision, misleading.tools) == (False, False)
    assert [json.loads(r.body) for r in fake.native if r.path == "/api/show"] == [
        {"model": name} for name in ("qwen3:8b", "gemma3:4b", "nomic-embed-text:latest", "my-vision-tuned:latest")
    ]
    async with http.get(f"{gw.url}/v1/models") as resp:
        listing = {m["id"]: m for m in (await resp.json())["data"]}
    assert listing["gemma3:4b"]["context_length"] == 131072
    assert listing["gemma3:4b"]["capabilities"] == {"vision": True, "tools": False, "json_mode": True,
                                                    "embeddings": False}
    assert listing["nomic-embed-text:latest"]["owned_by"] == "ollama"


async def test_show_results_are_cached_by_digest(nexus: NexusFactory, ollama: OllamaFactory) -> None:
    fake = await ollama(catalog=catalog(CHATTY, SEEING))
    gw = await gateway(nexus, entry(fake))
    assert fake.show_calls == {"qwen3:8b": 1, "gemma3:4b": 1}
    assert sorted(r.path for r in fake.native) == ["/api/ps", "/api/show", "/api/show", "/api/tags", "/api/version"]

    fake.received.clear()
    await gw.check_health()  # nothing changed: one /api/tags and one /api/ps, no /api/show
    assert sorted(r.path for r in fake.native) == ["/api/ps", "/api/tags"]
    assert fake.show_calls == {"qwen3:8b": 1, "gemma3:4b": 1}

    qwen = fake.model("qwen3:8b")
    assert qwen is not None
    qwen.digest, qwen.capabilities = "f" * 64, ["completion", "tools", "vision"]  # re-pulled: a new digest
    fake.catalog.append(OllamaModel("phi4:14b", context_length=16384, architecture="phi3"))
    await gw.check_health()
    assert fake.show_calls == {"qwen3:8b": 2, "gemma3:4b": 1, "phi4:14b": 1}
    models = backend(gw).models
    assert models["qwen3:8b"].vision is True
    assert models["phi4:14b"].context_length == 16384

    fake.catalog = [m for m in fake.catalog if m.name != "gemma3:4b"]  # `ollama rm gemma3:4b`
    await gw.check_health()
    assert sorted(backend(gw).models) == ["phi4:14b", "qwen3:8b"]
    assert fake.show_calls == {"qwen3:8b": 2, "gemma3:4b": 1, "phi4:14b": 1}


async def test_show_failure_falls_back_to_name_heuristics_and_is_retried(nexus: NexusFactory,
                                                                         ollama: OllamaFactory) -> None:
    llava = OllamaModel("llava:13b", capabilities=["completion", "vision"], context_length=4096)
    fake = await ollama(catalog=[llava], show_fails=["llava:13b"])
    gw = await gateway(nexus, entry(fake))
    state = backend(gw)
    assert state.status is Status.HEALTHY  # /api/show is enrichment: its failure is not a health failure
    guessed = state.models["llava:13b"]
    assert (guessed.vision, guessed.tools, guessed.json_mode, guessed.context_length) == (True, True, True, None)

    fake.show_fails.clear()
    await gw.check_health()  # a failed /api/show is not cached: asked again, and now answered
    assert fake.show_calls == {"llava:13b": 2}
    shown = backend(gw).models["llava:13b"]
    assert (shown.vision, shown.tools, shown.context_length) == (True, False, 4096)


async def test_ollama_without_capabilities_field_uses_heuristics_with_real_context(nexus: NexusFactory,
                                                                                   ollama: OllamaFactory) -> None:
    old = OllamaModel("all-minilm-embed:latest", capabilities=None, context_length=512, architecture="bert")
    fake = await ollama(catalog=[old], version="0.5.1")  # before 0.6.4, /api/show has no "capabilities"
    gw = await gateway(nexus, entry(fake))
    info = backend(gw).models["all-minilm-embed:latest"]
    assert (info.context_length, info.embeddings) == (512, True)


async def test_embedding_models_setting_marks_an_embedding_model(nexus: NexusFactory, ollama: OllamaFactory) -> None:
    custom = OllamaModel("acme/retriever:v2", capabilities=["completion"])
    fake = await ollama(catalog=[custom])
    gw = await gateway(nexus, entry(fake, embedding_models=["acme/retriever:v2"]))
    assert backend(gw).models["acme/retriever:v2"].embeddings is True


# -- health ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "error"), [
    ({"tags_status": 500}, "HTTP error: 500 from /api/tags"),
    ({"tags_body": b'{"object": "list", "data": []}'}, "invalid response: /api/tags is not"),
    ({"tags_body": b"<html>Ollama is running"}, "invalid response: /api/tags is not"),
])
async def test_api_tags_failure_marks_backend_unhealthy(nexus: NexusFactory, ollama: OllamaFactory,
                                                        fault: dict[str, Any], error: str) -> None:
    fake = await ollama(**fault)
    gw = await gateway(nexus, entry(fake))
    state = backend(gw)
    assert state.status is Status.UNHEALTHY
    assert state.last_error is not None and state.last_error.startswith(error)
    assert [r.path for r in fake.native] == ["/api/tags"]  # nothing else is asked of a failing server


async def test_probe_rejects_a_plain_openai_server(fake_backend: Callable[..., Awaitable[FakeBackend]],
                                                   http: aiohttp.ClientSession) -> None:
    plain = await fake_backend()  # type detection relies on this: /api/tags answers 404 there
    probe = OllamaAdapter(BackendConfig(name="x", url=plain.url, type="ollama"), http)
    with pytest.raises(ProbeFailed, match="HTTP error: 404 from /api/tags"):
        await probe.probe()


async def test_api_ps_failure_keeps_backend_healthy_and_ranks_nothing_down(nexus: NexusFactory,
                                                                           ollama: OllamaFactory) -> None:
    fake = await ollama(catalog=catalog(CHATTY), ps_status=500)
    gw = await gateway(nexus, entry(fake))
    state = backend(gw)
    assert state.status is Status.HEALTHY
    assert state.models["qwen3:8b"].loaded is True


async def test_version_is_recorded_at_first_contact_and_after_an_outage(nexus: NexusFactory,
                                                                        ollama: OllamaFactory) -> None:
    fake = await ollama(catalog=catalog(CHATTY))
    gw = await gateway(nexus, entry(fake))
    assert adapter(gw).version == "0.12.6"
    await gw.check_health()
    assert [r.path for r in fake.native].count("/api/version") == 1

    fake.tags_status = 502
    await gw.check_health()
    fake.tags_status, fake.version = 200, "0.13.0"  # upgraded while it was down
    await gw.check_health()
    assert adapter(gw).version == "0.13.0"


# -- loaded models ---------------------------------------------------------------------------


async def test_backend_with_the_model_loaded_is_preferred(nexus: NexusFactory, ollama: OllamaFactory,
                                                          http: aiohttp.ClientSession) -> None:
    cold = await ollama(catalog=catalog(CHATTY))
    warm = await ollama(catalog=catalog(CHATTY), loaded=["qwen3:8b"])
    # "cold" would win on priority (lower is better) and on name; only the loaded state favours "warm".
    gw = await gateway(nexus, entry(cold, "cold", priority=1), entry(warm, "warm", priority=90))
    assert backend(gw, "cold").models["qwen3:8b"].loaded is False
    assert backend(gw, "warm").models["qwen3:8b"].loaded is True
    for _ in range(3):
        async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "qwen3:8b"}) as resp:
            assert resp.status == 200
            assert resp.headers["X-Nexus-Backend"] == "warm"

    await adapter(gw, "warm").unload_model("qwen3:8b")
    await adapter(gw, "cold").load_model("qwen3:8b")
    await gw.check_health()
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "qwen3:8b"}) as resp:
        assert resp.headers["X-Nexus-Backend"] == "cold"


async def test_load_and_unload_use_api_generate_with_keep_alive(nexus: NexusFactory, ollama: OllamaFactory) -> None:
    fake = await ollama(catalog=catalog(CHATTY, SEEING), loaded=["gemma3:4b"])
    gw = await gateway(nexus, entry(fake), plugins={"ollama": {"keep_alive": "30m"}})
    ollama_adapter = adapter(gw)
    fake.received.clear()

    await ollama_adapter.load_model("qwen3:8b")
    await ollama_adapter.unload_model("gemma3:4b")
    assert [(r.path, r.json()) for r in fake.native] == [
        ("/api/generate", {"model": "qwen3:8b", "keep_alive": "30m"}),
        ("/api/generate", {"model": "gemma3:4b", "keep_alive": 0}),
    ]
    assert fake.loaded == ["qwen3:8b"]
    with pytest.raises(ModelNotFound, match="model 'nope:latest' not found"):
        await ollama_adapter.load_model("nope:latest")

    usage = await ollama_adapter.resource_usage()
    assert usage["version"] == "0.12.6"
    assert usage["vram_used_bytes"] == CHATTY.size
    assert usage["loaded_models"] == [{"name": "qwen3:8b", "size_bytes": CHATTY.size + 1024,
                                       "vram_bytes": CHATTY.size, "context_length": 4096,
                                       "expires_at": "2024-06-04T14:38:31.83753-07:00"}]


async def test_unknown_plugin_setting_skips_the_backend(nexus: NexusFactory, ollama: OllamaFactory) -> None:
    fake = await ollama()
    gw = await gateway(nexus, entry(fake), plugins={"ollama": {"keepalive": "30m"}})
    assert gw.gateway.registry.get("ollama") is None


# -- proxying --------------------------------------------------------------------------------


async def test_chat_and_completions_pass_through_byte_for_byte(nexus: NexusFactory, ollama: OllamaFactory,
                                                               http: aiohttp.ClientSession) -> None:
    fake = await ollama(catalog=catalog(CHATTY))
    gw = await gateway(nexus, entry(fake))
    body = (b'{"model": "qwen3:8b",  "messages":[{"role":"user","content":"Caf\\u00e9 \xc3\xa9"}],'
            b'"tools":[{"type":"function","function":{"name":"f","parameters":{}}}],"x_vendor":{"keep":[1,2.50]}}')
    async with http.post(f"{gw.url}/v1/chat/completions", data=body,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Nexus-Backend"] == "ollama"
        assert await resp.read() == json.dumps(completion(model="qwen3:8b")).encode()
    assert (fake.received[-1].path, fake.received[-1].body) == ("/v1/chat/completions", body)

    stream_body = b'{"model":"qwen3:8b","stream":true,"messages":[{"role":"user","content":"Hi"}]}'
    async with http.post(f"{gw.url}/v1/chat/completions", data=stream_body,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        streamed = await resp.read()
    expected = b"".join(chunk(t, "qwen3:8b") for t in fake.stream_chunks)
    assert streamed == expected + chunk("", "qwen3:8b", finish="stop") + b"data: [DONE]\n\n"
    assert fake.received[-1].body == stream_body

    legacy = b'{"model":"qwen3:8b","prompt":"Once upon","max_tokens":5}'
    async with http.post(f"{gw.url}/v1/completions", data=legacy, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
    assert (fake.received[-1].path, fake.received[-1].body) == ("/v1/completions", legacy)


async def test_vision_and_tools_routing_use_the_real_capabilities(nexus: NexusFactory, ollama: OllamaFactory,
                                                                  http: aiohttp.ClientSession) -> None:
    fake = await ollama(catalog=catalog(CHATTY, SEEING, MISLEADING))
    gw = await gateway(nexus, entry(fake))
    image = {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]

    async def status(payload: dict[str, Any]) -> tuple[int, str]:
        async with http.post(f"{gw.url}/v1/chat/completions", json=payload) as resp:
            return resp.status, await resp.text()

    code, text = await status({"model": "my-vision-tuned:latest", "messages": [image]})
    assert code == 400 and "vision" in text
    assert (await status({"model": "gemma3:4b", "messages": [image]}))[0] == 200
    code, text = await status({"model": "gemma3:4b", "messages": [{"role": "user", "content": "Hi"}], "tools": tools})
    assert code == 400 and "tools" in text
    assert (await status({"model": "qwen3:8b", "messages": [{"role": "user", "content": "Hi"}], "tools": tools}))[0] == 200
    json_mode = {"model": "qwen3:8b", "messages": [{"role": "user", "content": "JSON"}],
                 "response_format": {"type": "json_object"}}
    assert (await status(json_mode))[0] == 200


# -- embeddings ------------------------------------------------------------------------------


async def test_embeddings_single_input_are_translated_to_api_embed(nexus: NexusFactory, ollama: OllamaFactory,
                                                                   http: aiohttp.ClientSession) -> None:
    fake = await ollama(catalog=catalog(CHATTY, EMBEDDER))
    gw = await gateway(nexus, entry(fake))
    async with http.post(f"{gw.url}/v1/embeddings", json={"model": "nomic-embed-text:latest",
                                                           "input": "hello world"},
                         headers={"X-Request-Id": "req-embed-1"}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Nexus-Backend"] == "ollama"
        assert resp.headers["X-Nexus-Backend-Type"] == "local"
        assert resp.headers["X-Nexus-Privacy-Zone"] == "restricted"
        assert resp.headers["X-Request-Id"] == "req-embed-1"
        answer = await resp.json()
    assert answer == {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": vector("hello world", 4)}],
        "model": "nomic-embed-text:latest",
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }
    sent = fake.received[-1]
    assert (sent.path, sent.json()) == ("/api/embed", {"model": "nomic-embed-text:latest", "input": "hello world"})
    assert sent.headers["X-Request-Id"] == "req-embed-1"


async def test_embeddings_batch_with_dimensions(nexus: NexusFactory, ollama: OllamaFactory,
                                                http: aiohttp.ClientSession) -> None:
    fake = await ollama(catalog=catalog(EMBEDDER))
    gw = await gateway(nexus, entry(fake))
    texts = ["Why is the sky blue?", "Why is the grass green?", "Why?"]
    request = {"model": "nomic-embed-text:latest", "input": texts, "dimensions": 8, "encoding_format": "float",
               "user": "u-1", "truncate": False}
    async with http.post(f"{gw.url}/v1/embeddings", json=request) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert [(d["index"], d["embedding"]) for d in answer["data"]] == [(i, vector(t, 8)) for i, t in enumerate(texts)]
    assert answer["usage"] == {"prompt_tokens": 11, "total_tokens": 11}
    assert fake.received[-1].json() == {"model": "nomic-embed-text:latest", "input": texts, "truncate": False,
                                        "dimensions": 8}  # one call for the batch, OpenAI-only fields dropped


async def test_embeddings_base64_through_the_openai_sdk(nexus: NexusFactory, ollama: OllamaFactory,
                                                        http: aiohttp.ClientSession) -> None:
    fake = await ollama(catalog=catalog(EMBEDDER))
    gw = await gateway(nexus, entry(fake))
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0) as client:
        result = await client.embeddings.create(model="nomic-embed-text:latest", input=["a b", "c"])
    assert fake.received[-1].json() == {"model": "nomic-embed-text:latest", "input": ["a b", "c"]}
    assert [list(d.embedding) for d in result.data] == [vector("a b", 4), vector("c", 4)]  # SDK asked for base64
    assert result.usage.prompt_tokens == 3

    async with http.post(f"{gw.url}/v1/embeddings", json={"model": "nomic-embed-text:latest", "input": "x",
                                                           "encoding_format": "base64"}) as resp:
        encoded = (await resp.json())["data"][0]["embedding"]
    assert list(struct.unpack("<4f", base64.b64decode(encoded))) == vector("x", 4)


async def test_concurrent_embeddings_keep_their_own_encoding_format(nexus: NexusFactory, ollama: OllamaFactory,
                                                                    http: aiohttp.ClientSession) -> None:
    fake = await ollama(catalog=catalog(EMBEDDER))
    gw = await gateway(nexus, entry(fake))

    async def embed(i: int) -> None:
        fmt = "base64" if i % 2 else "float"
        async with http.post(f"{gw.url}/v1/embeddings", json={"model": "nomic-embed-text:latest",
                                                               "input": f"text {i}", "encoding_format": fmt}) as resp:
            got = (await resp.json())["data"][0]["embedding"]
        if fmt == "base64":
            got = list(struct.unpack("<4f", base64.b64decode(got)))
        assert got == vector(f"text {i}", 4)

    await asyncio.gather(*(embed(i) for i in range(20)))


async def test_embeddings_requests_ollama_cannot_serve_are_refused(nexus: NexusFactory, ollama: OllamaFactory,
                                                                   http: aiohttp.ClientSession) -> None:
    fake = await ollama(catalog=catalog(CHATTY, EMBEDDER))
    gw = await gateway(nexus, entry(fake))

    async def refusal(payload: dict[str, Any]) -> dict[str, Any]:
        async with http.post(f"{gw.url}/v1/embeddings", json=payload) as resp:
            assert resp.status == 400
            error: dict[str, Any] = (await resp.json())["error"]
            return error

    model = "nomic-embed-text:latest"
    assert (await refusal({"model": model, "input": "x", "encoding_format": "int8"}))["param"] == "encoding_format"
    assert "token arrays" in (await refusal({"model": model, "input": [[1, 2, 3]]}))["message"]
    assert (await refusal({"model": model, "input": []}))["param"] == "input"
    assert "embeddings" in (await refusal({"model": "qwen3:8b", "input": "x"}))["message"]  # not an embedding model
    assert not [r for r in fake.received if r.path == "/api/embed"]


# -- packaging -------------------------------------------------------------------------------


def test_nexus_plugins_lists_the_installed_plugin() -> None:
    listed = installed_plugin("ollama")
    assert listed["source"] == "nexus-plugin-ollama"
    assert listed["version"] == nexus_plugin_ollama.__version__
    assert listed["hooks"] == ["register_backend_types"]
    assert listed["errors"] == []
