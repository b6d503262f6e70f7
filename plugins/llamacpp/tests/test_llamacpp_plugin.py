"""The llama.cpp adapter against a fake following llama.cpp's documented server API
(nexus.testing.llamacpp)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from click.testing import CliRunner

import nexus_plugin_llamacpp
from nexus.registry import Status
from nexus.testing import CHAT, FakeBackend, NexusFactory, RunningNexus
from nexus.testing.llamacpp import FakeLlamaCpp
from nexus.testing.vllm import FakeVLLM
from nexus_plugin_llamacpp import LlamaCppAdapter, local
from nexus_plugin_llamacpp.demo import demo

PLUGIN = [("llamacpp", nexus_plugin_llamacpp)]
MODEL = "/models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"


@pytest.fixture
async def llama() -> AsyncIterator[FakeLlamaCpp]:
    fake = FakeLlamaCpp()
    await fake.start()
    yield fake
    await fake.stop()


def backend(fake: FakeBackend, **extra: object) -> dict[str, object]:
    return {"name": "llama", "url": fake.url, "type": "llamacpp", **extra}


def status_of(gw: RunningNexus) -> Status:
    state = gw.gateway.registry.get("llama")
    assert state is not None
    return state.status


async def test_probe_takes_n_ctx_from_props_and_normalises_v1(llama: FakeLlamaCpp, nexus: NexusFactory) -> None:
    llama.n_ctx, llama.n_ctx_train = 8192, 131072
    gw = await nexus({"backends": [backend(llama, url=llama.url + "/v1/")]}, extra_plugins=PLUGIN)
    state = gw.gateway.registry.get("llama")
    assert state is not None and state.status is Status.HEALTHY
    assert isinstance(state.adapter, LlamaCppAdapter)
    model = state.models[MODEL]
    assert (model.context_length, model.vision, model.embeddings) == (8192, False, False)
    assert [(r.method, r.path) for r in llama.received] == [
        ("GET", "/health"), ("GET", "/props"), ("GET", "/v1/models"), ("POST", "/v1/embeddings")]


async def test_loading_backend_is_not_routed_then_serves_once_loaded(llama: FakeLlamaCpp, nexus: NexusFactory,
                                                                     http: aiohttp.ClientSession) -> None:
    llama.loading = True
    gw = await nexus({"backends": [backend(llama, models=[MODEL])]}, extra_plugins=PLUGIN)
    state = gw.gateway.registry.get("llama")
    assert state is not None and state.status is Status.LOADING
    assert state.last_error == "Loading model (/health answered 503)"
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": MODEL}) as resp:
        assert resp.status == 503
        details = json.loads(resp.headers["X-Nexus-Rejection-Details"])
    assert details == [{"backend": "llama", "reconciler": "scheduling", "reason": "Backend is loading its model",
                        "suggested_action": "Retry shortly"}]
    assert [r.path for r in llama.received] == ["/health"]  # the probe stopped there; nothing was routed

    llama.loading = False
    await gw.check_health()
    assert status_of(gw) is Status.HEALTHY
    assert state.models[MODEL].context_length == llama.n_ctx
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": MODEL}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Nexus-Backend"] == "llama"


async def test_chat_is_proxied_unchanged_to_v1(llama: FakeLlamaCpp, nexus: NexusFactory,
                                               http: aiohttp.ClientSession) -> None:
    gw = await nexus({"backends": [backend(llama)]}, extra_plugins=PLUGIN)
    body = json.dumps({**CHAT, "model": MODEL, "n_probs": 2, "stream": True}).encode()
    async with http.post(f"{gw.url}/v1/chat/completions", data=body,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Nexus-Backend-Type"] == "local"
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    (chat,) = [r for r in llama.chats if r.path != "/v1/embeddings"]  # not the probe's
    assert (chat.path, chat.body) == ("/v1/chat/completions", body)


async def test_embedding_mode_is_detected(llama: FakeLlamaCpp, nexus: NexusFactory,
                                          http: aiohttp.ClientSession) -> None:
    llama.embedding = True
    gw = await nexus({"backends": [backend(llama)]}, extra_plugins=PLUGIN)
    state = gw.gateway.registry.get("llama")
    assert state is not None and state.models[MODEL].embeddings
    async with http.post(f"{gw.url}/v1/embeddings", json={"model": MODEL, "input": ["a", "b"]}) as resp:
        assert resp.status == 200
        assert len((await resp.json())["data"]) == 2


async def test_without_embedding_mode_embeddings_are_refused_unless_configured(
        llama: FakeLlamaCpp, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw = await nexus({"backends": [backend(llama)]}, extra_plugins=PLUGIN)
    async with http.post(f"{gw.url}/v1/embeddings", json={"model": MODEL, "input": "a"}) as resp:
        assert resp.status == 400
        assert "embeddings" in (await resp.json())["error"]["message"]
    configured = await nexus({"backends": [backend(llama, embedding_models=[MODEL])]}, extra_plugins=PLUGIN)
    state = configured.gateway.registry.get("llama")
    assert state is not None and state.models[MODEL].embeddings


async def test_vision_from_props_and_n_ctx_train_without_props(llama: FakeLlamaCpp, nexus: NexusFactory) -> None:
    llama.vision = True
    gw = await nexus({"backends": [backend(llama)]}, extra_plugins=PLUGIN)
    state = gw.gateway.registry.get("llama")
    assert state is not None and state.models[MODEL].vision
    llama.props_status = 404
    await gw.check_health()
    assert status_of(gw) is Status.HEALTHY
    assert state.models[MODEL].context_length == llama.n_ctx_train


@pytest.mark.parametrize("other", [FakeBackend, FakeVLLM])
async def test_a_server_of_another_type_fails_the_probe(other: type[FakeBackend], nexus: NexusFactory) -> None:
    fake = await other().start()
    try:
        gw = await nexus({"backends": [backend(fake)]}, extra_plugins=PLUGIN)
        state = gw.gateway.registry.get("llama")
        assert state is not None and state.status is Status.UNHEALTHY
    finally:
        await fake.stop()


def test_demo_without_its_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "DEMO_MODULES", ("xllamacpp", "no_such_module_for_nexus_tests"))
    result = CliRunner().invoke(demo, [])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: nexus demo needs no_such_module_for_nexus_tests: pip install 'nexus-plugin-llamacpp[demo]'"]


def test_demo_on_a_busy_port_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "DEMO_MODULES", ())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(demo, ["--port", str(port)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"Error: port {port} is in use on 127.0.0.1: pick another with --port"]
