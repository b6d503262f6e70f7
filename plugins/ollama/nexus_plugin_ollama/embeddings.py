"""OpenAI ``POST /v1/embeddings`` to Ollama's native ``POST /api/embed`` and back.

Request (OpenAI -> Ollama ``EmbedRequest``): ``model`` and ``input`` (a string or a
list of strings; one ``/api/embed`` call embeds the whole batch), ``dimensions``; the
Ollama extensions ``truncate``, ``keep_alive`` and ``options`` pass through when the
client sends them. ``encoding_format`` and ``user`` are OpenAI-only and are dropped.
Token-array input is refused with a 400, as Ollama's own OpenAI layer does not take it.

Response (``{"model", "embeddings": [[...]], "prompt_eval_count"}``) -> OpenAI
``{"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...]}],
"model", "usage": {"prompt_tokens", "total_tokens"}}``. Float vectors are copied
byte for byte. With ``encoding_format: "base64"`` (what the openai SDK sends by default)
each vector becomes base64 of little-endian float32, as OpenAI and Ollama's own
``/v1/embeddings`` encode it.
"""

from __future__ import annotations

import base64
import struct
from contextvars import ContextVar
from typing import Any

import msgspec

from nexus.errors import BadGateway, InvalidRequest

ENDPOINT = "/v1/embeddings"
NATIVE_PATH = "/api/embed"
_FORMATS = ("float", "base64")

# Set by ``prepare_request`` and read by ``translate_response`` of the same attempt: the
# proxy calls both in the request's own task, so concurrent requests never see each
# other's value. (The adapter hooks get no per-request state; see the README.)
_wants_base64: ContextVar[bool] = ContextVar("nexus_ollama_embeddings_base64", default=False)


class _OpenAIRequest(msgspec.Struct, kw_only=True):
    model: str
    input: Any
    dimensions: int | None = None
    encoding_format: str | None = None
    user: str | None = None  # accepted and dropped: Ollama has no such field
    truncate: bool | None = None  # Ollama extension
    keep_alive: str | int | float | None = None  # Ollama extension
    options: dict[str, Any] | None = None  # Ollama extension


class _EmbedRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    model: str
    input: str | list[str]
    truncate: bool | None = None
    dimensions: int | None = None
    keep_alive: str | int | float | None = None
    options: dict[str, Any] | None = None


class _EmbedResponse(msgspec.Struct, kw_only=True):
    model: str = ""
    embeddings: list[msgspec.Raw]
    prompt_eval_count: int = 0


_decode_request = msgspec.json.Decoder(_OpenAIRequest).decode
_decode_response = msgspec.json.Decoder(_EmbedResponse).decode
_decode_vector = msgspec.json.Decoder(list[float]).decode
_encode = msgspec.json.Encoder().encode


def prepare_request(body: bytes) -> bytes:
    """The ``/api/embed`` body for an OpenAI embeddings request (400 if Ollama cannot serve it)."""
    _wants_base64.set(False)
    try:
        request = _decode_request(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidRequest(f"Invalid embeddings request: {exc}.") from None
    fmt = request.encoding_format
    if fmt is not None and fmt.lower() not in _FORMATS:
        raise InvalidRequest(f"Invalid value for 'encoding_format' = {fmt}. Supported values: ['float', 'base64'].",
                             param="encoding_format")
    if request.dimensions is not None and request.dimensions < 1:
        raise InvalidRequest("'dimensions' must be a positive integer.", param="dimensions")
    _wants_base64.set(fmt is not None and fmt.lower() == "base64")
    return _encode(_EmbedRequest(model=request.model, input=_text_input(request.input), truncate=request.truncate,
                                 dimensions=request.dimensions, keep_alive=request.keep_alive,
                                 options=request.options))


def _text_input(value: Any) -> str | list[str]:
    if value == "":
        return [""]  # one (empty) embedding, as Ollama's own /v1/embeddings does
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return value
    if isinstance(value, list) and not value:
        raise InvalidRequest("'input' must not be an empty list.", param="input")
    raise InvalidRequest("Ollama embeds text only: 'input' must be a string or a list of strings "
                         "(token arrays are not supported).", param="input")


def translate_response(body: bytes) -> bytes:
    """An OpenAI embeddings list for an ``/api/embed`` answer."""
    try:
        native = _decode_response(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadGateway(f"Ollama returned an unexpected /api/embed response: {exc}") from None
    as_base64 = _wants_base64.get()
    data = [{"object": "embedding", "index": i, "embedding": _base64(vector) if as_base64 else vector}
            for i, vector in enumerate(native.embeddings)]
    tokens = native.prompt_eval_count
    return _encode({"object": "list", "data": data, "model": native.model,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _base64(vector: msgspec.Raw) -> str:
    floats = _decode_vector(vector)
    return base64.b64encode(struct.pack(f"<{len(floats)}f", *floats)).decode("ascii")
