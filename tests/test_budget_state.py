"""The budget's state outlives the process: real ``nexus serve`` processes over a SQLite file
and over a real ``redis-server`` (started by the ``redis_url`` fixture)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from nexus.budget import month_of
from nexus.state.redis import RedisStore
from nexus.testing import free_port
from nexus.testing.openai_api import FakeOpenAI
from tests.plugins.support import nexus_env, run_nexus_async, serve_nexus

KEY_ENV = "NEXUS_TEST_BUDGET_KEY"
KEY = "sk-budget-state-test-0123456789abcdef"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10}


@pytest.fixture
async def openai_api() -> Any:
    fake = FakeOpenAI(api_key=KEY)
    await fake.start()
    yield fake
    await fake.stop()


def config(directory: Path, url: str, state: str, **budget: object) -> Path:
    limits = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in budget.items())
    text = f"""
[routing.budget]
{limits}
[routing.budget.prices."gpt-4o-mini"]
input = 1000.0
output = 2000.0

[state]
{state}

[[backends]]
name = "cloud"
url = "{url}"
type = "openai"
api_key_env = "{KEY_ENV}"
"""
    path = directory / "nexus.toml"
    path.write_text(text, encoding="utf-8")
    return path


async def chat(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(f"{url}/v1/chat/completions", json=CHAT) as resp:
        await resp.read()
        return resp.status


async def stats(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(f"{url}/v1/stats") as resp:
        return await resp.json()


async def test_spend_history_and_quality_survive_a_restart_of_nexus_serve(tmp_path: Path, openai_api: FakeOpenAI) -> None:
    state = tmp_path / "data" / "state.db"
    path = config(tmp_path, openai_api.url, f'path = "{state}"', monthly_limit_usd=10.0)
    env = nexus_env(**{KEY_ENV: KEY})
    async with aiohttp.ClientSession() as http:
        async with serve_nexus("--config", str(path), cwd=tmp_path, env=env) as first:
            for _ in range(3):
                assert await chat(http, first.url) == 200
            before = await stats(http, first.url)
        assert before["budget"]["current_spending_usd"] == pytest.approx(3 * 0.007)
        assert state.exists()
        async with serve_nexus("--config", str(path), cwd=tmp_path, env=env) as second:
            after = await stats(http, second.url)
            async with http.get(f"{second.url}/v1/history") as resp:
                history = await resp.json()
    assert [(h["model"], h["status"], h["backend_id"]) for h in history] == [("gpt-4o-mini", "Success", "cloud")] * 3
    assert history[0]["cost_usd"] == pytest.approx(0.007)
    assert after["budget"]["current_spending_usd"] == pytest.approx(3 * 0.007)
    assert after["budget"]["reserved_usd"] == 0
    cloud = next(b for b in after["backends"] if b["id"] == "cloud")
    assert cloud["quality"]["requests_1h"] == 3  # the outcomes came back with the backend


async def test_two_gateway_processes_sharing_one_redis_enforce_one_budget(
        tmp_path: Path, openai_api: FakeOpenAI, redis_url: str) -> None:
    prefix = f"nexus-test-{time.monotonic_ns()}"
    limit = 0.3  # each request holds $0.021 and costs $0.007
    path = config(tmp_path, openai_api.url, f'backend = "redis"\nurl = "{redis_url}"\nkey_prefix = "{prefix}"',
                  monthly_limit_usd=limit, hard_limit_action="block_cloud")
    env = nexus_env(**{KEY_ENV: KEY})
    async with aiohttp.ClientSession() as http:
        async with serve_nexus("--config", str(path), cwd=tmp_path, env=env) as a, \
                serve_nexus("--config", str(path), cwd=tmp_path, env=env) as b:
            statuses = await asyncio.gather(*(chat(http, (a, b)[i % 2].url) for i in range(100)))
    served = statuses.count(200)
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0, "\n".join(line[:3000] for line in [*a.stderr, *b.stderr] if "Unhandled" in line)
    store = RedisStore(redis_url, prefix)
    await store.open()
    try:
        spent, reserved = await store.totals(month_of(time.time()))
    finally:
        await store.close()
    assert reserved == 0
    assert spent == pytest.approx(served * 0.007)
    assert spent <= limit  # one budget across both gateways: no overrun
    assert len(openai_api.chats) == served


async def test_a_corrupt_state_file_is_a_one_line_start_up_error(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    state.write_bytes(b"this is not a SQLite database, just garbage bytes" * 100)
    (tmp_path / "nexus.toml").write_text(f'[state]\npath = "{state}"\n', encoding="utf-8")
    result = await run_nexus_async("serve", "--no-discovery", "--no-health-check", "--port", str(free_port()),
                                   cwd=tmp_path)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr_lines if line.startswith("Error: ")]
    assert len(errors) == 1 and str(state) in errors[0], result.stderr
