"""The vLLM adapter against a fake that follows vLLM's documented API (nexus.testing.vllm)."""

from __future__ import annotations

import aiohttp

from nexus.registry import Status
from nexus.testing import CHAT, NexusFactory
from nexus.testing.vllm import FakeVLLM
from nexus_plugin_vllm import VLLMAdapter
import nexus_plugin_vllm


async def start(**kwargs: object) -> FakeVLLM:
    return await FakeVLLM(**kwargs).start()  # type: ignore[arg-type]


async def test_models_carry_max_model_len_and_chat_is_proxied(nexus: NexusFactory,
                                                              http: aiohttp.ClientSession) -> None:
    fake = await start(models=["meta-llama/Llama-3.1-8B-Instruct"], max_model_len=32768)
    try:
        gw = await nexus({"backends": [{"name": "gpu", "url": fake.url + "/v1", "type": "vllm"}]},
                         extra_plugins=[("vllm", nexus_plugin_vllm)])
        state = gw.gateway.registry.get("gpu")
        assert state is not None and state.status is Status.HEALTHY
        model = state.models["meta-llama/Llama-3.1-8B-Instruct"]
        assert model.context_length == 32768
        assert isinstance(state.adapter, VLLMAdapter)
        async with http.post(f"{gw.url}/v1/chat/completions",
                             json={**CHAT, "model": "meta-llama/Llama-3.1-8B-Instruct"}) as resp:
            assert resp.status == 200
            assert resp.headers["X-Nexus-Backend-Type"] == "local"
        assert [r.path for r in fake.received] == ["/v1/models", "/v1/chat/completions"]
    finally:
        await fake.stop()


async def test_failing_health_endpoint_marks_backend_unhealthy(nexus: NexusFactory) -> None:
    fake = await start(health_status=500)
    try:
        gw = await nexus({"backends": [{"name": "gpu", "url": fake.url, "type": "vllm"}]},
                         extra_plugins=[("vllm", nexus_plugin_vllm)])
        state = gw.gateway.registry.get("gpu")
        assert state is not None and state.status is Status.UNHEALTHY
        assert state.last_error == "HTTP error: 500 from /health"
    finally:
        await fake.stop()


async def test_embedding_model_is_recognised(nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    fake = await start(models=["intfloat/e5-mistral-7b-instruct"])
    try:
        gw = await nexus({"backends": [{"name": "emb", "url": fake.url, "type": "vllm",
                                        "embedding_models": ["intfloat/e5-mistral-7b-instruct"]}]},
                         extra_plugins=[("vllm", nexus_plugin_vllm)])
        async with http.post(f"{gw.url}/v1/embeddings",
                             json={"model": "intfloat/e5-mistral-7b-instruct", "input": "hello"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["data"][0]["object"] == "embedding"
    finally:
        await fake.stop()
