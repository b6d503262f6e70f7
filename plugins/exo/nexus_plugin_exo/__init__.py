"""Nexus backend plugin for exo (``type = "exo"``), the distributed inference cluster.

Follows exo's own API as implemented in github.com/exo-explore/exo ``src/exo/api/main.py``
and described in its ``docs/api.md`` (exo 1.0, commit b5375f8): the API listens on port
52415; ``GET /v1/models`` (alias ``/models``) lists exo's whole model *catalogue* (model
cards with ``context_length``, ``tasks`` and ``capabilities``), not what is running;
``POST /v1/chat/completions`` answers 404 "No instance found for model …" unless the
model has a running instance; ``GET /ollama/api/ps`` (exo 1.0.68 and newer) lists the
models that have one. exo has no health endpoint and no embeddings endpoint.

So a probe reads both lists, and the backend serves the running models, with what the
catalogue says about them. Requests go to exo's ``/v1/*`` unchanged.
"""

from __future__ import annotations

import msgspec

from nexus import BackendAdapter, GenericAdapter, ModelInfo, ProbeFailed, hookimpl

__version__ = "0.1.0"


class _Card(msgspec.Struct):
    """One ``/v1/models`` entry (exo's ``ModelListModel``)."""

    id: str
    context_length: int = 0
    tasks: list[str] = []
    capabilities: list[str] = []


class _Catalogue(msgspec.Struct):
    data: list[_Card]


class _Running(msgspec.Struct):
    name: str  # the model id


class _Ps(msgspec.Struct):
    models: list[_Running]


_decode_catalogue = msgspec.json.Decoder(_Catalogue).decode
_decode_ps = msgspec.json.Decoder(_Ps).decode


class ExoAdapter(GenericAdapter):
    """exo: the catalogue from ``/v1/models``, the running models from ``/ollama/api/ps``."""

    type_name = "exo"
    default_port = 52415

    async def _get(self, path: str) -> tuple[int, bytes]:
        async with self.session.get(self.upstream_url(path), headers=self.upstream_headers(None),
                                    timeout=self.probe_timeout) as resp:
            return resp.status, await resp.read()

    async def probe(self) -> list[ModelInfo] | None:
        status, body = await self._get("/v1/models")
        if status >= 300:
            raise ProbeFailed(f"HTTP error: {status} from /v1/models")
        ps_status, ps_body = await self._get("/ollama/api/ps")
        if ps_status == 404:
            return None  # exo before 1.0.68 cannot say what runs: keep the configured `models`
        if ps_status >= 300:
            raise ProbeFailed(f"HTTP error: {ps_status} from /ollama/api/ps")
        try:
            cards = {card.id: card for card in _decode_catalogue(body).data}
            running = dict.fromkeys(model.name for model in _decode_ps(ps_body).models)
        except msgspec.DecodeError:
            return None
        models = [self.exo_model_info(name, cards.get(name)) for name in running]
        return [m for m in models if m is not None]

    def exo_model_info(self, model_id: str, card: _Card | None) -> ModelInfo | None:
        """A running model as a chat model (``None`` for image models, which chat cannot reach)."""
        if card is None:  # e.g. a custom card the catalogue does not show yet: name heuristics
            return msgspec.structs.replace(self.describe_model(model_id), embeddings=False)
        if card.tasks and "TextGeneration" not in card.tasks:
            return None
        return ModelInfo(id=model_id, context_length=card.context_length or None,
                         vision="vision" in card.capabilities, tools=True, json_mode=True)


@hookimpl
def register_backend_types() -> list[type[BackendAdapter]]:
    return [ExoAdapter]
