"""A fake LM Studio server, following LM Studio's "REST API v0" document
(https://lmstudio.ai/docs/developer/rest/endpoints, ``1_developer/2_rest/endpoints.mdx`` in
github.com/lmstudio-ai/docs) and its OpenAI-compatible endpoints
(https://lmstudio.ai/docs/developer/openai-compat).

``GET /api/v0/models`` lists every downloaded model as ``{"id", "object": "model", "type":
"llm"|"vlm"|"embeddings", "publisher", "arch", "compatibility_type", "quantization", "state":
"loaded"|"not-loaded", "max_context_length"}``; loaded models also carry
``loaded_context_length`` (seen on real servers, not in the document's example).
``GET /v1/models`` lists
``{"id", "object": "model", "owned_by": "organization_owner"}`` entries. An endpoint LM
Studio does not know is answered with HTTP 200 and ``{"error": "Unexpected endpoint or
method. (METHOD /path)"}`` (lmstudio-ai/lmstudio-bug-tracker#618).

``api_v0`` picks the server generation: ``"ok"`` (0.3.6 or newer), ``"unexpected"``
(older: ``/api/v0`` is an unknown endpoint) or ``"404"`` (a server or proxy that answers
404 there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from multidict import CIMultiDict

from nexus.testing.fakes import FakeBackend, Received


@dataclass
class LMModel:
    """One model as ``/api/v0/models`` describes it."""

    id: str
    type: str = "llm"
    state: str = "loaded"
    max_context_length: int = 4096
    loaded_context_length: int | None = None
    publisher: str = "lmstudio-community"
    arch: str = "llama"
    compatibility_type: str = "gguf"
    quantization: str = "Q4_K_M"

    def v0(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": self.id, "object": "model", "type": self.type, "publisher": self.publisher,
            "arch": self.arch, "compatibility_type": self.compatibility_type,
            "quantization": self.quantization, "state": self.state,
            "max_context_length": self.max_context_length,
        }
        if self.state == "loaded" and self.loaded_context_length is not None:
            entry["loaded_context_length"] = self.loaded_context_length
        return entry


@dataclass
class FakeLMStudio(FakeBackend):
    lm_models: list[LMModel] = field(default_factory=lambda: [LMModel("meta-llama-3.1-8b-instruct")])
    api_v0: Literal["ok", "unexpected", "404"] = "ok"
    name: str = "lmstudio"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.models = [m.id for m in self.lm_models]  # JIT loading on: /v1/models lists every downloaded model

    def routes(self) -> list[web.RouteDef]:
        routes = super().routes()
        if self.api_v0 == "ok":
            routes.append(web.get("/api/v0/models", self._v0_models))
        routes.append(web.route("*", "/{tail:.*}", self._unexpected))
        return routes

    def model_entry(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "owned_by": "organization_owner"}

    def _record(self, request: web.Request) -> None:
        self.received.append(Received(request.method, request.path, CIMultiDict(request.headers), b""))

    async def _v0_models(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.json_response({"object": "list", "data": [m.v0() for m in self.lm_models]})

    async def _unexpected(self, request: web.Request) -> web.Response:
        self._record(request)
        if self.api_v0 == "404":
            return web.Response(status=404, text="Not Found")
        return web.json_response({"error": f"Unexpected endpoint or method. ({request.method} {request.path})"})
