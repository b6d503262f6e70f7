"""The exo adapter against a fake that follows exo's own API (nexus.testing.exo)."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

import nexus_plugin_exo
from nexus.registry import Status
from nexus.testing import CHAT, BackendFactory, NexusFactory, RunningNexus, installed_plugin
from nexus.testing.exo import ExoCard, FakeExo
from nexus_plugin_exo import ExoAdapter

PLUGIN = [("exo", nexus_plugin_exo)]
LLAMA = "mlx-community/Llama-3.2-1B-Instruct-4bit"
QWEN_VL = "mlx-community/Qwen2.5-VL-7B-Instruct-4bit"
IDLE = "mlx-community/DeepSeek-V3.1-4bit"
FLUX = "exolabs/FLUX.1-schnell"

FakeFactory = Callable[..., Awaitable[FakeExo]]


@pytest.fixture
def exo(fake_backend: BackendFactory) -> FakeFactory:
    return functools.partial(fake_backend, FakeExo)  # type: ignore[return-value]


async def gateway(nexus: NexusFactory, fake: FakeExo, **backend: Any) -> RunningNexus:
    return await nexus({"backends": [{"name": "cluster", "url": fake.url + "/v1", "type": "exo", **backend}]},
                       extra_plugins=PLUGIN)


def catalogue() -> list[ExoCard]:
    return [
        ExoCard(LLAMA, context_length=131072),
        ExoCard(QWEN_VL, context_length=32768, capabilities=["text", "vision"]),
        ExoCard(IDLE, capabilities=["text", "thinking"]),
        ExoCard(FLUX, context_length=0, tasks=["TextToImage"], capabilities=["image_gen"]),
    ]


async def test_running_models_are_listed_with_their_cards(nexus: NexusFactory, exo: FakeFactory,
                                                          http: aiohttp.ClientSession) -> None:
    fake = await exo(cards=catalogue(), running=[LLAMA, QWEN_VL, FLUX])
    gw = await gateway(nexus, fake)
    state = gw.gateway.registry.get("cluster")
    assert state is not None and state.status is Status.HEALTHY
    assert isinstance(state.adapter, ExoAdapter)
    assert sorted(state.models) == [LLAMA, QWEN_VL]  # not the idle catalogue entry, not the image model
    llama, vl = state.models[LLAMA], state.models[QWEN_VL]
    assert (llama.context_length, llama.vision, llama.embeddings) == (131072, False, False)
    assert (vl.context_length, vl.vision) == (32768, True)
    assert [r.path for r in fake.received] == ["/v1/models", "/ollama/api/ps"]
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": IDLE}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "model_not_found"
    assert not fake.chats


async def test_chat_is_proxied(nexus: NexusFactory, exo: FakeFactory, http: aiohttp.ClientSession) -> None:
    fake = await exo()
    gw = await gateway(nexus, fake)
    body = {**CHAT, "model": LLAMA, "max_tokens": 16, "top_k": 5}
    async with http.post(f"{gw.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["X-Nexus-Backend"] == "cluster"
        assert (await resp.json())["choices"][0]["message"]["content"]
    async with http.post(f"{gw.url}/v1/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.status == 200
        streamed = (await resp.read()).decode()
    assert streamed.startswith(": keep-alive\n\n") and streamed.endswith("data: [DONE]\n\n")
    assert [json.loads(r.body) for r in fake.chats] == [body, {**body, "stream": True}]


async def test_failing_model_list_marks_backend_unhealthy(nexus: NexusFactory, exo: FakeFactory) -> None:
    fake = await exo(models_status=500)
    gw = await gateway(nexus, fake)
    state = gw.gateway.registry.get("cluster")
    assert state is not None and state.status is Status.UNHEALTHY
    assert state.last_error == "HTTP error: 500 from /v1/models"


async def test_failing_running_list_marks_backend_unhealthy(nexus: NexusFactory, exo: FakeFactory) -> None:
    fake = await exo(ps_status=500)
    gw = await gateway(nexus, fake)
    state = gw.gateway.registry.get("cluster")
    assert state is not None and state.status is Status.UNHEALTHY
    assert state.last_error == "HTTP error: 500 from /ollama/api/ps"


async def test_exo_without_running_list_keeps_configured_models(nexus: NexusFactory, exo: FakeFactory,
                                                               http: aiohttp.ClientSession) -> None:
    fake = await exo(ps_status=404)
    gw = await gateway(nexus, fake, models=[LLAMA])
    state = gw.gateway.registry.get("cluster")
    assert state is not None and state.status is Status.HEALTHY
    assert list(state.models) == [LLAMA]
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": LLAMA}) as resp:
        assert resp.status == 200


async def test_model_that_stopped_running_is_exo_s_404(nexus: NexusFactory, exo: FakeFactory,
                                                       http: aiohttp.ClientSession) -> None:
    fake = await exo()
    gw = await gateway(nexus, fake)
    fake.running = []  # the instance was deleted between two health checks
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": LLAMA}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["message"] == f"No instance found for model {LLAMA}"
    await gw.check_health()
    state = gw.gateway.registry.get("cluster")
    assert state is not None and state.models == {}


def test_nexus_plugins_lists_exo() -> None:
    listed = installed_plugin("exo")
    assert listed["source"] == "nexus-plugin-exo"
    assert listed["version"] == nexus_plugin_exo.__version__
    assert listed["errors"] == []
