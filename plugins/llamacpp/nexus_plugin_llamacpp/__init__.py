"""Nexus backend plugin for llama.cpp's HTTP server (``type = "llamacpp"``).

Follows the server's own documentation, ``tools/server/README.md`` in ggml-org/llama.cpp
(https://github.com/ggml-org/llama.cpp/blob/master/tools/server/README.md):

- ``GET /health``: 200 ``{"status": "ok"}`` once the model is loaded; 503
  ``{"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}``
  while it loads, which marks the backend ``loading`` (not routed to, not down);
- ``GET /props``: ``default_generation_settings.n_ctx`` is the context one request can
  really use (the server's ``-c`` divided among its slots), ``modalities.vision``;
- ``GET /v1/models``: the served model (``id`` is its path or its ``--alias``), with
  ``meta.n_ctx_train`` used when ``/props`` says nothing;
- embedding mode (``--embeddings``) appears in neither; ``POST /v1/embeddings`` with an
  empty object tells without computing anything: 501 ``not_supported_error`` when the
  server runs without it, 400 (``"input" or "content" must be provided``) when it does.

Chat, completions and embeddings go to the server's ``/v1/*`` endpoints unchanged.
The plugin also adds ``nexus demo`` (see :mod:`nexus_plugin_llamacpp.demo`).
"""

from __future__ import annotations

from typing import TypeVar

import click
import msgspec

from nexus import BackendAdapter, BackendLoading, GenericAdapter, ModelInfo, ProbeFailed, hookimpl

__version__ = "0.1.0"


class _Error(msgspec.Struct):
    message: str = ""
    type: str = ""


class _ErrorBody(msgspec.Struct):
    error: _Error


class _Health(msgspec.Struct):
    status: str


class _Settings(msgspec.Struct):
    n_ctx: int | None = None


class _Modalities(msgspec.Struct):
    vision: bool = False


class _Props(msgspec.Struct):
    default_generation_settings: _Settings | None = None
    modalities: _Modalities | None = None


class _Meta(msgspec.Struct):
    n_ctx_train: int | None = None


class _Model(msgspec.Struct):
    id: str
    meta: _Meta | None = None  # null while the model loads


class _Models(msgspec.Struct):
    data: list[_Model]


T = TypeVar("T")


def _decode(body: bytes, kind: type[T]) -> T | None:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.DecodeError:
        return None


class LlamaCppAdapter(GenericAdapter):
    """llama.cpp server: ``/health``, ``/props`` and ``/v1/models``; embeddings when the
    server runs with ``--embeddings`` or the config lists the model in ``embedding_models``."""

    type_name = "llamacpp"
    default_port = 8080

    async def _call(self, path: str, data: bytes | None = None) -> tuple[int, bytes]:
        """GET (or POST ``data`` to) ``path``; a 503 "Loading model" raises ``BackendLoading``."""
        async with self.session.request("GET" if data is None else "POST", self.upstream_url(path), data=data,
                                        headers=self.upstream_headers(None), timeout=self.probe_timeout) as resp:
            status, body = resp.status, await resp.read()
        if status == 503 and (error := _decode(body, _ErrorBody)) and error.error.type == "unavailable_error":
            raise BackendLoading(f"{error.error.message or 'Loading model'} ({path} answered 503)")
        return status, body

    async def probe(self) -> list[ModelInfo] | None:
        status, body = await self._call("/health")
        health = _decode(body, _Health) if status == 200 else None
        if health is None or health.status != "ok":
            raise ProbeFailed(f"HTTP error: {status} from /health" if status != 200
                              else 'not a llama.cpp server: /health did not answer {"status": "ok"}')
        props_status, props_body = await self._call("/props")
        props = _decode(props_body, _Props) if props_status == 200 else None
        models_status, models_body = await self._call("/v1/models")
        if models_status >= 300:
            raise ProbeFailed(f"HTTP error: {models_status} from /v1/models")
        listing = _decode(models_body, _Models)
        if listing is None:
            return None
        embeddings = await self._embedding_mode()
        n_ctx = props.default_generation_settings.n_ctx if props and props.default_generation_settings else None
        vision = props.modalities.vision if props and props.modalities else None
        if len(listing.data) != 1:  # /props describes the server's one model, not a router's many
            n_ctx = vision = None
        return [self._model(m, n_ctx, vision, embeddings) for m in listing.data]

    async def _embedding_mode(self) -> bool:
        """``POST /v1/embeddings {}``: 501 without ``--embeddings``; 400 for the missing
        input with it (or for pooling ``none``, which the OpenAI endpoint cannot serve)."""
        status, body = await self._call("/v1/embeddings", b"{}")
        if status < 300:
            return True
        if status != 400:
            return False
        error = _decode(body, _ErrorBody)
        return error is None or "pooling" not in error.error.message.lower()

    def _model(self, entry: _Model, n_ctx: int | None, vision: bool | None, embeddings: bool) -> ModelInfo:
        info = self.describe_model(entry.id)  # name heuristics and the config's embedding_models
        context = n_ctx or (entry.meta.n_ctx_train if entry.meta else None) or info.context_length
        return msgspec.structs.replace(info, context_length=context,
                                       vision=info.vision if vision is None else vision,
                                       embeddings=embeddings or info.embeddings)


@hookimpl
def register_backend_types() -> list[type[BackendAdapter]]:
    return [LlamaCppAdapter]


@hookimpl
def register_commands(cli: click.Group) -> None:
    from nexus_plugin_llamacpp.demo import demo

    cli.add_command(demo)
