"""Model capabilities guessed from model names (upstream §4.4), for backends that do not say."""

from __future__ import annotations

from nexus.registry import ModelInfo

_CONTEXT_BY_NAME = (("128k", 131072), ("32k", 32768), ("16k", 16384), ("8k", 8192), ("4k", 4096))
_VISION_WORDS = ("vision", "llava", "bakllava", "pixtral", "moondream", "minicpm-v", "llama4", "-vl")


def context_from_name(model_id: str) -> int | None:
    lowered = model_id.lower()
    return next((ctx for word, ctx in _CONTEXT_BY_NAME if word in lowered), None)


def model_from_name(model_id: str, *, context_length: int | None = None, embedding: bool = False) -> ModelInfo:
    """Capabilities from name heuristics (upstream §4.4).

    Tools and JSON mode are assumed when the backend does not say: refusing a request
    the backend would have served is worse than letting the backend answer. Vision is
    guessed from the name so image requests prefer a model that can see.
    """
    lowered = model_id.lower()
    return ModelInfo(
        id=model_id,
        context_length=context_length or context_from_name(model_id),
        vision=any(word in lowered for word in _VISION_WORDS),
        tools=True,
        json_mode=True,
        embeddings=embedding or "embed" in lowered,
    )
