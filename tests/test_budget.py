"""Spend accounting and the monthly budget: prices, costs in headers and stats, reservations
under concurrency, block_cloud / block_all, the soft limit and month rollover.

The cloud backend is the ``openai`` plugin against :class:`FakeOpenAI` (which follows the
OpenAI API reference, see its docstring); local backends are generic OpenAI-compatible fakes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import nexus_plugin_openai
from nexus.budget import Budget, month_of, next_month, prompt_text
from nexus.config import BudgetConfig, PriceConfig
from nexus.pricing import PriceTable
from nexus.state.base import MemoryStore
from nexus.testing.fakes import FakeBackend
from nexus.testing.fixtures import BackendFactory, NexusFactory, RunningNexus, backend_entry
from nexus.testing.openai_api import FakeOpenAI

KEY_ENV = "NEXUS_TEST_BUDGET_KEY"
KEY = "sk-budget-test-0123456789abcdefghij"
PLUGINS = [("openai", nexus_plugin_openai)]
# Round prices so costs are easy to check: $1000 / $2000 per million tokens = $0.001 / $0.002 per token.
PRICES = {"gpt-4o-mini": {"input": 1000.0, "output": 2000.0}}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10}


@pytest.fixture
async def openai_api(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv(KEY_ENV, KEY)
    fake = FakeOpenAI(api_key=KEY)
    await fake.start()
    yield fake
    await fake.stop()


def cloud(fake: FakeBackend) -> dict[str, Any]:
    return {"name": "cloud", "url": fake.url, "type": "openai", "api_key_env": KEY_ENV}


async def gateway(nexus: NexusFactory, *backends: dict[str, Any], **budget: Any) -> RunningNexus:
    return await nexus({"backends": list(backends), "routing": {"budget": {"prices": PRICES, **budget}}},
                       extra_plugins=PLUGINS)


async def spend(gw: RunningNexus, usd: float) -> None:
    """Spend recorded by some earlier request (as if another gateway had settled it)."""
    budget = gw.gateway.budget
    await gw.gateway.store.settle(budget.month, "", usd)
    await budget.refresh()


async def stats(http: aiohttp.ClientSession, gw: RunningNexus) -> dict[str, Any]:
    async with http.get(f"{gw.url}/v1/stats") as resp:
        return await resp.json()


# -- prices -----------------------------------------------------------------------------

def test_built_in_prices_cover_snapshots_and_fine_tunes_and_config_overrides_them() -> None:
    table = PriceTable(BudgetConfig(prices={"gpt-4o": PriceConfig(input=1.0, output=2.0),
                                            "my-cloud-model": PriceConfig(input=3.0, output=4.0, cached_input=1.0)}))
    assert table.price("gpt-4o-2024-08-06") == table.price("gpt-4o")
    assert table.price("gpt-4o") is not None and table.price("gpt-4o").input == 1.0  # type: ignore[union-attr]
    mini = table.price("gpt-4o-mini-2024-07-18")
    assert mini is not None and (mini.input, mini.output) == (0.15, 0.60)  # not gpt-4o's price
    assert table.price("ft:gpt-4o-mini:acme::abc123") == mini
    assert table.price("gpt-4ox") is None and table.price("llama3") is None
    custom = table.price("my-cloud-model")
    assert custom is not None and custom.cost(1000, 500, cached_tokens=400) == pytest.approx(
        (600 * 3.0 + 400 * 1.0 + 500 * 4.0) / 1e6)
    turbo = table.price("gpt-4-turbo")
    assert turbo is not None and turbo.cost(1000, 500) == pytest.approx(0.025)  # upstream's check


def test_prompt_text_reads_messages_prompts_and_inputs() -> None:
    assert prompt_text(b'{"messages":[{"content":"a"},{"content":[{"type":"text","text":"b"},'
                       b'{"type":"image_url","image_url":{"url":"x"}}]}]}') == "a\nb"
    assert prompt_text(b'{"prompt":["x","y"]}') == "x\ny"
    assert prompt_text(b'{"input":"z"}') == "z"
    assert len(prompt_text(b'{"prompt":[1,2,3]}')) == 12  # token ids: about one token each
    assert prompt_text(b"not json") == ""


def test_month_helpers() -> None:
    assert month_of(0) == "1970-01" and next_month("2026-12") == "2027-01" and next_month("2026-01") == "2026-02"


async def test_month_rollover_with_an_injected_clock() -> None:
    now = [1_798_761_600.0 - 10]  # 2026-12-31T23:59:50Z
    store = MemoryStore()
    budget = Budget(BudgetConfig(monthly_limit_usd=10.0), store, PriceTable(BudgetConfig()), clock=lambda: now[0])
    await store.settle(budget.month, "", 9.0)
    await budget.refresh()
    assert (budget.month, budget.status()) == ("2026-12", "SoftLimit")
    now[0] += 20  # 2027-01-01T00:00:10Z
    await budget.refresh()
    assert (budget.month, budget.spent, budget.status(), budget.rollovers) == ("2027-01", 0.0, "Normal", 1)
    assert budget.snapshot()["next_reset_date"] == "2027-02-01"  # type: ignore[index]
    assert await store.totals("2026-12") == (9.0, 0.0)  # last month's ledger is kept


# -- accounting -------------------------------------------------------------------------

async def test_cost_comes_from_usage_and_shows_in_headers_stats_and_spend(
        openai_api: FakeOpenAI, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw = await gateway(nexus, cloud(openai_api), monthly_limit_usd=100.0)
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
        # usage: 3 prompt + 2 completion tokens -> 3 x 0.001 + 2 x 0.002
        assert resp.headers["X-Nexus-Cost-Estimated"] == "0.0070"
        assert "X-Nexus-Budget-Status" not in resp.headers  # Normal
    budget = (await stats(http, gw))["budget"]
    assert budget["current_spending_usd"] == pytest.approx(0.007)
    assert budget["reserved_usd"] == 0 and budget["status"] == "Normal"
    assert budget["monthly_limit_usd"] == 100.0 and budget["hard_limit_action"] == "Warn"
    assert await gw.gateway.store.totals(gw.gateway.budget.month) == (pytest.approx(0.007), 0.0)


async def test_stream_cost_from_the_usage_chunk_or_else_from_counting_the_streamed_text(
        openai_api: FakeOpenAI, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw = await gateway(nexus, cloud(openai_api))
    async with http.post(f"{gw.url}/v1/chat/completions",
                         json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        # Headers leave before the answer: they show the held worst case (1 prompt token + 10 output).
        assert resp.headers["X-Nexus-Cost-Estimated"] == "0.0210"
        await resp.read()
    assert gw.gateway.budget.spent == pytest.approx(3 * 0.001 + 3 * 0.002)  # the usage chunk: 3 + 3
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        await resp.read()
    # No usage chunk: "Hel" "lo" "!" counted with o200k_base ("Hello!" = 2 tokens), the prompt
    # counted at admission ("Hi" = 1 token).
    expected = nexus_plugin_openai.count_tokens("gpt-4o-mini", "Hello!")
    assert expected == 2
    assert gw.gateway.budget.spent == pytest.approx(0.009 + 1 * 0.001 + expected * 0.002)
    body = await stats(http, gw)
    assert "budget" not in body  # no limit configured
    assert body["spend"]["current_spending_usd"] == pytest.approx(0.009 + 0.005)


async def test_an_unpriced_cloud_model_is_counted_as_unpriced_never_as_free(
        openai_api: FakeOpenAI, nexus: NexusFactory, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    gw = await gateway(nexus, cloud(openai_api))
    gw.gateway.budget.prices.prices.clear()  # as if o3-mini were a model newer than the table
    for _ in range(2):
        async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "o3-mini"}) as resp:
            assert resp.status == 200 and "X-Nexus-Cost-Estimated" not in resp.headers
    spend = (await stats(http, gw))["spend"]
    assert spend["unpriced_requests"] == {"o3-mini": 2} and spend["current_spending_usd"] == 0
    assert sum("No price for cloud model 'o3-mini'" in r.getMessage() for r in caplog.records) == 1


async def test_local_requests_cost_nothing_unless_an_energy_price_is_set(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    local = await fake_backend(name="local")
    gw = await nexus({"backends": [backend_entry(local)],
                      "routing": {"budget": {"local_usd_per_gpu_second": 3600.0, "monthly_limit_usd": 1.0}}})
    async with http.post(f"{gw.url}/v1/chat/completions",
                         json={"model": "test-model", "messages": [{"role": "user", "content": "Hi"}]}) as resp:
        assert resp.status == 200
        assert float(resp.headers["X-Nexus-Cost-Estimated"]) > 0  # $1 per ms of backend time
    body = await stats(http, gw)
    assert body["spend"]["local_energy_usd"] > 0
    assert body["budget"]["current_spending_usd"] == 0  # local energy is reported, not charged to the limit


# -- enforcement ------------------------------------------------------------------------

async def test_200_concurrent_requests_never_pass_the_limit(
        openai_api: FakeOpenAI, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    # Each request holds at most 1 x 0.001 + 10 x 0.002 = $0.021 and really costs $0.007.
    limit = 0.5
    gw = await gateway(nexus, cloud(openai_api), monthly_limit_usd=limit, hard_limit_action="block_cloud")

    async def one() -> int:
        async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
            body = await resp.json()
            if resp.status == 503:
                assert body["error"]["code"] in ("budget_exceeded", "no_healthy_backend"), body
            return resp.status

    statuses = await asyncio.gather(*(one() for _ in range(200)))
    served = statuses.count(200)
    budget = gw.gateway.budget
    await budget.drain()
    await budget.refresh()
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0
    assert budget.spent == pytest.approx(served * 0.007) and budget.reserved == 0
    assert budget.spent <= limit  # the overrun is 0: every hold was granted within the limit
    assert len(openai_api.chats) == served  # refused requests never reached the cloud


async def test_block_cloud_keeps_local_serving_and_refuses_cloud_with_context(
        openai_api: FakeOpenAI, fake_backend: BackendFactory, nexus: NexusFactory,
        http: aiohttp.ClientSession) -> None:
    local = await fake_backend(name="local")
    gw = await gateway(nexus, cloud(openai_api), backend_entry(local), monthly_limit_usd=1.0,
                       hard_limit_action="block_cloud")
    await spend(gw, 1.0)
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 503
        body = await resp.json()
        assert "Monthly budget exhausted" in body["error"]["message"]
        assert body["error"]["code"] == "budget_exceeded"
        assert body["context"]["budget_status"] == "HardLimit"
        assert "budget" in resp.headers["X-Nexus-Rejection-Reasons"]
    assert openai_api.chats == []
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "test-model"}) as resp:
        assert resp.status == 200 and resp.headers["X-Nexus-Backend"] == "local"
        assert resp.headers["X-Nexus-Budget-Status"] == "HardLimit"
        assert resp.headers["X-Nexus-Budget-Utilization"] == "100.0"
        assert resp.headers["X-Nexus-Budget-Remaining"] == "0.0000"
    assert (await stats(http, gw))["budget"]["status"] == "HardLimit"
    async with http.get(f"{gw.url}/metrics") as resp:
        families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    month = gw.gateway.budget.month
    assert [(s.labels, s.value) for s in families["nexus_budget_status"].samples] == [({"billing_month": month}, 2.0)]
    assert families["nexus_budget_limit_usd"].samples[0].value == 1.0
    assert families["nexus_budget_spending_usd"].samples[0].value == 1.0


async def test_block_all_refuses_local_too_and_warn_refuses_nothing(
        openai_api: FakeOpenAI, fake_backend: BackendFactory, nexus: NexusFactory,
        http: aiohttp.ClientSession) -> None:
    local = await fake_backend(name="local")
    blocked = await gateway(nexus, cloud(openai_api), backend_entry(local), monthly_limit_usd=1.0,
                            hard_limit_action="block_all")
    warned = await gateway(nexus, cloud(openai_api), backend_entry(local), monthly_limit_usd=1.0)
    for gw in (blocked, warned):
        await spend(gw, 2.0)
    for model in ("test-model", "gpt-4o-mini"):
        async with http.post(f"{blocked.url}/v1/chat/completions", json={**CHAT, "model": model}) as resp:
            assert resp.status == 503 and "all backends blocked" in (await resp.json())["error"]["message"]
        async with http.post(f"{warned.url}/v1/chat/completions", json={**CHAT, "model": model}) as resp:
            assert resp.status == 200 and resp.headers["X-Nexus-Budget-Status"] == "HardLimit"
    assert (await stats(http, warned))["budget"]["utilization_percent"] == pytest.approx(200.7, abs=0.01)


async def test_soft_limit_halves_cloud_scores_so_local_is_preferred(
        openai_api: FakeOpenAI, fake_backend: BackendFactory, nexus: NexusFactory,
        http: aiohttp.ClientSession) -> None:
    local = await fake_backend(name="local", models=["gpt-4o-mini"])
    # The cloud backend is preferred by priority (lower is better) while the budget is Normal.
    gw = await gateway(nexus, {**cloud(openai_api), "priority": 1}, backend_entry(local, priority=60),
                       monthly_limit_usd=10.0)
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.headers["X-Nexus-Backend"] == "cloud"
    await spend(gw, 8.0)  # 80 % > soft limit 75 %
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200 and resp.headers["X-Nexus-Backend"] == "local"
        assert resp.headers["X-Nexus-Budget-Status"] == "SoftLimit"
    await local.stop()
    await gw.check_health()
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:  # cloud is still used when alone
        assert resp.status == 200 and resp.headers["X-Nexus-Backend"] == "cloud"


# -- holds always end ---------------------------------------------------------------------

async def test_a_cloud_failure_that_local_recovers_leaves_no_hold_and_no_charge(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    broken_cloud = FakeOpenAI(api_key=KEY, mode="status:500")
    await broken_cloud.start()
    try:
        local = await fake_backend(name="local", models=["gpt-4o-mini"])
        gw = await gateway(nexus, {**cloud(broken_cloud), "priority": 1}, backend_entry(local, priority=90),
                           monthly_limit_usd=10.0)
        async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200 and resp.headers["X-Nexus-Backend"] == "local"
            assert "X-Nexus-Cost-Estimated" not in resp.headers  # the cloud hold is not the local cost
        assert len(broken_cloud.chats) == 1
        budget = gw.gateway.budget
        await budget.drain()
        assert (budget.spent, budget.reserved) == (0.0, 0.0)
        assert await gw.gateway.store.totals(budget.month) == (0.0, 0.0)
        assert (await stats(http, gw))["spend"]["local_energy_usd"] == 0
    finally:
        await broken_cloud.stop()


async def test_a_cloud_4xx_passed_through_shows_and_costs_nothing(
        nexus: NexusFactory, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    refusing = FakeOpenAI(api_key=KEY, mode="status:400")
    await refusing.start()
    try:
        gw = await gateway(nexus, cloud(refusing), monthly_limit_usd=10.0)
        async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 400 and "X-Nexus-Cost-Estimated" not in resp.headers
        await gw.gateway.budget.drain()
        assert await gw.gateway.store.totals(gw.gateway.budget.month) == (0.0, 0.0)
    finally:
        await refusing.stop()


async def test_failover_onto_the_cloud_is_held_too_so_200_concurrent_cannot_overrun(
        openai_api: FakeOpenAI, fake_backend: BackendFactory, nexus: NexusFactory,
        http: aiohttp.ClientSession) -> None:
    # The local backend ranks first and fails every request: each one fails over to the cloud,
    # which must hold the budget then, not only when the cloud was the first choice.
    local = await fake_backend(name="local", models=["gpt-4o-mini"], mode="status:500")
    limit = 0.5
    gw = await gateway(nexus, {**cloud(openai_api), "priority": 90}, backend_entry(local, priority=1),
                       monthly_limit_usd=limit, hard_limit_action="block_cloud")

    async def one() -> int:
        async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(one() for _ in range(200)))
    budget = gw.gateway.budget
    await budget.drain()
    await budget.refresh()
    served = statuses.count(200)
    assert served == len(openai_api.chats) and statuses.count(503) + statuses.count(502) > 0
    assert budget.spent == pytest.approx(served * 0.007) and budget.reserved == 0
    assert budget.spent <= limit


async def test_settling_a_hold_of_last_month_leaves_this_months_holds_alone() -> None:
    from nexus.budget import Reservation
    from nexus.record import RequestRecord

    now = [1_798_761_600.0 - 10]  # 2026-12-31T23:59:50Z
    store = MemoryStore()
    budget = Budget(BudgetConfig(monthly_limit_usd=100.0), store, PriceTable(BudgetConfig()), clock=lambda: now[0])
    old = RequestRecord("/v1/chat/completions", "m", False, backend_type="cloud", outcome="error")
    old.reservation = Reservation("old", "2026-12", 3.0, 10, "m")
    await store.reserve("2026-12", "old", 3.0, None)
    budget.reserved = 3.0
    now[0] += 20
    await budget.refresh()  # January: the December hold is not this month's
    await store.reserve("2027-01", "new", 5.0, None)
    budget.reserved += 5.0
    budget.settle(old)
    await budget.drain()
    assert budget.reserved == 5.0 and await store.totals("2027-01") == (0.0, 5.0)
    assert await store.totals("2026-12") == (0.0, 0.0)


async def test_a_refresh_keeps_what_changed_while_it_was_reading_the_store() -> None:
    class SlowTotals(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.reading, self.answer = asyncio.Event(), asyncio.Event()

        async def totals(self, month: str) -> tuple[float, float]:
            result = self._totals(month)  # read now, answer later: as a store busy elsewhere
            self.reading.set()
            await self.answer.wait()
            return result

    store = SlowTotals()
    budget = Budget(BudgetConfig(monthly_limit_usd=10.0), store, PriceTable(BudgetConfig()))
    refreshing = asyncio.gather(budget.refresh(), budget.refresh())  # two at once, as under load
    await store.reading.wait()
    budget._change(0.0, 2.5)  # a hold granted meanwhile
    store.answer.set()
    await refreshing
    assert budget.reserved == 2.5  # not overwritten by the older reads
