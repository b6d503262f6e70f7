"""A fake OpenAI-compatible backend: a real aiohttp server on a random port.

It follows the OpenAI API reference (https://platform.openai.com/docs/api-reference):
``GET /v1/models`` returns ``{"object": "list", "data": [{"id", "object": "model", ...}]}``;
``POST /v1/chat/completions`` returns a ``chat.completion`` object, or with
``"stream": true`` a ``text/event-stream`` of ``chat.completion.chunk`` events ending
with ``data: [DONE]``; ``POST /v1/embeddings`` returns a ``list`` of ``embedding``
objects. It records every request it receives, and ``mode`` makes it misbehave.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

Mode = str  # see FakeBackend.mode


@dataclass
class Received:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def chunk(text: str, model: str = "test-model", finish: str | None = None) -> bytes:
    payload = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def completion(text: str = "Hello!", model: str = "test-model") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


@dataclass
class FakeBackend:
    """Modes for chat/completions/embeddings:

    ``ok``; ``status:<code>`` (OpenAI error body with that status); ``text-status:<code>``
    (plain text body); ``garbage`` (200, not JSON); ``hang`` (never answers);
    ``reset`` (closes the connection without answering); ``cut`` (stream stops after two
    chunks without ``[DONE]``, connection closed); ``slow`` (stream with a pause you
    release with ``release``); ``close-after-stream`` (keeps-alive in headers but closes
    the socket after each response, like the native llama.cpp server).
    """

    models: list[str] = field(default_factory=lambda: ["test-model"])
    name: str = "fake"
    mode: Mode = "ok"
    models_status: int = 200
    stream_chunks: list[str] = field(default_factory=lambda: ["Hel", "lo", "!"])
    received: list[Received] = field(default_factory=list)
    models_body: bytes | None = None
    retry_after: str | None = None  # sent with status:<code> answers when set
    port: int = 0
    url: str = ""

    def __post_init__(self) -> None:
        self.release = asyncio.Event()
        self.client_gone = asyncio.Event()
        self.got_request = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def chats(self) -> list[Received]:
        return [r for r in self.received if r.method == "POST"]

    async def start(self, port: int = 0) -> FakeBackend:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes(self.routes())
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def routes(self) -> list[web.RouteDef]:
        """The OpenAI endpoints; fakes of other backends add their native ones."""
        return [
            web.get("/v1/models", self._models),
            web.post("/v1/chat/completions", self._generate),
            web.post("/v1/completions", self._generate),
            web.post("/v1/embeddings", self._embeddings),
        ]

    def model_entry(self, model: str) -> dict[str, Any]:
        """One ``/v1/models`` entry (fakes of other backends add their own fields)."""
        return {"id": model, "object": "model", "created": 1, "owned_by": self.name}

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        self.received.append(Received("GET", request.path, CIMultiDict(request.headers), b""))
        if self.models_body is not None:
            return web.Response(body=self.models_body, status=self.models_status, content_type="application/json")
        data = [self.model_entry(m) for m in self.models]
        return web.json_response({"object": "list", "data": data}, status=self.models_status)

    async def _misbehave(self, request: web.Request) -> web.StreamResponse | None:
        mode = self.mode
        if mode.startswith("status:"):
            status = int(mode.split(":")[1])
            error = {"error": {"message": f"fake error {status}", "type": "invalid_request_error",
                               "param": None, "code": "fake"}}
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return web.json_response(error, status=status, headers=headers)
        if mode.startswith("text-status:"):
            return web.Response(text="plain failure", status=int(mode.split(":")[1]))
        if mode == "garbage":
            return web.Response(body=b"<html>not json", content_type="application/json")
        if mode == "hang":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:  # the gateway closed the connection
                self.client_gone.set()
                raise
        if mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        return None

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received("POST", request.path, CIMultiDict(request.headers), body))
        self.got_request.set()
        misbehaved = await self._misbehave(request)
        if misbehaved is not None:
            return misbehaved
        payload = json.loads(body)
        model = payload.get("model", "?")
        if not payload.get("stream"):
            response = web.json_response(completion(model=model))
            if self.mode == "close-after-stream":
                response.force_close()
            return response
        return await self._stream(request, model, bool((payload.get("stream_options") or {}).get("include_usage")))

    async def _stream(self, request: web.Request, model: str, include_usage: bool = False) -> web.StreamResponse:
        """Chunks of ``stream_chunks``; with ``stream_options.include_usage``, a last chunk with
        empty ``choices`` and the usage, as OpenAI sends it (API reference, chat streaming)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Connection": "keep-alive"})
        await response.prepare(request)
        try:
            for i, text in enumerate(self.stream_chunks):
                await response.write(chunk(text, model))
                if self.mode == "cut" and i == 1:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if self.mode == "slow" and i == 0:
                    await self.release.wait()
            await response.write(chunk("", model, finish="stop"))
            if include_usage:
                usage = {"prompt_tokens": 3, "completion_tokens": len(self.stream_chunks), "total_tokens": 3 + len(self.stream_chunks)}
                await response.write(b"data: " + json.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                                             "model": model, "choices": [], "usage": usage}).encode()
                                     + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.client_gone.set()
            raise
        if self.mode == "close-after-stream":
            assert request.transport is not None
            request.transport.close()  # keep-alive was promised; close anyway, as llama.cpp does
        return response

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received("POST", request.path, CIMultiDict(request.headers), body))
        misbehaved = await self._misbehave(request)
        if misbehaved is not None:
            return misbehaved
        payload = json.loads(body)
        inputs = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i, _ in enumerate(inputs)]
        return web.json_response({"object": "list", "data": data, "model": payload["model"],
                                  "usage": {"prompt_tokens": 1, "total_tokens": 1}})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
