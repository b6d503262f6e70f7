"""Request analysis: peek at what routing needs, without decoding the whole body into objects.

The peek structs name only the fields routing reads; msgspec skips everything else, so
unknown fields cost nothing and the original bytes are what gets forwarded.
"""

from __future__ import annotations

import re

import msgspec

from nexus.errors import InvalidRequest
from nexus.registry import ModelInfo
from nexus.routing.intent import ReconcilerContext, Requirements, RoutingIntent


class PartPeek(msgspec.Struct):
    type: str = ""
    text: str | None = None


class MessagePeek(msgspec.Struct):
    content: str | list[PartPeek] | None = None


class _ResponseFormat(msgspec.Struct):
    type: str = ""


class ChatPeek(msgspec.Struct):
    model: str
    messages: list[MessagePeek]
    stream: bool | None = None
    tools: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    functions: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    response_format: _ResponseFormat | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class CompletionPeek(msgspec.Struct):
    model: str
    prompt: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    stream: bool | None = None
    max_tokens: int | None = None


class EmbeddingPeek(msgspec.Struct):
    model: str
    input: msgspec.Raw


_chat = msgspec.json.Decoder(ChatPeek)
_completion = msgspec.json.Decoder(CompletionPeek)
_embedding = msgspec.json.Decoder(EmbeddingPeek)
_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


def _decode(decoder: msgspec.json.Decoder, body: bytes):  # type: ignore[no-untyped-def]
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH.search(text)
        param = match.group("path") if match else None
        if text.startswith("Object missing required field"):
            field = text.split("`")[1]
            raise InvalidRequest(f"Missing required parameter: '{field}'.", param=field) from None
        detail = text[: match.start()] if match else text
        raise InvalidRequest(f"Invalid type for '{param}': {detail}.", param=param) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}.") from None


def analyse_chat(body: bytes) -> tuple[str, Requirements]:
    peek: ChatPeek = _decode(_chat, body)
    chars = 0
    vision = False
    for message in peek.messages:
        content = message.content
        if type(content) is str:
            chars += len(content)
        elif content:
            for part in content:
                if part.text:
                    chars += len(part.text)
                elif part.type == "image_url":
                    vision = True
    fmt = peek.response_format
    return peek.model, Requirements(
        vision=vision,
        tools=peek.tools is not msgspec.UNSET or peek.functions is not msgspec.UNSET,
        json_mode=fmt is not None and fmt.type == "json_object",
        estimated_tokens=chars // 4,
        stream=bool(peek.stream),
        max_tokens=peek.max_completion_tokens if peek.max_completion_tokens is not None else peek.max_tokens,
    )


def analyse_completion(body: bytes) -> tuple[str, Requirements]:
    peek: CompletionPeek = _decode(_completion, body)
    size = 0 if peek.prompt is msgspec.UNSET else len(peek.prompt)
    return peek.model, Requirements(estimated_tokens=size // 4, stream=bool(peek.stream), max_tokens=peek.max_tokens)


def analyse_embedding(body: bytes) -> tuple[str, Requirements]:
    peek: EmbeddingPeek = _decode(_embedding, body)
    return peek.model, Requirements(embeddings=True, estimated_tokens=len(peek.input) // 4, max_tokens=0)


def missing_capabilities(req: Requirements, model: ModelInfo) -> list[str]:
    """The capabilities ``req`` needs that ``model`` lacks (empty when it can serve)."""
    if model.context_length is not None and req.estimated_tokens > model.context_length:
        missing = ["context_length"]
    elif req.vision or req.tools or req.json_mode or req.embeddings:
        missing = []
    else:
        return []  # the common case: plain text within the context
    if req.vision and not model.vision:
        missing.append("vision")
    if req.tools and not model.tools:
        missing.append("tools")
    if req.json_mode and not model.json_mode:
        missing.append("json_mode")
    if req.embeddings and not model.embeddings:
        missing.append("embeddings")
    return missing


class RequestAnalysis:
    """Order 100: excludes backends whose model lacks what the request needs.

    These exclusions are of kind ``capability``: if no backend of the model (healthy or
    not) can serve the request, the client gets a 400 rather than a 503.
    """

    name = "request_analysis"
    order = 100

    def __init__(self, context: ReconcilerContext) -> None:
        self.context = context

    def reconcile(self, intent: RoutingIntent) -> None:
        req = intent.requirements
        if not (req.vision or req.tools or req.json_mode or req.embeddings):  # the common case: context only
            tokens = req.estimated_tokens
            for candidate in intent.candidates:
                context = candidate.model.context_length
                if context is not None and tokens > context:
                    intent.exclude(candidate.id, "Missing capabilities: ['context_length']",
                                   "Use a model that supports context_length", kind="capability")
            return
        for candidate in intent.candidates:
            missing = missing_capabilities(req, candidate.model)
            if missing:
                intent.exclude(
                    candidate.id,
                    f"Missing capabilities: {missing}",
                    "Use a model that supports " + ", ".join(missing),
                    kind="capability",
                )
