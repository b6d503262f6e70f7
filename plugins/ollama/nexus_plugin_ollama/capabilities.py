"""Model capabilities from ``POST /api/show``, and the cache that keeps them per digest."""

from __future__ import annotations

from dataclasses import dataclass

from nexus import ModelInfo
from nexus.adapters.heuristics import model_from_name

from nexus_plugin_ollama.api import Show

# The ``capabilities`` values of Ollama (types/model/capability.go) that map to ModelInfo.
# "insert" (fill-in-the-middle), "thinking", "image" (generation) and "audio" have no
# ModelInfo field and do not affect routing.
VISION = "vision"
TOOLS = "tools"
EMBEDDING = "embedding"
COMPLETION = "completion"


def context_length(model_info: dict[str, object] | None) -> int | None:
    """``<architecture>.context_length`` from ``model_info``, else the first key ending in
    ``.context_length`` with an integer value."""
    if not model_info:
        return None
    architecture = model_info.get("general.architecture")
    keys = [f"{architecture}.context_length"] if isinstance(architecture, str) else []
    keys += [key for key in model_info if key.endswith(".context_length")]
    for key in keys:
        value = model_info.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def describe(name: str, show: Show, *, embedding_listed: bool) -> ModelInfo:
    """A model's capabilities as Ollama reports them.

    JSON mode is supported by every model that can complete text (CONTRACT §4).
    ``embedding_listed`` (the backend's ``embedding_models``) marks an embedding model
    even when Ollama does not say so (CONTRACT §10). An Ollama too old to report
    ``capabilities`` gets the name heuristics, with the context length it did report.
    """
    context = context_length(show.model_info)
    if not show.capabilities:
        return model_from_name(name, context_length=context, embedding=embedding_listed)
    caps = set(show.capabilities)
    return ModelInfo(
        id=name,
        context_length=context,
        vision=VISION in caps,
        tools=TOOLS in caps,
        json_mode=COMPLETION in caps,
        embeddings=EMBEDDING in caps or embedding_listed,
    )


def guess(name: str, *, embedding_listed: bool) -> ModelInfo:
    """Name heuristics, for a model whose ``/api/show`` failed."""
    return model_from_name(name, embedding=embedding_listed)


@dataclass(slots=True)
class _Entry:
    digest: str
    info: ModelInfo


class ShowCache:
    """``/api/show`` results per model name, valid while the model's digest is unchanged.

    Only real answers are cached: a model whose ``/api/show`` failed is asked again on
    the next cycle. A model without a digest is never cached.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def get(self, name: str, digest: str) -> ModelInfo | None:
        entry = self._entries.get(name)
        return entry.info if entry is not None and digest and entry.digest == digest else None

    def put(self, name: str, digest: str, info: ModelInfo) -> None:
        if digest:
            self._entries[name] = _Entry(digest, info)

    def keep_only(self, names: set[str]) -> None:
        """Forget models the backend no longer lists."""
        for name in [n for n in self._entries if n not in names]:
            del self._entries[name]
