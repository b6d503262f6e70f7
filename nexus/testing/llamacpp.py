"""A fake llama.cpp server, following llama.cpp's server documentation
(``tools/server/README.md`` in ggml-org/llama.cpp,
https://github.com/ggml-org/llama.cpp/blob/master/tools/server/README.md) and the
answers of the real server (llama.cpp as shipped in the ``xllamacpp`` wheel):

- ``GET /health``: 200 ``{"status": "ok"}``; while the model loads, 503
  ``{"error": {"code": 503, "message": "Loading model",
  "type": "unavailable_error"}}`` (``loading = True``; the fake answers so everywhere);
- ``GET /props``: ``default_generation_settings.n_ctx`` (the context of one slot),
  ``total_slots``, ``model_path``, ``modalities.vision``, ``build_info``;
- ``GET /v1/models``: one entry, ``id`` = the model path (or ``--alias``),
  ``owned_by: "llamacpp"``, ``meta`` with ``n_ctx_train``, ``n_embd``, ``n_vocab``...;
- ``POST /v1/embeddings``: without ``--embeddings`` (``embedding = False``) 501
  ``not_supported_error``; with it, 400 ``invalid_request_error`` when the body has no
  ``input``, else the OpenAI list of embeddings.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from nexus.testing.fakes import FakeBackend, Received


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(code: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, "type": kind}}, status=code)


@dataclass
class FakeLlamaCpp(FakeBackend):
    models: list[str] = field(default_factory=lambda: ["/models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"])
    name: str = "llamacpp"
    n_ctx: int = 4096  # what /props reports: -c divided among the slots
    n_ctx_train: int = 131072
    n_embd: int = 4096
    total_slots: int = 1
    vision: bool = False
    embedding: bool = False  # started with --embeddings
    loading: bool = False  # every endpoint answers 503 "Loading model"
    props_status: int = 200  # e.g. 404: a server without /props

    def routes(self) -> list[web.RouteDef]:
        openai = [web.route(r.method, r.path, self._unless_loading(r.handler))
                  for r in super().routes() if r.path != "/v1/embeddings"]
        own = [web.get("/health", self._health), web.get("/props", self._props),
               web.post("/v1/embeddings", self._llama_embeddings)]
        return [web.route(r.method, r.path, self._unless_loading(r.handler)) for r in own] + openai

    def model_entry(self, model: str) -> dict[str, Any]:
        meta = {"vocab_type": 2, "n_vocab": 128256, "n_ctx_train": self.n_ctx_train, "n_embd": self.n_embd,
                "n_params": 8030261312, "size": 4912898304}
        return {**super().model_entry(model), "owned_by": "llamacpp", "meta": meta}

    def _unless_loading(self, handler: Handler) -> Handler:
        async def answer(request: web.Request) -> web.StreamResponse:
            if not self.loading:
                return await handler(request)
            self.received.append(Received(request.method, request.path, request.headers.copy(), await request.read()))
            return _error(503, "Loading model", "unavailable_error")

        return answer

    def _record(self, request: web.Request, body: bytes = b"") -> None:
        self.received.append(Received(request.method, request.path, request.headers.copy(), body))

    async def _health(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.json_response({"status": "ok"})

    async def _props(self, request: web.Request) -> web.Response:
        self._record(request)
        if self.props_status != 200:
            return _error(self.props_status, "File Not Found", "not_found_error")
        return web.json_response({
            "default_generation_settings": {"id": 0, "id_task": -1, "n_ctx": self.n_ctx, "speculative": False,
                                            "is_processing": False, "params": {"n_predict": -1}},
            "total_slots": self.total_slots,
            "model_path": self.models[0],
            "chat_template": "...",
            "modalities": {"vision": self.vision},
            "build_info": "b0-fake",
        })

    async def _llama_embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if not self.embedding:
            self._record(request, body)
            return _error(501, "This server does not support embeddings. Start it with `--embeddings`",
                          "not_supported_error")
        if "input" not in json.loads(body):
            self._record(request, body)
            return _error(400, '"input" or "content" must be provided', "invalid_request_error")
        return await self._embeddings(request)  # records it
