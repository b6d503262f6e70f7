"""Micro-benchmark of Nexus's own per-request work, without sockets.

Times what Nexus adds on top of an aiohttp pass-through for one chat request:
the analysis peek, routing (aliases, pipeline, ranking) over N healthy backends, the
response validation and the X-Nexus-* headers. Run: ``.venv/bin/python bench/micro.py``.
"""

from __future__ import annotations

import json
import time

from nexus import config as config_mod
from nexus.adapters.generic import GenericAdapter
from nexus.config import BackendConfig
from nexus.proxy import _validate_json, nexus_headers
from nexus.registry import Backend, ModelInfo, Registry, Status
from nexus.routing.analysis import RequestAnalysis, analyse_chat
from nexus.routing.intent import ReconcilerContext
from nexus.routing.router import Pipeline, Router
from nexus.routing.scheduling import Scheduling

BODY = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "Say hello. " * 20}],
                   "max_tokens": 16}).encode()
RESPONSE = json.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "bench-model",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}).encode()


def build_router(backends: int) -> Router:
    registry = Registry()
    for i in range(backends):
        spec = BackendConfig(name=f"b{i}", url=f"http://b{i}.invalid", type="generic", priority=i % 7)
        backend = Backend(id=spec.name, name=spec.name, url=spec.url, adapter=GenericAdapter(spec, None),  # type: ignore[arg-type]
                          zone="restricted", tier=1, priority=spec.priority)
        backend.status = Status.HEALTHY
        registry.add(backend)
        registry.set_models(backend, [ModelInfo(id="bench-model", context_length=8192)])
    config = config_mod.build({})
    context = ReconcilerContext(config=config, registry=registry)
    return Router(registry, Pipeline([RequestAnalysis(context), Scheduling(context)]), config.routing)


def per_request_us(router: Router, rounds: int) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        model, requirements = analyse_chat(BODY)
        plan = router.plan(model, requirements, request_id="r")
        attempt = next(iter(plan))
        _validate_json(RESPONSE)
        nexus_headers(attempt, 0)
    return (time.perf_counter() - started) / rounds * 1e6


def main() -> None:
    print("| backends | Nexus work per request (µs) |")
    print("|---:|---:|")
    for n in (1, 5, 10, 25, 50):
        router = build_router(n)
        per_request_us(router, 2000)  # warm-up
        best = min(per_request_us(router, 20000 if n < 25 else 5000) for _ in range(3))
        print(f"| {n} | {best:.1f} |")


if __name__ == "__main__":
    main()
