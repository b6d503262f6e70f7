"""A fake vLLM server, following vLLM's OpenAI-compatible server documentation
(https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html) and its
``vllm/entrypoints/openai/api_server.py``: ``GET /health`` answers 200 with an empty
body while the engine is up (500 when it is dead); ``GET /v1/models`` entries carry
``root``, ``parent`` and ``max_model_len``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from nexus.testing.fakes import FakeBackend


@dataclass
class FakeVLLM(FakeBackend):
    max_model_len: int = 8192
    health_status: int = 200

    def routes(self) -> list[web.RouteDef]:
        return [*super().routes(), web.get("/health", self._health)]

    def model_entry(self, model: str) -> dict[str, Any]:
        return {**super().model_entry(model), "owned_by": "vllm", "root": model, "parent": None,
                "max_model_len": self.max_model_len, "permission": []}

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health_status)
