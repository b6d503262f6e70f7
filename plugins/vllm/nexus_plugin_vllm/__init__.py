"""Nexus backend plugin for vLLM (``type = "vllm"``).

Follows vLLM's OpenAI-compatible server documentation
(https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html): ``GET /health``
answers 200 once the engine is up, ``GET /v1/models`` lists the served model with its
``max_model_len``, and the ``/v1/*`` endpoints speak the OpenAI API.
"""

from __future__ import annotations

from nexus import BackendAdapter, GenericAdapter, ModelInfo, ProbeFailed, hookimpl

__version__ = "0.1.0"


class VLLMAdapter(GenericAdapter):
    """vLLM: ``/health`` for liveness, ``/v1/models`` for the model and its context length."""

    type_name = "vllm"
    default_port = 8000

    async def probe(self) -> list[ModelInfo] | None:
        async with self.session.get(self.upstream_url("/health"), headers=self.upstream_headers(None),
                                    timeout=self.probe_timeout) as resp:
            if resp.status != 200:
                raise ProbeFailed(f"HTTP error: {resp.status} from /health")
            await resp.read()
        return await super().probe()


@hookimpl
def register_backend_types() -> list[type[BackendAdapter]]:
    return [VLLMAdapter]
