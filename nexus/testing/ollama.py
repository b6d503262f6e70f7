"""A fake Ollama server, following Ollama's API documentation in the ollama/ollama
repository (read at commit fb30760996871fa9460115c753afd2c60d4ab0f7):

* ``docs/api.md`` — "List Local Models" (``GET /api/tags``: ``{"models": [{"name",
  "model", "modified_at", "size", "digest", "details"}]}``), "Show Model Information"
  (``POST /api/show {"model"}`` -> ``model_info`` with ``<arch>.context_length`` and
  ``capabilities`` such as ``["completion", "vision"]``), "List Running Models"
  (``GET /api/ps``: ``name``, ``size``, ``digest``, ``expires_at``, ``size_vram``),
  "Generate Embeddings" (``POST /api/embed {"model", "input": str | [str],
  "dimensions"?, "truncate"?}`` -> ``{"model", "embeddings": [[...]], "total_duration",
  "load_duration", "prompt_eval_count"}``), "Load a model" / "Unload a model"
  (``POST /api/generate {"model"}`` with no prompt, ``"keep_alive": 0`` to unload, ->
  ``{"model", "created_at", "response": "", "done": true, "done_reason"}``) and
  "Version" (``GET /api/version`` -> ``{"version"}``);
* ``docs/openapi.yaml`` — the same schemas, including ``context_length`` of a running
  model in ``/api/ps``;
* ``docs/api/errors.mdx`` — native errors are ``{"error": "<message>"}`` (404
  ``model '<name>' not found``, as ``server/routes.go`` words it);
* ``docs/api/openai-compatibility.mdx`` (formerly ``docs/openai.md``) — the ``/v1/*``
  endpoints, served by :class:`nexus.testing.fakes.FakeBackend` (OpenAI shapes).

It counts ``/api/show`` calls per model (``show_calls``) so the digest cache can be tested.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from nexus.testing.fakes import FakeBackend, Received

_EXPIRES_AT = "2024-06-04T14:38:31.83753-07:00"
_CREATED_AT = "2023-12-18T19:52:07.071755Z"


@dataclass
class OllamaModel:
    """One local model of the fake: what ``/api/tags`` and ``/api/show`` say about it."""

    name: str
    capabilities: list[str] | None = field(default_factory=lambda: ["completion"])  # None: an Ollama < 0.6.4
    context_length: int = 8192
    architecture: str = "llama"
    embedding_length: int = 4  # the dimension of its embeddings
    size: int = 2019393189
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = hashlib.sha256(self.name.encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        return {"parent_model": "", "format": "gguf", "family": self.architecture, "families": [self.architecture],
                "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}


def vector(text: str, dimensions: int) -> list[float]:
    """A deterministic embedding of ``text`` (float32-representable values)."""
    seed = hashlib.sha256(text.encode()).digest()
    return [(seed[i % len(seed)] - 128) / 256 for i in range(dimensions)]


@dataclass
class FakeOllama(FakeBackend):
    """``catalog`` overrides ``models`` (names only, each a plain completion model).
    ``loaded`` names the models in memory (``/api/ps``); ``show_status`` /
    ``ps_status`` / ``tags_status`` make those endpoints fail; ``tags_body`` replaces
    the ``/api/tags`` body; ``show_fails`` lists models whose ``/api/show`` answers 500."""

    catalog: list[OllamaModel] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    version: str = "0.12.6"
    tags_status: int = 200
    tags_body: bytes | None = None
    show_status: int = 200
    show_fails: list[str] = field(default_factory=list)
    ps_status: int = 200
    show_calls: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.catalog:
            self.catalog = [OllamaModel(name) for name in self.models]
        self.models = [m.name for m in self.catalog]  # /v1/models lists the same models

    def model(self, name: str) -> OllamaModel | None:
        return next((m for m in self.catalog if m.name == name), None)

    @property
    def native(self) -> list[Received]:
        """What the fake received on ``/api/*``."""
        return [r for r in self.received if r.path.startswith("/api/")]

    def routes(self) -> list[web.RouteDef]:
        return [
            *super().routes(),
            web.get("/api/tags", self._tags),
            web.post("/api/show", self._show),
            web.get("/api/ps", self._ps),
            web.get("/api/version", self._version),
            web.post("/api/embed", self._embed),
            web.post("/api/generate", self._generate_native),
        ]

    def model_entry(self, model: str) -> dict[str, Any]:
        return {**super().model_entry(model), "owned_by": "library"}

    async def _record(self, request: web.Request) -> bytes:
        body = await request.read()
        self.received.append(Received(request.method, request.path, CIMultiDict(request.headers), body))
        return body

    @staticmethod
    def _error(message: str, status: int) -> web.Response:
        return web.json_response({"error": message}, status=status)

    async def _tags(self, request: web.Request) -> web.Response:
        await self._record(request)
        if self.tags_body is not None:
            return web.Response(body=self.tags_body, status=self.tags_status, content_type="application/json")
        if self.tags_status != 200:
            return self._error("model list unavailable", self.tags_status)
        models = [{"name": m.name, "model": m.name, "modified_at": "2025-05-04T17:37:44.706015396-07:00",
                   "size": m.size, "digest": m.digest, "details": m.details()} for m in self.catalog]
        return web.json_response({"models": models})

    async def _show(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        name = json.loads(body).get("model", "")
        self.show_calls[name] = self.show_calls.get(name, 0) + 1
        if self.show_status != 200 or name in self.show_fails:
            return self._error("show failed", self.show_status if self.show_status != 200 else 500)
        model = self.model(name)
        if model is None:
            return self._error(f"model '{name}' not found", 404)
        arch = model.architecture
        answer: dict[str, Any] = {
            "modelfile": f"# Modelfile generated by \"ollama show\"\nFROM {model.name}\n",
            "parameters": "num_keep                       24",
            "template": "{{ .Prompt }}",
            "details": model.details(),
            "model_info": {
                "general.architecture": arch,
                "general.file_type": 2,
                "general.parameter_count": 3212749888,
                f"{arch}.attention.head_count": 24,
                f"{arch}.context_length": model.context_length,
                f"{arch}.embedding_length": model.embedding_length,
                "tokenizer.ggml.model": "gpt2",
            },
            "modified_at": "2025-05-04T17:37:44.706015396-07:00",
        }
        if model.capabilities is not None:
            answer["capabilities"] = model.capabilities
        return web.json_response(answer)

    async def _ps(self, request: web.Request) -> web.Response:
        await self._record(request)
        if self.ps_status != 200:
            return self._error("ps failed", self.ps_status)
        running = []
        for name in self.loaded:
            model = self.model(name)
            if model is not None:
                running.append({"name": model.name, "model": model.name, "size": model.size + 1024,
                                "digest": model.digest, "details": model.details(), "expires_at": _EXPIRES_AT,
                                "size_vram": model.size, "context_length": 4096})
        return web.json_response({"models": running})

    async def _version(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"version": self.version})

    async def _embed(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        payload = json.loads(body)
        model = self.model(payload.get("model", ""))
        if model is None:
            return self._error(f"model '{payload.get('model')}' not found", 404)
        if "embedding" not in (model.capabilities or []):
            return self._error(f"\"{model.name}\" does not support embeddings", 400)
        raw = payload.get("input")
        if isinstance(raw, str):
            texts = [raw] if raw else []
        elif isinstance(raw, list) and all(isinstance(t, str) for t in raw):
            texts = raw
        else:
            return self._error("invalid input type", 400)
        dimensions = payload.get("dimensions") or model.embedding_length
        if model.name not in self.loaded:
            self.loaded.append(model.name)
        return web.json_response({
            "model": payload["model"],
            "embeddings": [vector(text, dimensions) for text in texts],
            "total_duration": 14143917,
            "load_duration": 1019500,
            "prompt_eval_count": sum(len(text.split()) for text in texts),
        })

    async def _generate_native(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        payload = json.loads(body)
        model = self.model(payload.get("model", ""))
        if model is None:
            return self._error(f"model '{payload.get('model')}' not found", 404)
        if payload.get("prompt"):
            return self._error("the fake only loads and unloads models", 400)
        answer = {"model": model.name, "created_at": _CREATED_AT, "response": "", "done": True}
        if payload.get("keep_alive") == 0:
            if model.name in self.loaded:
                self.loaded.remove(model.name)
            return web.json_response({**answer, "done_reason": "unload"})
        if model.name not in self.loaded:
            self.loaded.append(model.name)
        return web.json_response({**answer, "done_reason": "load"})
