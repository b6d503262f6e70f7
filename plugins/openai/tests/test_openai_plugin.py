"""The OpenAI adapter against a fake that follows the OpenAI API reference
(nexus.testing.openai_api), and exact token counting with no network."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from importlib.metadata import entry_points
from importlib.resources import files
from pathlib import Path

import aiohttp
import pytest

import nexus_plugin_openai
from nexus.config import BackendConfig
from nexus.errors import ConfigError
from nexus.registry import Status
from nexus.testing import CHAT, BackendFactory, NexusFactory, RunningNexus, backend_entry
from nexus.testing.openai_api import FakeOpenAI, mask_key
from nexus_plugin_openai import OpenAIAdapter, count_tokens, encoding_name
from nexus_plugin_openai.models import model_info, routable

KEY_ENV = "NEXUS_TEST_OPENAI_KEY"
KEY = "sk-proj-nexus-test-secret-0123456789abcdefWXYZ"
PLUGINS = [("openai", nexus_plugin_openai)]


@pytest.fixture
async def openai_api() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI(api_key=KEY)
    await fake.start()
    yield fake
    await fake.stop()


def openai_entry(url: str, **extra: object) -> dict[str, object]:
    return {"name": "openai", "url": url, "type": "openai", "api_key_env": KEY_ENV, **extra}


async def start(nexus: NexusFactory, *backends: dict[str, object]) -> RunningNexus:
    return await nexus({"backends": list(backends)}, extra_plugins=PLUGINS)


# -- authentication, zone and headers ---------------------------------------------------

async def test_key_from_env_is_sent_as_bearer_and_client_authorization_is_not(
        openai_api: FakeOpenAI, nexus: NexusFactory, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    gw = await start(nexus, openai_entry(openai_api.url + "/v1/"))
    state = gw.gateway.registry.get("openai")
    assert state is not None and state.status is Status.HEALTHY and state.zone == "open"
    assert isinstance(state.adapter, OpenAIAdapter) and state.url == openai_api.url
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "gpt-4o-mini"},
                         headers={"Authorization": "Bearer client-token-must-not-travel"}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Nexus-Backend"] == "openai"
        assert resp.headers["X-Nexus-Backend-Type"] == "cloud"
        assert resp.headers["X-Nexus-Privacy-Zone"] == "open"
    async with http.post(f"{gw.url}/v1/chat/completions",
                         json={**CHAT, "model": "gpt-4o-mini", "stream": True}) as resp:
        assert resp.status == 200 and resp.headers["X-Nexus-Backend-Type"] == "cloud"
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert [r.path for r in openai_api.received] == ["/v1/models", "/v1/chat/completions", "/v1/chat/completions"]
    assert {r.headers["Authorization"] for r in openai_api.received} == {f"Bearer {KEY}"}
    assert openai_api.rejected == []


async def test_embeddings_go_to_openai_with_the_key(openai_api: FakeOpenAI, nexus: NexusFactory,
                                                    http: aiohttp.ClientSession,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    gw = await start(nexus, openai_entry(openai_api.url))
    async with http.post(f"{gw.url}/v1/embeddings", json={"model": "text-embedding-3-small", "input": ["a", "b"]},
                         headers={"Authorization": "Bearer client"}) as resp:
        assert resp.status == 200
        assert [d["index"] for d in (await resp.json())["data"]] == [0, 1]
    assert openai_api.received[-1].headers["Authorization"] == f"Bearer {KEY}"


async def test_models_carry_openai_capabilities_and_skip_non_text_models(
        openai_api: FakeOpenAI, nexus: NexusFactory, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    gw = await start(nexus, openai_entry(openai_api.url, models=["gpt-4.1-mini"]))
    async with http.get(f"{gw.url}/v1/models") as resp:
        listed = {m["id"]: m for m in (await resp.json())["data"]}
    assert sorted(listed) == ["gpt-4.1", "gpt-4.1-mini", "gpt-4o-mini", "gpt-5", "o3-mini",
                              "text-embedding-3-small"]  # no dall-e-3, whisper-1, realtime
    assert listed["gpt-4o-mini"]["context_length"] == 128_000
    assert listed["gpt-4.1-mini"]["context_length"] == 1_047_576  # configured, described by the table
    state = gw.gateway.registry.get("openai")
    assert state is not None
    assert state.models["o3-mini"] == model_info("o3-mini")
    assert state.models["text-embedding-3-small"].embeddings


# -- missing or wrong keys ----------------------------------------------------------------

async def test_missing_key_env_skips_the_backend_and_the_server_keeps_running(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    local = await fake_backend(name="local")
    with caplog.at_level(logging.WARNING, logger="nexus"):
        gw = await start(nexus, openai_entry("https://api.openai.com"), backend_entry(local))
    assert gw.gateway.registry.get("openai") is None
    assert f"Skipping backend openai: environment variable {KEY_ENV} is not set" in caplog.text
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200 and resp.headers["X-Nexus-Backend"] == "local"
    async with http.get(f"{gw.url}/health") as resp:
        assert resp.status == 200


async def test_config_without_api_key_env_is_refused_with_a_clear_message(
        nexus: NexusFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # even a key in the usual place is never picked up implicitly
    spec = BackendConfig(name="oai", url="https://api.openai.com", type="openai")
    with pytest.raises(ValueError, match=r"backend 'oai' of type 'openai' needs api_key_env"):
        OpenAIAdapter.check_spec(spec)
    with pytest.raises(ConfigError, match=r"backends\[0\] \(oai\): backend 'oai' of type 'openai' needs api_key_env"):
        await start(nexus, {"name": "oai", "url": "https://api.openai.com", "type": "openai"})


async def test_rejected_key_marks_unhealthy_without_revealing_it(
        openai_api: FakeOpenAI, nexus: NexusFactory, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    wrong = "sk-proj-wrong-key-abcdefghijklmnopQRST"
    monkeypatch.setenv(KEY_ENV, wrong)
    with caplog.at_level(logging.DEBUG):
        gw = await start(nexus, openai_entry(openai_api.url))
        async with http.get(f"{gw.url}/v1/backends") as resp:
            backends = await resp.text()
    state = gw.gateway.registry.get("openai")
    assert state is not None and state.status is Status.UNHEALTHY
    assert state.last_error == f"authentication failed: HTTP 401 (invalid_api_key); OpenAI rejected the key in {KEY_ENV}"
    assert mask_key(wrong) in FakeOpenAI.auth_error(wrong)["error"]["message"]  # what OpenAI would have said
    for fragment in (wrong, wrong[:8], wrong[-4:], mask_key(wrong)):
        assert fragment not in backends and fragment not in caplog.text
    assert openai_api.rejected[0].headers["Authorization"] == f"Bearer {wrong}"


async def test_key_never_appears_in_logs_or_api_answers(
        openai_api: FakeOpenAI, nexus: NexusFactory, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    answers: list[str] = []
    with caplog.at_level(logging.DEBUG):
        gw = await start(nexus, openai_entry(openai_api.url))
        for body in ({**CHAT, "model": "gpt-5"}, {**CHAT, "model": "gpt-5", "stream": True},
                     {**CHAT, "model": "no-such-model"}):
            async with http.post(f"{gw.url}/v1/chat/completions", json=body) as resp:
                answers.append(json.dumps(dict(resp.headers)) + await resp.text())
        openai_api.mode = "status:500"
        async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "gpt-5"}) as resp:
            assert resp.status == 502
            answers.append(await resp.text())
        for path in ("/v1/backends", "/v1/models", "/health", "/v1/stats", "/v1/history"):
            async with http.get(f"{gw.url}{path}") as resp:
                answers.append(await resp.text())
    assert len(openai_api.chats) == 3
    records = " ".join(repr(vars(r)) for r in caplog.records)
    for fragment in (KEY, KEY[-12:]):
        assert fragment not in caplog.text and fragment not in records
        assert all(fragment not in answer for answer in answers)


# -- base URL ------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["https://api.openai.com", "https://api.openai.com/", "https://api.openai.com/v1",
                                 "https://api.openai.com/v1/"])
async def test_base_url_is_normalised(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        adapter = OpenAIAdapter(BackendConfig(name="o", url=url, type="openai", api_key_env=KEY_ENV), session,
                                api_key=KEY)
    assert adapter.base_url == nexus_plugin_openai.DEFAULT_URL == OpenAIAdapter.default_url
    assert adapter.upstream_url("/v1/chat/completions") == "https://api.openai.com/v1/chat/completions"
    assert adapter.upstream_headers("Bearer client") == {"Content-Type": "application/json",
                                                         "Authorization": f"Bearer {KEY}"}
    assert OpenAIAdapter.cloud and OpenAIAdapter.default_zone() == "open"


async def test_a_local_server_added_without_type_is_not_taken_for_openai(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    local = await fake_backend()
    gw = await nexus(extra_plugins=PLUGINS)
    async with http.post(f"{gw.url}/v1/backends", json={"url": local.url, "name": "added"}) as resp:
        assert resp.status == 201
        assert (await resp.json())["type"] == "generic"


def test_the_plugin_is_registered_under_its_type_name() -> None:
    found = {ep.name: ep.value for ep in entry_points(group="nexus.plugins")}
    assert found.get("openai") == "nexus_plugin_openai"


# -- capabilities ---------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "context", "vision", "tools", "json_mode", "embeddings"), [
    ("gpt-5", 400_000, True, True, True, False),
    ("gpt-5-mini-2025-08-07", 400_000, True, True, True, False),
    ("gpt-5-chat-latest", 128_000, True, True, True, False),
    ("gpt-5.4", 1_050_000, True, True, True, False),
    ("gpt-5.4-mini", 400_000, True, True, True, False),
    ("gpt-4.1-nano", 1_047_576, True, True, True, False),
    ("gpt-4o-2024-08-06", 128_000, True, True, True, False),
    ("ft:gpt-4o-mini-2024-07-18:acme::abc123", 128_000, True, True, True, False),
    ("o1-mini", 128_000, False, False, False, False),
    ("o3-mini", 200_000, False, True, True, False),
    ("o4-mini", 200_000, True, True, True, False),
    ("gpt-4-turbo-preview", 128_000, False, True, True, False),
    ("gpt-4-0613", 8_192, False, True, False, False),
    ("gpt-3.5-turbo", 16_385, False, True, True, False),
    ("text-embedding-3-large", 8_191, False, False, False, True),
    ("gpt-7-preview", None, True, True, True, False),  # unknown: optimistic, context unknown
])
def test_capability_table(model: str, context: int | None, vision: bool, tools: bool, json_mode: bool,
                          embeddings: bool) -> None:
    info = model_info(model)
    assert (info.id, info.context_length, info.vision, info.tools, info.json_mode, info.embeddings) == \
        (model, context, vision, tools, json_mode, embeddings)


def test_only_text_models_are_routable() -> None:
    assert all(routable(m) for m in ("gpt-4o-audio-preview", "gpt-5", "text-embedding-3-small", "davinci-002"))
    assert not any(routable(m) for m in ("dall-e-3", "gpt-image-1", "whisper-1", "tts-1-hd", "gpt-4o-mini-tts",
                                         "gpt-4o-transcribe", "gpt-realtime", "omni-moderation-latest", "sora-2"))


# -- token counting, offline ----------------------------------------------------------------

@pytest.mark.parametrize(("model", "encoding"), [
    ("gpt-5", "o200k_base"), ("gpt-5.1-codex", "o200k_base"), ("gpt-4.1-mini", "o200k_base"),
    ("gpt-4o", "o200k_base"), ("chatgpt-4o-latest", "o200k_base"), ("o1", "o200k_base"), ("o3-mini", "o200k_base"),
    ("o4-mini-2025-04-16", "o200k_base"), ("ft:gpt-4.1-mini-2025-04-14:acme::x1", "o200k_base"),
    ("gpt-oss-120b", "o200k_base"), ("gpt-4", "cl100k_base"), ("gpt-4-turbo", "cl100k_base"),
    ("gpt-3.5-turbo-0125", "cl100k_base"), ("text-embedding-3-small", "cl100k_base"),
    ("text-embedding-ada-002", "cl100k_base"), ("some-future-model", "o200k_base"), ("davinci", "o200k_base"),
])
def test_encoding_for_model(model: str, encoding: str) -> None:
    assert encoding_name(model) == encoding


_GUARDED = r'''
import json, os, sys

def _no_network(event, args):  # stricter than needed: not even loopback or a local proxy
    if event == "socket.connect" and isinstance(args[1], tuple):
        raise ConnectionRefusedError(f"network blocked by test: {args[1]!r}")
    if event == "socket.getaddrinfo":
        raise OSError(f"network blocked by test: lookup of {args[0]!r}")

sys.addaudithook(_no_network)
cases, prefilled = json.loads(sys.argv[1]), sys.argv[2]
empty = os.environ["TIKTOKEN_CACHE_DIR"]

import tiktoken
try:  # tiktoken alone, with an empty cache, would have to download
    tiktoken.get_encoding("o200k_base")
    blocked = None
except Exception as exc:
    blocked = f"{type(exc).__name__}: {exc}"

from nexus_plugin_openai import count_tokens
from nexus_plugin_openai.tokens import get_encoding
counts = [count_tokens(model, text) for model, text in cases]
ids = {n: get_encoding(n).encode_ordinary("tiktoken is great!") for n in ("cl100k_base", "o200k_base")}
cache_after = os.listdir(empty)

# tiktoken's own definition, fed from a cache that holds our files (it checks their SHA-256)
from tiktoken_ext import openai_public
os.environ["TIKTOKEN_CACHE_DIR"] = prefilled
same = {}
for name in ("cl100k_base", "o200k_base"):
    theirs, ours = openai_public.ENCODING_CONSTRUCTORS[name](), get_encoding(name)
    same[name] = (theirs["pat_str"] == ours._pat_str and theirs["special_tokens"] == ours._special_tokens
                  and theirs["mergeable_ranks"] == ours._mergeable_ranks)
print(json.dumps({"blocked": blocked, "counts": counts, "ids": ids, "cache_after": cache_after, "same": same}))
'''

COUNTS = [  # (model, text, tokens), checked against tiktoken itself
    ("gpt-4o", "hello world", 2),
    ("gpt-4", "hello world", 2),
    ("gpt-5", "tiktoken is great!", 6),
    ("gpt-3.5-turbo", "tiktoken is great!", 6),
    ("gpt-4.1", "日本語のテキストです。", 8),
    ("text-embedding-3-small", "日本語のテキストです。", 10),
    ("o3", "Hello, world! How are you today?", 9),
    ("gpt-4", "def f(x):\n    return x ** 2\n", 11),
    ("gpt-4o-mini", "<|endoftext|> ok", 8),  # special-token text counts as text
    ("o4-mini", "", 0),
]


def test_exact_counts_with_no_network_and_an_empty_tiktoken_cache(tmp_path: Path) -> None:
    empty, prefilled = tmp_path / "empty-cache", tmp_path / "prefilled-cache"
    empty.mkdir()
    prefilled.mkdir()
    for name in ("cl100k_base", "o200k_base"):
        url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"  # tiktoken's cache key
        packed = (files("nexus_plugin_openai") / "encodings" / f"{name}.tiktoken.gz").read_bytes()
        (prefilled / hashlib.sha1(url.encode()).hexdigest()).write_bytes(gzip.decompress(packed))
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_GYM_CACHE_DIR", "TIKTOKEN_CACHE_DIR")}
    env["TIKTOKEN_CACHE_DIR"] = str(empty)
    cases = json.dumps([[model, text] for model, text, _ in COUNTS])
    done = subprocess.run([sys.executable, "-c", _GUARDED, cases, str(prefilled)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["blocked"] is not None and "network blocked by test" in result["blocked"]
    assert result["counts"] == [tokens for _, _, tokens in COUNTS]
    assert result["ids"] == {"cl100k_base": [83, 1609, 5963, 374, 2294, 0],  # OpenAI cookbook,
                             "o200k_base": [83, 8251, 2488, 382, 2212, 0]}   # "How to count tokens"
    assert result["cache_after"] == []  # nothing written to tiktoken's cache
    assert result["same"] == {"cl100k_base": True, "o200k_base": True}


async def test_the_adapter_counts_tokens_for_its_models() -> None:
    async with aiohttp.ClientSession() as session:
        adapter = OpenAIAdapter(BackendConfig(name="o", url=nexus_plugin_openai.DEFAULT_URL, type="openai",
                                              api_key_env=KEY_ENV), session, api_key=KEY)
        assert adapter.count_tokens("gpt-4o", "hello world") == count_tokens("gpt-4", "hello world") == 2


async def test_missing_api_key_env_is_a_one_line_start_up_error(tmp_path: Path) -> None:
    config = tmp_path / "nexus.toml"
    config.write_text('[[backends]]\nname = "oai"\nurl = "https://api.openai.com"\ntype = "openai"\n')
    result = await asyncio.create_subprocess_exec(sys.executable, "-m", "nexus", "config", "check", "-c", str(config),
                                                  stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await result.communicate()
    assert result.returncode == 1
    lines = err.decode().splitlines()
    assert len(lines) == 1 and "backends[0] (oai): " in lines[0] and "needs api_key_env" in lines[0]


async def test_revoked_configured_key_is_never_passed_through(nexus: NexusFactory, http: aiohttp.ClientSession,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAI's 401 body quotes part of the key: the client gets a 502 naming the backend instead."""
    fake = FakeOpenAI(api_key=KEY)
    await fake.start()
    try:
        monkeypatch.setenv(KEY_ENV, KEY)
        gw = await start(nexus, openai_entry(fake.url))
        fake.api_key = "sk-rotated-elsewhere"
        async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "gpt-4o-mini"}) as resp:
            assert resp.status == 502
            text = await resp.text()
        assert KEY[:8] not in text and "rejected the key configured" in text
    finally:
        await fake.stop()
