"""Nexus backend plugin for LM Studio (``type = "lmstudio"``).

Follows LM Studio's "REST API v0" document (https://lmstudio.ai/docs/developer/rest/endpoints,
``1_developer/2_rest/endpoints.mdx`` in github.com/lmstudio-ai/docs; LM Studio 0.3.6 or
newer). ``GET /api/v0/models`` lists every downloaded model with its ``type``
(``llm``/``vlm``/``embeddings``), ``state`` (``loaded``/``not-loaded``) and
``max_context_length``. Loaded models also carry ``loaded_context_length``, the context
the model was loaded with (not in the document's example; used when present). Requests
go through LM Studio's OpenAI-compatible ``/v1/*`` endpoints unchanged.

Servers without ``/api/v0`` (older than 0.3.6) are probed with ``GET /v1/models`` and
name heuristics instead. LM Studio answers an endpoint it does not know with HTTP 200
and ``{"error": "Unexpected endpoint or method. (GET /api/v0/models)"}``
(lmstudio-ai/lmstudio-bug-tracker#618); a 404 is treated the same way.
"""

from __future__ import annotations

import msgspec

from nexus import BackendAdapter, GenericAdapter, ModelInfo, ProbeFailed, hookimpl

__version__ = "0.1.0"

_LANGUAGE_TYPES = frozenset({"llm", "vlm"})
_EMBEDDING_TYPES = frozenset({"embeddings", "embedding"})  # v0 says "embeddings"; v1 says "embedding"


class _V0Model(msgspec.Struct):
    id: str
    type: str | None = None
    state: str | None = None
    max_context_length: int | None = None
    loaded_context_length: int | None = None


class _V0List(msgspec.Struct):
    data: list[_V0Model]


class _Unexpected(msgspec.Struct):
    error: str


_decode_v0 = msgspec.json.Decoder(_V0List).decode
_decode_unexpected = msgspec.json.Decoder(_Unexpected).decode


def _is_unknown_endpoint(body: bytes) -> bool:
    """LM Studio's 200 answer to an endpoint it does not have."""
    try:
        return _decode_unexpected(body).error.startswith("Unexpected endpoint")
    except msgspec.DecodeError:
        return False


class LMStudioAdapter(GenericAdapter):
    """LM Studio: ``/api/v0/models`` for model types, states and context; ``/v1/*`` for requests."""

    type_name = "lmstudio"
    default_port = 1234

    async def probe(self) -> list[ModelInfo] | None:
        async with self.session.get(self.upstream_url("/api/v0/models"), headers=self.upstream_headers(None),
                                    timeout=self.probe_timeout) as resp:
            status = resp.status
            body = await resp.read()
        if status == 404:
            return await super().probe()  # no REST API v0: OpenAI model list and name heuristics
        if status >= 300:
            raise ProbeFailed(f"HTTP error: {status} from /api/v0/models")
        try:
            listing = _decode_v0(body)
        except msgspec.DecodeError:
            if _is_unknown_endpoint(body):
                return await super().probe()
            return None
        return [self.v0_model_info(entry) for entry in listing.data]

    async def identify(self) -> bool:
        """Only LM Studio answers ``/api/v0/models`` with its list or its "Unexpected endpoint"
        error; the OpenAI fallback of :meth:`probe` would accept any server."""
        async with self.session.get(self.upstream_url("/api/v0/models"), headers=self.upstream_headers(None),
                                    timeout=self.probe_timeout) as resp:
            body = await resp.read() if resp.status == 200 else b""
        try:
            _decode_v0(body)
        except msgspec.DecodeError:
            return _is_unknown_endpoint(body)
        return True

    def v0_model_info(self, entry: _V0Model) -> ModelInfo:
        """Capabilities from LM Studio's own description of a model."""
        loaded = entry.state != "not-loaded"
        context = (entry.loaded_context_length if loaded else None) or entry.max_context_length
        kind = (entry.type or "").lower()
        configured_embedding = entry.id in self.spec.embedding_models
        if kind in _LANGUAGE_TYPES:  # LM Studio gives every LLM tool use (native or default)
            return ModelInfo(id=entry.id, context_length=context, vision=kind == "vlm", tools=True,
                             json_mode=True, embeddings=configured_embedding, loaded=loaded)
        if kind in _EMBEDDING_TYPES:
            return ModelInfo(id=entry.id, context_length=context, embeddings=True, loaded=loaded)
        guessed = self.describe_model(entry.id)  # a type this plugin does not know: name heuristics
        return msgspec.structs.replace(guessed, context_length=context or guessed.context_length, loaded=loaded)


@hookimpl
def register_backend_types() -> list[type[BackendAdapter]]:
    return [LMStudioAdapter]
