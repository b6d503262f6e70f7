"""What spend accounting costs on the request path, per cloud request.

Runs an in-process Nexus in front of a fake OpenAI API (the ``openai`` plugin, a monthly
limit set, ``block_cloud``) and sends sequential chat requests, non-streaming and
streaming (without a usage chunk, so the streamed text is counted with tiktoken). The
budget's three request-path steps are wrapped with timers:

* ``hold``: exact prompt count + the atomic hold in the state store (awaited; for
  SQLite it includes the round trip to the writer thread, for Redis the network);
* ``price_response``: the cost from ``usage`` or from counting the streamed text;
* ``settle``: the observer that releases the hold (the store write itself is queued).

Run: ``.venv/bin/python bench/budget_cost.py [--store memory|sqlite|redis --redis-url URL] [-n 2000]``.
Wall-clock µs per request are printed for each step (mean and p50), and for the whole
request as the client saw it.

With ``--concurrent N`` it instead sends N requests at once against a limit that admits
about half of them, and prints how far spend went past the limit (the target is 0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import aiohttp

import nexus_plugin_openai
from nexus import config as config_mod
from nexus.api import GATEWAY
from nexus.app import create_app
from nexus.budget import Budget
from nexus.plugins import create_host
from nexus.testing.fixtures import serve_app
from nexus.testing.openai_api import FakeOpenAI

KEY = "sk-bench-0123456789abcdefghijklmnop"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello to the benchmark. " * 8}],
        "max_tokens": 64}


def timed(samples: list[float], fn: Callable[..., Any]) -> Callable[..., Any]:
    if asyncio.iscoroutinefunction(fn):
        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                samples.append(time.perf_counter() - started)
        return wrapped_async

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            samples.append(time.perf_counter() - started)
    return wrapped


async def overrun(http: aiohttp.ClientSession, url: str, budget: Budget, concurrent: int) -> None:
    async def one() -> int:
        async with http.post(f"{url}/v1/chat/completions", json=CHAT) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(one() for _ in range(concurrent)))
    await budget.drain()
    await budget.refresh()
    assert budget.limit is not None
    print(f"{concurrent} concurrent: {statuses.count(200)} served, {statuses.count(503)} refused; "
          f"spent ${budget.spent:.6f} of ${budget.limit:.6f}, held ${budget.reserved:.6f}; "
          f"overrun ${max(budget.spent - budget.limit, 0.0):.6f}")


async def main(store: str, redis_url: str | None, n: int, concurrent: int) -> None:
    os.environ["NEXUS_BENCH_KEY"] = KEY
    fake = FakeOpenAI(api_key=KEY, stream_chunks=["Hello", " there", ",", " benchmark", "!"] * 10)
    await fake.start()
    state: dict[str, Any] = {"backend": store}
    tmp = tempfile.TemporaryDirectory()
    if store == "sqlite":
        state["path"] = f"{tmp.name}/state.db"
    if store == "redis":
        state["url"] = redis_url
        state["key_prefix"] = f"bench-{time.time_ns()}"
    config = config_mod.build({
        "backends": [{"name": "cloud", "url": fake.url, "type": "openai", "api_key_env": "NEXUS_BENCH_KEY"}],
        # With --concurrent: a limit of about half the worst cases (each holds 64 output tokens).
        "routing": {"budget": {"monthly_limit_usd": concurrent * 0.00002 if concurrent else 1e9,
                               "hard_limit_action": "block_cloud"}},
        "state": state, "discovery": {"enabled": False},
    })
    app = create_app(config, create_host(load_entry_points=False, extra=[("openai", nexus_plugin_openai)]),
                     health_check=False, discovery=False)
    url, runner = await serve_app(app)
    gateway = app[GATEWAY]
    await gateway.health.check_all()
    budget: Budget = gateway.budget
    samples: dict[str, list[float]] = defaultdict(list)
    budget.hold = timed(samples["hold"], budget.hold)  # type: ignore[method-assign]
    budget.price_response = timed(samples["price_response"], budget.price_response)  # type: ignore[method-assign]
    gateway.observers[gateway.observers.index(budget.settle)] = timed(samples["settle"], budget.settle)
    nexus_plugin_openai.count_tokens("gpt-4o-mini", "warm up")  # load the encoding before timing
    async with aiohttp.ClientSession() as http:
        if concurrent:
            await overrun(http, url, budget, concurrent)
            await runner.cleanup()
            await fake.stop()
            tmp.cleanup()
            return
        for label, body in (("non-stream", CHAT), ("stream", {**CHAT, "stream": True})):
            for key in samples:
                samples[key].clear()
            whole: list[float] = []
            for _ in range(n):
                started = time.perf_counter()
                async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status
                whole.append(time.perf_counter() - started)
            print(f"{store} {label}: {n} requests, whole request p50 {statistics.median(whole) * 1e6:.0f} µs")
            for key, values in samples.items():
                print(f"  {key:15s} mean {statistics.fmean(values) * 1e6:7.1f} µs   p50 "
                      f"{statistics.median(values) * 1e6:7.1f} µs")
    await budget.drain()
    spent, reserved = await gateway.store.totals(budget.month)
    print(f"  spent ${spent:.6f}, still held ${reserved:.6f}")
    await runner.cleanup()
    await fake.stop()
    tmp.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=["memory", "sqlite", "redis"], default="sqlite")
    parser.add_argument("--redis-url")
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--concurrent", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(main(args.store, args.redis_url, args.n, args.concurrent))
