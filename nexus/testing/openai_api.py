"""A fake of the OpenAI API (``https://api.openai.com``) for the ``openai`` plugin's tests.

It follows the OpenAI API reference:

- Authentication (https://platform.openai.com/docs/api-reference/authentication): every
  request needs ``Authorization: Bearer <key>``.
- Error codes (https://platform.openai.com/docs/guides/error-codes): a missing or wrong
  key gets 401 with the error object of the API reference,
  ``{"error": {"message", "type": "invalid_request_error", "param": null, "code"}}``.
  ``code`` is ``"invalid_api_key"`` for a wrong key, whose message quotes the key's
  first 8 and last 4 characters ("Incorrect API key provided: sk-proj-****…MxYA. …"),
  and ``null`` when no key was sent ("You didn't provide an API key. …"), as OpenAI does.
- Models, list (https://platform.openai.com/docs/api-reference/models/list):
  ``{"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}``,
  with no context length or capabilities. The default list mixes chat, embedding,
  image and audio models like the real one.
- Chat completions, completions and embeddings: as :class:`FakeBackend`
  (https://platform.openai.com/docs/api-reference/chat, .../embeddings).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from nexus.testing.fakes import FakeBackend, Received

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPENAI_MODELS = ["gpt-4o-mini", "gpt-4.1", "o3-mini", "gpt-5", "text-embedding-3-small", "dall-e-3", "whisper-1",
                 "gpt-4o-realtime-preview"]


def mask_key(key: str) -> str:
    """How OpenAI quotes a rejected key: its first 8 and last 4 characters."""
    return key[:8] + "*" * max(len(key) - 12, 0) + key[-4:] if len(key) > 12 else "*" * len(key)


@dataclass
class FakeOpenAI(FakeBackend):
    api_key: str = "sk-test-0123456789abcdef"
    models: list[str] = field(default_factory=lambda: list(OPENAI_MODELS))
    name: str = "openai"
    rejected: list[Received] = field(default_factory=list)  # requests answered 401

    def routes(self) -> list[web.RouteDef]:
        return [web.route(r.method, r.path, self._authenticated(r.handler), **r.kwargs)
                for r in super().routes() if isinstance(r, web.RouteDef)]

    def model_entry(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": 1686935002, "owned_by": "system"}

    def _authenticated(self, handler: Handler) -> Handler:
        async def check(request: web.Request) -> web.StreamResponse:
            sent = request.headers.get("Authorization", "")
            if sent == f"Bearer {self.api_key}":
                return await handler(request)
            self.rejected.append(Received(request.method, request.path, CIMultiDict(request.headers),
                                          await request.read()))
            return web.json_response(self.auth_error(sent.removeprefix("Bearer ").strip()), status=401)

        return check

    @staticmethod
    def auth_error(given: str) -> dict[str, Any]:
        if not given:
            message = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
                       "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with "
                       "blank username) if you're accessing the API from your browser and are prompted for a "
                       "username and password. You can obtain an API key from "
                       "https://platform.openai.com/account/api-keys.")
            return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
        message = (f"Incorrect API key provided: {mask_key(given)}. You can find your API key at "
                   "https://platform.openai.com/account/api-keys.")
        return {"error": {"message": message, "type": "invalid_request_error", "param": None,
                          "code": "invalid_api_key"}}
