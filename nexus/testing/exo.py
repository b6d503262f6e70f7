"""A fake exo node, following exo's API as implemented in github.com/exo-explore/exo
``src/exo/api/main.py`` (types in ``src/exo/api/types/api.py``, streaming in
``src/exo/api/adapters/chat_completions.py`` and ``src/exo/api/keepalive.py``) and described
in its ``docs/api.md`` (exo 1.0, commit b5375f8).

- ``GET /v1/models`` and ``GET /models`` list the whole model catalogue:
  ``{"object": "list", "data": [{"id", "object": "model", "created", "owned_by": "exo",
  "hugging_face_id", "name", "context_length", "tasks", "capabilities", ...}]}``.
- ``GET /ollama/api/ps`` lists the models with a running instance:
  ``{"models": [{"name", "model", "size": 0}]}``.
- ``GET /node_id`` returns the node id as a JSON string.
- ``POST /v1/chat/completions`` for a model without a running instance answers 404
  ``{"error": {"message": "No instance found for model …", "type": "Not Found",
  "param": null, "code": 404}}``. A stream starts with the SSE comment ``: keep-alive``,
  sends ``chat.completion`` objects with a ``delta`` and ends with ``data: [DONE]``.
- There is no ``/v1/embeddings``; unknown paths answer 404.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from nexus.testing.fakes import FakeBackend, Received


@dataclass
class ExoCard:
    """One model card of exo's catalogue."""

    id: str
    context_length: int = 131072
    tasks: list[str] = field(default_factory=lambda: ["TextGeneration"])
    capabilities: list[str] = field(default_factory=lambda: ["text"])

    def entry(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": 1, "owned_by": "exo", "hugging_face_id": self.id,
                "name": self.id.rsplit("/", 1)[-1], "description": "", "context_length": self.context_length,
                "tags": [], "storage_size_megabytes": 0, "supports_tensor": True, "tasks": self.tasks,
                "is_custom": False, "family": "", "quantization": "", "base_model": "",
                "capabilities": self.capabilities, "reasoning_dialect": "none"}


@dataclass
class FakeExo(FakeBackend):
    cards: list[ExoCard] = field(default_factory=lambda: [ExoCard("mlx-community/Llama-3.2-1B-Instruct-4bit")])
    running: list[str] = field(default_factory=lambda: ["mlx-community/Llama-3.2-1B-Instruct-4bit"])
    ps_status: int = 200  # 404 imitates exo before 1.0.68 (no Ollama-compatible API)
    name: str = "exo"
    node_id: str = "12D3KooWFakeExoNode"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.models = [card.id for card in self.cards]

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/models", self._models),
            web.get("/models", self._models),
            web.get("/ollama/api/ps", self._ps),
            web.get("/node_id", self._node_id),
            web.post("/v1/chat/completions", self._chat),
        ]

    def model_entry(self, model: str) -> dict[str, Any]:
        return next(card.entry() for card in self.cards if card.id == model)

    def _record(self, request: web.Request) -> None:
        self.received.append(Received(request.method, request.path, CIMultiDict(request.headers), b""))

    async def _ps(self, request: web.Request) -> web.Response:
        self._record(request)
        if self.ps_status != 200:
            return web.json_response({"detail": "Not Found"}, status=self.ps_status)
        running = [{"name": model, "model": model, "size": 0} for model in dict.fromkeys(self.running)]
        return web.json_response({"models": running})

    async def _node_id(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.json_response(self.node_id)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        payload = json.loads(body)
        model = payload.get("model")
        if model in self.running and (self.mode != "ok" or not payload.get("stream")):
            return await self._generate(request)  # the shared fake: plain answers and misbehaviour
        self.received.append(Received("POST", request.path, CIMultiDict(request.headers), body))
        if model not in self.running:
            error = {"message": f"No instance found for model {model}", "type": "Not Found", "param": None,
                     "code": 404}
            return web.json_response({"error": error}, status=404)
        return await self._exo_stream(request, model)

    async def _exo_stream(self, request: web.Request, model: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(b": keep-alive\n\n")
        last = len(self.stream_chunks) - 1
        for i, text in enumerate(self.stream_chunks):
            event = {"id": "cmd-1", "object": "chat.completion", "created": 1, "model": model,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                  "finish_reason": "stop" if i == last else None}]}
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
