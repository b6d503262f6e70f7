"""The real openai SDK, sync and async, streaming and not, against Nexus."""

from __future__ import annotations

import asyncio

import openai
import pytest

from nexus.testing import BackendFactory, NexusFactory, backend_entry
from tests.plugins.support import serve_nexus, wait_for_health

MESSAGES = [{"role": "user", "content": "Hi"}]


async def test_async_client_chat_and_stream(fake_backend: BackendFactory, nexus: NexusFactory) -> None:
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="sk-client", max_retries=0) as client:
        reply = await client.chat.completions.create(model="test-model", messages=MESSAGES)
        assert reply.choices[0].message.content == "Hello!"
        assert reply.usage is not None and reply.usage.total_tokens == 5
        stream = await client.chat.completions.create(model="test-model", messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text == "Hello!"
        models = await client.models.list()
        assert [m.id for m in models.data] == ["test-model"]
    assert backend.chats[0].headers["Authorization"] == "Bearer sk-client"


async def test_sync_client_chat_and_stream(fake_backend: BackendFactory, nexus: NexusFactory) -> None:
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)]})

    def use_sync_client() -> tuple[str, str]:
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0) as client:
            reply = client.chat.completions.create(model="test-model", messages=MESSAGES)
            stream = client.chat.completions.create(model="test-model", messages=MESSAGES, stream=True)
            return reply.choices[0].message.content or "", "".join(c.choices[0].delta.content or "" for c in stream)

    assert await asyncio.to_thread(use_sync_client) == ("Hello!", "Hello!")


async def test_sdk_sees_gateway_errors_as_api_errors(nexus: NexusFactory) -> None:
    gw = await nexus()
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="nope", messages=MESSAGES)
    assert caught.value.code == "model_not_found"


async def test_sdk_stream_cut_midway_raises_not_silently_completes(fake_backend: BackendFactory,
                                                                   nexus: NexusFactory) -> None:
    backend = await fake_backend(mode="cut")
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0) as client:
        stream = await client.chat.completions.create(model="test-model", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass


async def test_sdk_embeddings(fake_backend: BackendFactory, nexus: NexusFactory) -> None:
    backend = await fake_backend(models=["text-embed-small"])
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0) as client:
        result = await client.embeddings.create(model="text-embed-small", input=["a", "b"], encoding_format="float")
    assert [d.embedding for d in result.data] == [[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]]


async def test_sdk_streams_a_chat_through_nexus_serve(fake_backend: BackendFactory, tmp_path) -> None:
    """The whole product: the console script, a config file, a backend, the SDK streaming."""
    backend = await fake_backend(models=["llama3"])
    config = tmp_path / "nexus.toml"
    config.write_text(f'[[backends]]\nname = "lab"\nurl = "{backend.url}/v1"\ntype = "generic"\n')
    async with serve_nexus("-c", str(config), cwd=tmp_path) as served:
        await wait_for_health(served.url, healthy_backends=1)
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0) as client:
            stream = await client.chat.completions.create(model="llama3", messages=MESSAGES, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == "Hello!"
    assert backend.chats[0].json()["stream"] is True
