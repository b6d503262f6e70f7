"""The plugin's own settings, the config table ``[plugins.ollama]``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec


class OllamaSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """``keep_alive``: sent with ``load_model`` (Ollama's duration: ``"30m"``, seconds, or
    ``-1`` to keep the model loaded); unset lets Ollama use its default (5 minutes).
    ``lifecycle_timeout_seconds``: how long a load or unload may take."""

    keep_alive: str | int | None = None
    lifecycle_timeout_seconds: float = 300.0

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> OllamaSettings:
        try:
            settings = msgspec.convert(dict(raw), cls)
        except msgspec.ValidationError as exc:
            raise ValueError(f"[plugins.ollama]: {exc} (allowed keys: keep_alive, "
                             "lifecycle_timeout_seconds)") from None
        if settings.lifecycle_timeout_seconds <= 0:
            raise ValueError("[plugins.ollama] lifecycle_timeout_seconds must be > 0, "
                             f"got {settings.lifecycle_timeout_seconds}")
        return settings
