"""The parts of Ollama's native API this plugin reads, as msgspec structs.

Field names follow ``docs/api.md`` and ``docs/openapi.yaml`` of the ollama/ollama
repository (``api/types.go`` has the same names). Every struct names only what the
plugin uses; msgspec skips the rest, so new fields in a newer Ollama cost nothing.
"""

from __future__ import annotations

from typing import Any

import msgspec


class TagModel(msgspec.Struct, kw_only=True):
    """One entry of ``GET /api/tags`` (``ListModelResponse``)."""

    name: str
    model: str = ""
    digest: str = ""


class Tags(msgspec.Struct):
    """``GET /api/tags``: ``{"models": [...]}``."""

    models: list[TagModel]


class Show(msgspec.Struct, kw_only=True):
    """``POST /api/show`` (``ShowResponse``). ``capabilities`` is absent before Ollama 0.6.4."""

    capabilities: list[str] | None = None
    model_info: dict[str, Any] | None = None


class RunningModel(msgspec.Struct, kw_only=True):
    """One entry of ``GET /api/ps`` (``ProcessModelResponse``)."""

    name: str
    model: str = ""
    digest: str = ""
    size: int = 0
    size_vram: int = 0
    context_length: int | None = None  # in docs/openapi.yaml; older servers omit it
    expires_at: str | None = None


class Running(msgspec.Struct):
    """``GET /api/ps``: ``{"models": [...]}``."""

    models: list[RunningModel]


class Version(msgspec.Struct):
    """``GET /api/version``: ``{"version": "0.12.6"}``."""

    version: str


class Error(msgspec.Struct):
    """Ollama's error body (``docs/api/errors.mdx``): ``{"error": "message"}``."""

    error: str


decode_tags = msgspec.json.Decoder(Tags).decode
decode_show = msgspec.json.Decoder(Show).decode
decode_running = msgspec.json.Decoder(Running).decode
decode_version = msgspec.json.Decoder(Version).decode
_decode_error = msgspec.json.Decoder(Error).decode


def error_message(body: bytes) -> str:
    """The ``error`` of an Ollama error body, or the start of the body as text."""
    try:
        return _decode_error(body).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        return body[:300].decode(errors="replace")
