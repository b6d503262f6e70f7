"""Nexus backend plugin for the OpenAI API (``type = "openai"``).

Follows the OpenAI API reference (https://platform.openai.com/docs/api-reference):
every request carries ``Authorization: Bearer <key>``; ``GET /v1/models`` lists the
models the key may use (``id``, ``object``, ``created``, ``owned_by`` — no
capabilities, so those come from :mod:`nexus_plugin_openai.models`); a bad key gets
401 with code ``invalid_api_key``. Token counts are exact and offline
(:mod:`nexus_plugin_openai.tokens`).
"""

from __future__ import annotations

import re
from typing import ClassVar

import msgspec

from nexus import BackendAdapter, GenericAdapter, ModelInfo, ProbeFailed, hookimpl
from nexus.config import BackendConfig
from nexus_plugin_openai.models import model_info, routable
from nexus_plugin_openai.tokens import count_tokens, encoding_name

__version__ = "0.1.0"
__all__ = ["DEFAULT_URL", "OpenAIAdapter", "count_tokens", "encoding_name", "register_backend_types"]

DEFAULT_URL = "https://api.openai.com"


class _Model(msgspec.Struct):
    id: str


class _ModelList(msgspec.Struct):
    data: list[_Model]


class _ErrorBody(msgspec.Struct):
    code: str | None = None


class _Error(msgspec.Struct):
    error: _ErrorBody


_decode_models = msgspec.json.Decoder(_ModelList).decode
_decode_error = msgspec.json.Decoder(_Error).decode
_SAFE_CODE = re.compile(r"[a-z0-9_]{1,64}")


def _error_code(body: bytes) -> str:
    """`` (invalid_api_key)`` from an OpenAI error body, or ``""``. Never the message:
    OpenAI's 401 message quotes the start and end of the key it was given."""
    try:
        code = _decode_error(body).error.code
    except msgspec.DecodeError:
        return ""
    return f" ({code})" if code and _SAFE_CODE.fullmatch(code) else ""


class OpenAIAdapter(GenericAdapter):
    """The OpenAI API: a cloud backend that always authenticates with its own key."""

    type_name = "openai"
    default_port = 443
    cloud = True
    default_url: ClassVar[str] = DEFAULT_URL

    @classmethod
    def check_spec(cls, spec: BackendConfig) -> None:
        """Reject a config this adapter can never use (raised from the constructor)."""
        if not spec.api_key_env:
            raise ValueError(
                f"backend {spec.name!r} of type 'openai' needs api_key_env, the name of the environment "
                f"variable that holds the OpenAI key (e.g. api_key_env = \"OPENAI_API_KEY\")"
            )

    async def probe(self) -> list[ModelInfo] | None:
        """``GET /v1/models`` with the key; 401/403 name the auth problem, never the key."""
        env = self.spec.api_key_env
        if not self.api_key:
            raise ProbeFailed(f"no API key: environment variable {env} is not set")
        async with self.session.get(self.upstream_url("/v1/models"), headers=self.upstream_headers(None),
                                    timeout=self.probe_timeout) as resp:
            body = await resp.read()
            status = resp.status
        if status == 401:
            raise ProbeFailed(f"authentication failed: HTTP 401{_error_code(body)}; OpenAI rejected the key in {env}")
        if status == 403:
            raise ProbeFailed(f"permission denied: HTTP 403{_error_code(body)}; the key in {env} may not list models")
        if status >= 300:
            raise ProbeFailed(f"HTTP error: {status}{_error_code(body)}")
        try:
            listing = _decode_models(body)
        except msgspec.DecodeError:
            return None
        return [self.describe_model(entry.id) for entry in listing.data if routable(entry.id)]

    def describe_model(self, model_id: str) -> ModelInfo:
        return model_info(model_id, embedding=model_id in self.spec.embedding_models)

    def count_tokens(self, model: str, text: str) -> int:
        """Exact token count (tiktoken, offline)."""
        return count_tokens(model, text)


@hookimpl
def register_backend_types() -> list[type[BackendAdapter]]:
    return [OpenAIAdapter]
