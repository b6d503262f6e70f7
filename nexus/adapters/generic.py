"""The built-in ``generic`` adapter: any server speaking the OpenAI API (``/v1/models``)."""

from __future__ import annotations

from typing import Any

import msgspec

from nexus.adapters.base import BackendAdapter, ProbeFailed
from nexus.adapters.heuristics import model_from_name
from nexus.registry import ModelInfo

class _ModelEntry(msgspec.Struct):
    id: str
    max_model_len: int | None = None  # vLLM
    context_length: int | None = None  # LM Studio / others
    meta: dict[str, Any] | None = None  # llama.cpp: {"n_ctx_train": ...}


class _ModelList(msgspec.Struct):
    data: list[_ModelEntry]


_decode_models = msgspec.json.Decoder(_ModelList).decode


class GenericAdapter(BackendAdapter):
    """OpenAI-compatible server: probe and list with ``GET /v1/models``."""

    type_name = "generic"

    async def probe(self) -> list[ModelInfo] | None:
        headers = self.upstream_headers(None)
        async with self.session.get(
            self.upstream_url("/v1/models"), headers=headers, timeout=self.probe_timeout
        ) as resp:
            if resp.status >= 300:
                raise ProbeFailed(f"HTTP error: {resp.status}")
            body = await resp.read()
        try:
            listing = _decode_models(body)
        except msgspec.DecodeError:
            return None
        return [self.model_info(entry) for entry in listing.data]

    def model_info(self, entry: _ModelEntry) -> ModelInfo:
        context = entry.max_model_len or entry.context_length
        if context is None and entry.meta:
            n_ctx = entry.meta.get("n_ctx_train")
            context = n_ctx if isinstance(n_ctx, int) else None
        return model_from_name(entry.id, context_length=context, embedding=entry.id in self.spec.embedding_models)
