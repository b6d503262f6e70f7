"""The LM Studio adapter against a fake that follows LM Studio's REST API v0 (nexus.testing.lmstudio)."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

import nexus_plugin_lmstudio
from nexus.registry import Status
from nexus.testing import CHAT, BackendFactory, NexusFactory, RunningNexus, installed_plugin
from nexus.testing.lmstudio import FakeLMStudio, LMModel
from nexus_plugin_lmstudio import LMStudioAdapter

PLUGIN = [("lmstudio", nexus_plugin_lmstudio)]
LLAMA = "meta-llama-3.1-8b-instruct"
QWEN_VL = "qwen2-vl-7b-instruct"
NOMIC = "text-embedding-nomic-embed-text-v1.5"
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}

FakeFactory = Callable[..., Awaitable[FakeLMStudio]]


@pytest.fixture
def lmstudio(fake_backend: BackendFactory) -> FakeFactory:
    return functools.partial(fake_backend, FakeLMStudio)  # type: ignore[return-value]


async def gateway(nexus: NexusFactory, *fakes: FakeLMStudio) -> RunningNexus:
    backends = [{"name": fake.name, "url": fake.url, "type": "lmstudio"} for fake in fakes]
    return await nexus({"backends": backends}, extra_plugins=PLUGIN)


def chat(model: str, content: Any = "Hi") -> dict[str, Any]:
    return {**CHAT, "model": model, "messages": [{"role": "user", "content": content}]}


async def test_v0_types_states_and_context(nexus: NexusFactory, lmstudio: FakeFactory) -> None:
    fake = await lmstudio(lm_models=[
        LMModel(LLAMA, state="loaded", max_context_length=131072, loaded_context_length=8192),
        LMModel(QWEN_VL, type="vlm", state="not-loaded", max_context_length=32768),
        LMModel(NOMIC, type="embeddings", state="not-loaded", max_context_length=2048),
    ])
    gw = await gateway(nexus, fake)
    state = gw.gateway.registry.get("lmstudio")
    assert state is not None and state.status is Status.HEALTHY
    assert isinstance(state.adapter, LMStudioAdapter)
    llama, vlm, nomic = state.models[LLAMA], state.models[QWEN_VL], state.models[NOMIC]
    assert (llama.context_length, llama.loaded, llama.vision, llama.embeddings) == (8192, True, False, False)
    assert (vlm.context_length, vlm.loaded, vlm.vision, vlm.embeddings) == (32768, False, True, False)
    assert (nomic.context_length, nomic.loaded, nomic.embeddings, nomic.tools) == (2048, False, True, False)
    assert [r.path for r in fake.received] == ["/api/v0/models"]


async def test_loaded_backend_ranks_before_not_loaded_one(nexus: NexusFactory, lmstudio: FakeFactory,
                                                         http: aiohttp.ClientSession) -> None:
    # "a-cold" would win the name tie-break; being loaded must matter more.
    cold = await lmstudio(name="a-cold", lm_models=[LMModel(LLAMA, state="not-loaded")])
    warm = await lmstudio(name="b-warm", lm_models=[LMModel(LLAMA, state="loaded")])
    gw = await gateway(nexus, cold, warm)
    for _ in range(2):
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat(LLAMA)) as resp:
            assert resp.status == 200
            assert resp.headers["X-Nexus-Backend"] == "b-warm"
    assert not cold.chats and len(warm.chats) == 2


async def test_not_loaded_model_is_routable_when_alone(nexus: NexusFactory, lmstudio: FakeFactory,
                                                      http: aiohttp.ClientSession) -> None:
    fake = await lmstudio(lm_models=[LMModel(LLAMA, state="not-loaded")])
    gw = await gateway(nexus, fake)
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat(LLAMA)) as resp:
        assert resp.status == 200
        assert resp.headers["X-Nexus-Backend"] == "lmstudio"
    assert [r.path for r in fake.chats] == ["/v1/chat/completions"]  # LM Studio loads it on demand (JIT)


async def test_vlm_accepts_images_and_llm_does_not(nexus: NexusFactory, lmstudio: FakeFactory,
                                                  http: aiohttp.ClientSession) -> None:
    fake = await lmstudio(lm_models=[LMModel(QWEN_VL, type="vlm"), LMModel(LLAMA)])
    gw = await gateway(nexus, fake)
    content = [{"type": "text", "text": "What is this?"}, IMAGE]
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat(QWEN_VL, content)) as resp:
        assert resp.status == 200
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat(LLAMA, content)) as resp:
        assert resp.status == 400
        assert "vision" in (await resp.json())["error"]["message"]
    assert json.loads(fake.chats[0].body)["messages"][0]["content"][1] == IMAGE  # forwarded as sent
    assert len(fake.chats) == 1


async def test_embeddings_go_to_embedding_models_only(nexus: NexusFactory, lmstudio: FakeFactory,
                                                     http: aiohttp.ClientSession) -> None:
    fake = await lmstudio(lm_models=[LMModel(NOMIC, type="embeddings", arch="nomic-bert"), LMModel(LLAMA)])
    gw = await gateway(nexus, fake)
    async with http.post(f"{gw.url}/v1/embeddings", json={"model": NOMIC, "input": "hello"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["data"][0]["object"] == "embedding"
    async with http.post(f"{gw.url}/v1/embeddings", json={"model": LLAMA, "input": "hello"}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error" and "embeddings" in error["message"]
    assert [r.path for r in fake.chats] == ["/v1/embeddings"]


async def test_prompt_longer_than_max_context_length_is_refused(nexus: NexusFactory, lmstudio: FakeFactory,
                                                                http: aiohttp.ClientSession) -> None:
    fake = await lmstudio(lm_models=[LMModel(LLAMA, state="not-loaded", max_context_length=1024)])
    gw = await gateway(nexus, fake)
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat(LLAMA, "word " * 1200)) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "context_length_exceeded"
    async with http.get(f"{gw.url}/v1/models") as resp:
        assert [m["context_length"] for m in (await resp.json())["data"]] == [1024]
    assert not fake.chats


@pytest.mark.parametrize("api_v0", ["404", "unexpected"])
async def test_server_without_rest_api_v0_falls_back_to_v1_models(nexus: NexusFactory, lmstudio: FakeFactory,
                                                                  http: aiohttp.ClientSession,
                                                                  api_v0: str) -> None:
    fake = await lmstudio(api_v0=api_v0, lm_models=[LMModel("llava-v1.5-7b-32k"), LMModel(NOMIC)])
    gw = await gateway(nexus, fake)
    state = gw.gateway.registry.get("lmstudio")
    assert state is not None and state.status is Status.HEALTHY
    llava, nomic = state.models["llava-v1.5-7b-32k"], state.models[NOMIC]
    assert (llava.vision, llava.context_length, llava.loaded) == (True, 32768, True)  # from the name
    assert nomic.embeddings
    assert [r.path for r in fake.received] == ["/api/v0/models", "/v1/models"]
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat("llava-v1.5-7b-32k")) as resp:
        assert resp.status == 200


async def test_failing_model_list_marks_backend_unhealthy(nexus: NexusFactory, lmstudio: FakeFactory) -> None:
    fake = await lmstudio(models_status=500, api_v0="404")
    gw = await gateway(nexus, fake)
    state = gw.gateway.registry.get("lmstudio")
    assert state is not None and state.status is Status.UNHEALTHY
    assert state.last_error == "HTTP error: 500"


def test_nexus_plugins_lists_lmstudio() -> None:
    listed = installed_plugin("lmstudio")
    assert listed["source"] == "nexus-plugin-lmstudio"
    assert listed["version"] == nexus_plugin_lmstudio.__version__
    assert listed["errors"] == []


async def test_type_detection_accepts_lm_studio_and_refuses_other_servers(nexus: NexusFactory,
                                                                          fake_backend: BackendFactory) -> None:
    lmstudio = await FakeLMStudio(models=[LMModel("qwen2.5-7b-instruct")]).start()
    plain = await fake_backend()  # an OpenAI-compatible server without /api/v0
    try:
        gw = await nexus(extra_plugins=[("lmstudio", nexus_plugin_lmstudio)])
        assert await gw.gateway.detect_type(lmstudio.url) == "lmstudio"
        assert await gw.gateway.detect_type(plain.url) == "generic"
    finally:
        await lmstudio.stop()
