"""Capabilities of OpenAI models, from their ids (upstream §4.4, refreshed).

``GET /v1/models`` on the OpenAI API says nothing but ``id``, ``created`` and
``owned_by``, so the context length and the vision / tools / JSON-mode flags come from
this table, taken from OpenAI's model pages (https://platform.openai.com/docs/models).
The longest matching prefix wins. An unknown model gets the optimistic default: vision,
tools and JSON mode on, context unknown (never used to exclude it) — refusing a request
OpenAI would have served is worse than letting OpenAI answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from nexus import ModelInfo


@dataclass(frozen=True)
class Family:
    prefix: str
    context_length: int | None
    vision: bool = True
    tools: bool = True
    json_mode: bool = True
    embeddings: bool = False


_NONE = {"vision": False, "tools": False, "json_mode": False}

FAMILIES: tuple[Family, ...] = (
    # GPT-5 family
    Family("gpt-5.5", 1_050_000),
    Family("gpt-5.4", 1_050_000),
    Family("gpt-5.4-mini", 400_000),
    Family("gpt-5.4-nano", 400_000),
    Family("gpt-5-chat", 128_000),
    Family("gpt-5.1-chat", 128_000),
    Family("gpt-5.2-chat", 128_000),
    Family("gpt-5", 400_000),  # gpt-5, -mini, -nano, -pro, -codex, gpt-5.1, gpt-5.2 …
    # GPT-4.x
    Family("gpt-4.1", 1_047_576),
    Family("gpt-4.5", 128_000),
    Family("gpt-4o", 128_000),
    Family("chatgpt-4o", 128_000, tools=False),
    Family("gpt-4-turbo", 128_000),
    Family("gpt-4-turbo-preview", 128_000, vision=False),
    Family("gpt-4-1106", 128_000, vision=False),
    Family("gpt-4-0125", 128_000, vision=False),
    Family("gpt-4-vision", 128_000, tools=False, json_mode=False),
    Family("gpt-4-32k", 32_768, vision=False, json_mode=False),
    Family("gpt-4", 8_192, vision=False, json_mode=False),
    Family("gpt-3.5-turbo", 16_385, vision=False),
    Family("gpt-3.5-turbo-instruct", 4_096, **_NONE),
    # o-series (reasoning)
    Family("o1", 200_000),
    Family("o1-mini", 128_000, **_NONE),
    Family("o1-preview", 128_000, **_NONE),
    Family("o3", 200_000),
    Family("o3-mini", 200_000, vision=False),
    Family("o4-mini", 200_000),
    Family("codex-mini", 200_000),
    # legacy completions models
    Family("davinci-002", 16_384, **_NONE),
    Family("babbage-002", 16_384, **_NONE),
    # embeddings
    Family("text-embedding-3", 8_191, embeddings=True, **_NONE),
    Family("text-embedding-ada-002", 8_191, embeddings=True, **_NONE),
)
_BY_LENGTH = sorted(FAMILIES, key=lambda f: len(f.prefix), reverse=True)

# Models that /v1/models lists but that serve none of the endpoints Nexus proxies
# (chat, completions, embeddings): images, audio, speech, moderation, video, realtime.
_NOT_ROUTABLE_PREFIXES = ("dall-e", "gpt-image", "whisper", "tts-", "omni-moderation", "text-moderation", "sora")
_NOT_ROUTABLE_PARTS = ("-realtime", "-transcribe", "-tts")


def base_model(model_id: str) -> str:
    """``ft:gpt-4o-mini-2024-07-18:org::abc`` → ``gpt-4o-mini-2024-07-18``; lower case."""
    lowered = model_id.strip().lower()
    return lowered.split(":")[1] if lowered.startswith("ft:") else lowered


def family(model_id: str) -> Family | None:
    base = base_model(model_id)
    return next((f for f in _BY_LENGTH if base.startswith(f.prefix)), None)


def routable(model_id: str) -> bool:
    """False for models that only serve endpoints Nexus does not proxy."""
    base = base_model(model_id)
    return not (base.startswith(_NOT_ROUTABLE_PREFIXES) or any(p in base for p in _NOT_ROUTABLE_PARTS))


def model_info(model_id: str, *, embedding: bool = False) -> ModelInfo:
    """Capabilities of an OpenAI model (``embedding`` forces the embeddings flag)."""
    found = family(model_id)
    if found is None:
        return ModelInfo(id=model_id, context_length=None, vision=True, tools=True, json_mode=True,
                         embeddings=embedding or "embed" in model_id.lower())
    return ModelInfo(id=model_id, context_length=found.context_length, vision=found.vision, tools=found.tools,
                     json_mode=found.json_mode, embeddings=embedding or found.embeddings)
