"""/metrics: Prometheus names and labels as upstream §2.7, every endpoint and streams
counted, outcome-aware, bounded cardinality, gauges read at scrape time."""

from __future__ import annotations

import asyncio
import random
import string
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nexus import metrics as metrics_mod
from nexus.adapters.generic import GenericAdapter
from nexus.config import BackendConfig
from nexus.metrics import MAX_BACKEND_LABELS, Metrics, sanitize_label
from nexus.record import RequestRecord
from nexus.registry import Backend, ModelInfo
from nexus.testing import CHAT, BackendFactory, NexusFactory, RunningNexus, backend_entry

STREAM = {**CHAT, "stream": True}
Samples = dict[str, list[tuple[dict[str, str], float]]]


async def scrape(gw: RunningNexus, http: aiohttp.ClientSession) -> Samples:
    """Every sample of ``GET /metrics``, by sample name, parsed by prometheus_client."""
    async with http.get(f"{gw.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = await resp.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels`` (0 when there is none)."""
    found = [v for lbls, v in samples.get(name, []) if labels.items() <= lbls.items()]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


def label_values(samples: Samples, label: str) -> set[str]:
    return {lbls[label] for series in samples.values() for lbls, _ in series if label in lbls}


async def test_requests_streams_and_gauges_are_exported(fake_backend: BackendFactory, nexus: NexusFactory,
                                                        http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(models=["test-model", "text-embed"])
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
    async with http.post(f"{gw.url}/v1/chat/completions", json=STREAM) as resp:
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    async with http.post(f"{gw.url}/v1/embeddings", json={"model": "text-embed", "input": "x"}) as resp:
        assert resp.status == 200
    m = await scrape(gw, http)
    ok = {"model": "test_model", "backend": "fake", "status": "200", "outcome": "success"}
    assert value(m, "nexus_requests_total", **ok) == 2  # streams are counted like any other request
    assert value(m, "nexus_requests_total", model="text_embed", outcome="success") == 1  # every endpoint
    assert value(m, "nexus_request_duration_seconds_count", model="test_model", backend="fake") == 2
    assert value(m, "nexus_request_duration_seconds_bucket", model="test_model", backend="fake", le="+Inf") == 2
    assert value(m, "nexus_time_to_first_token_seconds_count", model="test_model", backend="fake") == 1
    assert value(m, "nexus_tokens_total_count", model="test_model", type="prompt") == 1  # the JSON answer's usage
    assert value(m, "nexus_tokens_total_sum", model="test_model", type="completion") == 2
    assert value(m, "nexus_backends_total") == 1 and value(m, "nexus_backends_healthy") == 1
    assert value(m, "nexus_models_available") == 2
    assert value(m, "nexus_pending_requests", backend="fake") == 0
    assert value(m, "nexus_queue_depth") == 0
    assert value(m, "nexus_backend_latency_seconds_count", backend="fake") >= 1  # the fixture's health check
    assert value(m, "nexus_pipeline_duration_seconds_count") == 3
    assert value(m, "nexus_reconciler_duration_seconds_count", reconciler="scheduling") == 3
    assert value(m, "nexus_reconciler_exclusions_total", reconciler="privacy") == 0  # present from the start
    assert value(m, "nexus_agent_success_rate_24h", agent_id="fake") == 1.0
    assert "nexus_errors_total" not in m and "nexus_budget_status" not in m  # no limit configured
    # the lines of each family come from the gateway's own registry, not the global default one
    assert not any(name.startswith(("python_", "process_")) for name in m)


async def test_refusals_errors_and_cut_streams(fake_backend: BackendFactory, nexus: NexusFactory,
                                              http: aiohttp.ClientSession) -> None:
    cut = await fake_backend(mode="cut")
    gw = await nexus({"backends": [backend_entry(cut)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "nope"}) as resp:
        assert resp.status == 404
    async with http.post(f"{gw.url}/v1/chat/completions", json=STREAM) as resp:
        await resp.read()
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "messages": [image]}) as resp:
        assert resp.status == 400  # the model has no vision: request analysis excludes the backend
    m = await scrape(gw, http)
    assert value(m, "nexus_errors_total", error_type="model_not_found", model="other") == 1
    assert value(m, "nexus_requests_total", model="other", backend="none", status="404", outcome="error") == 1
    assert value(m, "nexus_requests_total", backend="fake", status="200", outcome="interrupted") == 1
    assert value(m, "nexus_errors_total", error_type="stream_interrupted", model="test_model") == 1
    assert value(m, "nexus_errors_total", error_type="invalid_request", model="test_model") == 1
    assert value(m, "nexus_reconciler_exclusions_total", reconciler="request_analysis") == 1
    assert value(m, "nexus_request_duration_seconds_count", model="test_model") == 0  # successes only


async def test_retries_and_fallbacks(fake_backend: BackendFactory, nexus: NexusFactory,
                                     http: aiohttp.ClientSession) -> None:
    broken = await fake_backend(name="broken", mode="status:500")
    good = await fake_backend(name="good")
    gw = await nexus({"routing": {"fallbacks": {"big-model": ["test-model"]}},
                      "backends": [backend_entry(broken, priority=1), backend_entry(good, priority=2)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.headers["X-Nexus-Retries"] == "1"
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "big-model"}) as resp:
        assert resp.headers["X-Nexus-Fallback-Model"] == "test-model"
    m = await scrape(gw, http)
    assert value(m, "nexus_errors_total", error_type="retry", model="test_model") >= 1
    assert value(m, "nexus_fallbacks_total", from_model="big_model", to_model="test_model") == 1
    assert value(m, "nexus_requests_total", model="test_model", backend="good", outcome="success") == 2


async def test_random_model_names_collapse_into_other(fake_backend: BackendFactory, nexus: NexusFactory,
                                                      http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(models=["4o"])
    gw = await nexus({"backends": [backend_entry(backend)]})
    rng = random.Random(7)
    for _ in range(50):
        name = "".join(rng.choices(string.ascii_letters + string.digits + "-:.", k=12))
        async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": name}) as resp:
            assert resp.status == 404
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "4o"}) as resp:
        assert resp.status == 200
    m = await scrape(gw, http)
    assert label_values(m, "model") == {"other", "_4o"}
    assert value(m, "nexus_errors_total", error_type="model_not_found", model="other") == 50
    assert value(m, "nexus_requests_total", model="_4o", outcome="success") == 1


async def test_cancelled_request_is_counted(fake_backend: BackendFactory, nexus: NexusFactory,
                                            http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(mode="hang")
    gw = await nexus({"backends": [backend_entry(backend)]})
    task = asyncio.ensure_future(http.post(f"{gw.url}/v1/chat/completions", json=CHAT))
    await asyncio.wait_for(backend.got_request.wait(), 5)
    task.cancel()
    await asyncio.wait_for(backend.client_gone.wait(), 5)
    for _ in range(100):  # the handler's cleanup runs just after the upstream closed
        m = await scrape(gw, http)
        if value(m, "nexus_requests_cancelled_total", model="test_model"):
            break
        await asyncio.sleep(0.02)
    assert value(m, "nexus_requests_cancelled_total", model="test_model") == 1
    assert value(m, "nexus_requests_total", model="test_model", status="none", outcome="cancelled") == 1
    assert "nexus_errors_total" not in m


async def test_budget_gauges_when_a_limit_is_set(nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw = await nexus({"routing": {"budget": {"monthly_limit_usd": 20.0}}})
    m = await scrape(gw, http)
    month = next(lbls["billing_month"] for lbls, _ in m["nexus_budget_status"])
    assert value(m, "nexus_budget_status", billing_month=month) == 0  # Normal
    assert value(m, "nexus_budget_limit_usd") == 20.0
    assert value(m, "nexus_budget_spending_usd", billing_month=month) == 0.0
    assert value(m, "nexus_budget_utilization_percent", billing_month=month) == 0.0


async def test_several_gateways_have_separate_registries(nexus: NexusFactory) -> None:
    one, two = await nexus(), await nexus()
    assert one.gateway.metrics.registry is not two.gateway.metrics.registry


def test_label_sanitising() -> None:
    assert sanitize_label("ollama-local:11434") == "ollama_local_11434"
    assert sanitize_label("4o") == "_4o"
    assert sanitize_label("llama3.2:3b") == "llama3_2_3b"
    assert sanitize_label("already_fine") == "already_fine"


class _FakeGateway:
    """What :class:`Metrics` reads of a gateway, for tests without a server."""

    def __init__(self, raw: dict[str, Any] | None = None) -> None:
        from nexus import config as config_mod
        from nexus.budget import Budget
        from nexus.pricing import PriceTable
        from nexus.queue import RequestQueue
        from nexus.state.base import MemoryStore
        from nexus.registry import Registry
        from nexus.routing.router import Pipeline

        self.config = config_mod.build(raw or {}, source="test")
        self.registry = Registry()
        self.pipeline = Pipeline([])
        self.queue = RequestQueue(self.config.queue)
        self.budget = Budget(self.config.routing.budget, MemoryStore(), PriceTable(self.config.routing.budget))


def _metrics(raw: dict[str, Any] | None = None) -> Metrics:
    return Metrics(_FakeGateway(raw))  # type: ignore[arg-type]


def test_backend_labels_are_capped() -> None:
    metrics = _metrics()
    labels = {metrics.backend_label(f"mdns-{i}") for i in range(MAX_BACKEND_LABELS + 50)}
    assert len(labels) == MAX_BACKEND_LABELS + 1 and "other" in labels


def generic_backend(name: str) -> Backend:
    spec = BackendConfig(name=name, url=f"http://{name}.invalid", type="generic")
    return Backend(id=name, name=name, url=spec.url, adapter=GenericAdapter(spec, None),  # type: ignore[arg-type]
                   zone="restricted", tier=1, priority=50)


def test_label_caps_count_live_backends_and_models_not_every_one_ever_seen(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_mod, "MAX_BACKEND_LABELS", 3)
    monkeypatch.setattr(metrics_mod, "MAX_MODEL_LABELS", 4)
    metrics = _metrics({"routing": {"aliases": {"fast": "llama3"}}})
    registry = metrics.gateway.registry
    assert metrics.model_label("fast") == "fast"  # configured: never forgotten
    for generation in range(4):  # churn: each generation replaces the whole fleet (mDNS, POST/DELETE)
        fleet = [generic_backend(f"gen{generation}-{i}") for i in range(4)]
        models = [f"gen{generation}-m{i}-{k}" for i in range(4) for k in range(2)]
        for i, backend in enumerate(fleet):
            registry.add(backend)
            registry.set_models(backend, [ModelInfo(id=m) for m in models[2 * i:2 * i + 2]])
        # the caps hold against the live fleet: three backends, and three models beside the alias
        assert [metrics.backend_label(b.id) for b in fleet] == [f"gen{generation}_0", f"gen{generation}_1",
                                                                  f"gen{generation}_2", "other"]
        assert [metrics.model_label(m) for m in models] == [sanitize_label(m) for m in models[:3]] + ["other"] * 5
        assert metrics.model_label("fast") == "fast" and metrics.model_label("nope") == "other"
        for backend in fleet:
            registry.remove(backend.id)
    assert len(metrics._backend_labels) <= 3 and len(metrics._model_labels) <= 4


async def test_backend_ids_sharing_a_label_never_duplicate_a_series(fake_backend: BackendFactory,
                                                                    nexus: NexusFactory,
                                                                    http: aiohttp.ClientSession) -> None:
    dash = await fake_backend(name="gpu-1", models=["a"])
    under = await fake_backend(name="gpu_1", models=["b"])
    gw = await nexus({"backends": [backend_entry(dash), backend_entry(under)]})
    for model in ("a", "b"):
        async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": model}) as resp:
            assert resp.status == 200
    registry = gw.gateway.registry
    slow, failing = registry.get("gpu-1"), registry.get("gpu_1")
    assert slow is not None and failing is not None
    for backend in (slow, failing):
        backend.quality.reset()  # only the outcomes below
    slow.quality.record(True, 800.0)  # the slower one ...
    failing.quality.record(True, 400.0)
    failing.quality.record(False, None)  # ... and the one that fails
    for backend in (slow, failing):
        backend.quality.recompute(1.0)
    m = await scrape(gw, http)
    for name, samples in m.items():
        keys = [tuple(sorted(labels.items())) for labels, _ in samples]
        assert len(keys) == len(set(keys)), (name, keys)
    # one series per label value, showing the worst of the backends behind it, gauge by gauge
    assert value(m, "nexus_agent_error_rate", agent_id="gpu_1") == 0.5
    assert value(m, "nexus_agent_success_rate_24h", agent_id="gpu_1") == 0.5
    assert value(m, "nexus_agent_ttft_seconds", agent_id="gpu_1") == 0.8
    assert value(m, "nexus_requests_total", model="a", backend="gpu_1", outcome="success") == 1
    assert value(m, "nexus_pending_requests", backend="gpu_1") == 0


def test_cost_histogram_and_error_types() -> None:
    metrics = _metrics()
    record = RequestRecord("/v1/chat/completions", "gpt-x", False, backend="cloud-1", status=200,
                           outcome="success", duration_ms=120.0, cost_usd=0.003)
    metrics.record(record)
    series = metrics.cost.series[("other",)]  # no backend lists gpt-x in this registry
    assert series[-1] == 0.003 and sum(series[:-1]) == 1
    assert b'nexus_cost_per_request_usd_bucket{le="0.005",model="other"} 1.0' in metrics.render()

    def kind(**fields: Any) -> str:
        return RequestRecord("/v1/chat/completions", "m", False, **fields).error_kind()

    assert kind(status=404) == "model_not_found"
    assert kind(status=404, backend="b") == "backend_client_error"
    assert kind(status=502, backend="b") == "backend_error"
    assert kind(status=504, backend="b") == "timeout"
    assert kind(status=503) == "unavailable"
    assert kind(status=200, backend="b", outcome="interrupted") == "stream_interrupted"
    assert kind(status=0) == "internal_error"
