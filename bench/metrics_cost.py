"""What metrics cost per request: ``Metrics.record`` and the routing pipeline's hooks.

Three measurements, in-process, with the garbage collector off:

1. ``Metrics.record`` on realistic finished records (a JSON answer with usage, a stream
   with its time to first token, a refused unknown model), ``timeit`` loop, µs per call;
2. the pipeline hook: ``Router.plan()`` on the 10-backend fleet of ``bench/routing.py``
   with ``Pipeline.observe_run`` unset and set to ``Metrics.routed``, interleaved rounds,
   best round each, and the difference;
3. one scrape (``Metrics.render``) after those requests, for scale.

Run: ``.venv/bin/python bench/metrics_cost.py`` (``--calls N`` per measurement).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import timeit
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from routing import HEADERS, MODELS, REQUIREMENTS, build_router  # noqa: E402  (bench/routing.py)

from nexus import config as config_mod  # noqa: E402
from nexus.metrics import Metrics  # noqa: E402
from nexus.queue import RequestQueue  # noqa: E402
from nexus.record import RequestRecord  # noqa: E402
from nexus.routing.router import Pipeline, Router  # noqa: E402


class _Gateway:
    """The parts of a gateway that :class:`Metrics` reads."""

    def __init__(self, router: Router, pipeline: Pipeline) -> None:
        self.config = config_mod.build({}, source="bench")
        self.registry = router.registry
        self.pipeline = pipeline
        self.queue = RequestQueue(self.config.queue)


def records() -> dict[str, RequestRecord]:
    common: dict[str, Any] = {"backend": "gpu-000", "backend_type": "local", "zone": "restricted",
                              "route_reason": "capability-match", "status": 200, "outcome": "success"}
    return {
        "json answer with usage": RequestRecord(
            "/v1/chat/completions", "model-3", False, served_model="model-3", prompt_tokens=412,
            completion_tokens=187, duration_ms=840.5, **common),
        "stream with TTFT": RequestRecord(
            "/v1/chat/completions", "model-3", True, served_model="model-3", ttft_ms=95.2, duration_ms=2210.0,
            **common),
        "refused unknown model": RequestRecord(
            "/v1/chat/completions", "no-such-model", False, status=404, outcome="error", duration_ms=0.3),
    }


def per_call_us(func: Any, calls: int) -> float:
    gc.disable()
    try:
        return min(timeit.repeat(func, number=calls, repeat=5)) / calls * 1e6
    finally:
        gc.enable()


def plan_p50_us(router: Router, calls: int) -> float:
    plan, clock, count = router.plan, time.perf_counter_ns, len(MODELS)
    samples = [0] * calls
    gc.disable()
    try:
        for i in range(calls):
            started = clock()
            plan(MODELS[i % count], REQUIREMENTS, request_id="bench", headers=HEADERS)
            samples[i] = clock() - started
    finally:
        gc.enable()
    samples.sort()
    return samples[calls // 2] / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    router, pipeline, _ = build_router(10)
    metrics = Metrics(_Gateway(router, pipeline))  # type: ignore[arg-type]

    print("| Metrics.record on | µs per call |\n|---|---|")
    recs = records()
    for name, record in recs.items():
        print(f"| {name} | {per_call_us(lambda r=record: metrics.record(r), args.calls):.2f} |")
    mix = list(recs.values())
    mixed = per_call_us(lambda: [metrics.record(r) for r in mix], args.calls // 3) / len(mix)
    print(f"| mean of the three | {mixed:.2f} |")

    stages = len(pipeline.reconcilers)
    intent = router.evaluate("model-3", "model-3", "model-3", REQUIREMENTS, "bench", HEADERS)
    timings = [0.000004] * stages

    hook_us = per_call_us(lambda: metrics.routed(intent, timings, 0.00003), args.calls)
    off, on = [], []
    for _ in range(args.rounds):
        pipeline.observe_run = None
        off.append(plan_p50_us(router, args.calls))
        pipeline.observe_run = metrics.routed
        on.append(plan_p50_us(router, args.calls))
    print(f"\n| routing, 10 backends, {stages} stages | µs |\n|---|---|")
    print(f"| the hook alone (Metrics.routed, {len(intent.exclusions)} exclusions) | {hook_us:.2f} |")
    print(f"| Router.plan p50, hook unset (best of {args.rounds}) | {min(off):.2f} |")
    print(f"| Router.plan p50, hook set (best of {args.rounds}) | {min(on):.2f} |")
    print(f"| difference | {min(on) - min(off):+.2f} |")

    started = time.perf_counter()
    body = metrics.render()
    lines = body.count(b"\n")
    print(f"\nOne scrape: {(time.perf_counter() - started) * 1000:.2f} ms, {len(body)} bytes, {lines} lines")


if __name__ == "__main__":
    main()
