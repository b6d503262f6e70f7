"""Health checking (reference §6) and the discovery sink's grace period."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from nexus.discovery import DiscoveredEndpoint, readable_id
from nexus.registry import Status
from nexus.testing import BackendFactory, NexusFactory, backend_entry


async def test_first_success_makes_backend_healthy_with_its_models(fake_backend: BackendFactory,
                                                                   nexus: NexusFactory) -> None:
    backend = await fake_backend(models=["llama3", "qwen2.5"])
    gw = await nexus({"backends": [backend_entry(backend)]})
    state = gw.gateway.registry.get("fake")
    assert state is not None
    assert state.status is Status.HEALTHY
    assert list(state.models) == ["llama3", "qwen2.5"]
    assert state.avg_latency_ms > 0


async def test_thresholds_govern_transitions(fake_backend: BackendFactory, nexus: NexusFactory) -> None:
    backend = await fake_backend()
    gw = await nexus({"health_check": {"failure_threshold": 3, "recovery_threshold": 2},
                      "backends": [backend_entry(backend)]})
    state = gw.gateway.registry.get("fake")
    assert state is not None and state.status is Status.HEALTHY
    backend.models_status = 500
    await gw.check_health()
    await gw.check_health()
    assert state.status is Status.HEALTHY  # two failures are tolerated
    await gw.check_health()
    assert state.status is Status.UNHEALTHY
    assert state.last_error == "HTTP error: 500"
    backend.models_status = 200
    await gw.check_health()
    assert state.status is Status.UNHEALTHY  # one success is not enough
    await gw.check_health()
    assert state.status is Status.HEALTHY
    assert state.last_error is None


async def test_first_failure_from_unknown_is_unhealthy_at_once(fake_backend: BackendFactory,
                                                               nexus: NexusFactory) -> None:
    backend = await fake_backend()
    backend.models_status = 503
    gw = await nexus({"health_check": {"failure_threshold": 3}, "backends": [backend_entry(backend)]})
    state = gw.gateway.registry.get("fake")
    assert state is not None and state.status is Status.UNHEALTHY


async def test_invalid_model_list_counts_as_healthy_and_keeps_models(fake_backend: BackendFactory,
                                                                     nexus: NexusFactory) -> None:
    backend = await fake_backend(models=["keep-me"])
    gw = await nexus({"backends": [backend_entry(backend)]})
    backend.models_body = b"{not json"
    await gw.check_health()
    state = gw.gateway.registry.get("fake")
    assert state is not None
    assert state.status is Status.HEALTHY
    assert list(state.models) == ["keep-me"]


async def test_configured_probe_timeout_is_used(fake_backend: BackendFactory, nexus: NexusFactory) -> None:
    backend = await fake_backend()
    gw = await nexus({"health_check": {"timeout_seconds": 0.2}, "backends": [backend_entry(backend)]}, check=False)
    hang = asyncio.Event()

    async def slow_probe() -> None:
        await hang.wait()

    state = gw.gateway.registry.get("fake")
    assert state is not None
    state.adapter.probe = slow_probe  # type: ignore[method-assign]
    started = time.perf_counter()
    await gw.check_health()
    assert time.perf_counter() - started < 2
    assert state.status is Status.UNHEALTHY
    assert state.last_error == "request timeout after 0.2s"


async def test_latency_is_an_exponential_moving_average(fake_backend: BackendFactory, nexus: NexusFactory) -> None:
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)]}, check=False)
    state = gw.gateway.registry.get("fake")
    assert state is not None
    gw.gateway.health._success(state, 100.0, None)
    assert state.avg_latency_ms == 100.0
    gw.gateway.health._success(state, 200.0, None)
    assert state.avg_latency_ms == 120.0  # (200 + 4 * 100) / 5


async def test_configured_models_are_listed_and_routable_without_health_checks(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(models=[])
    gw = await nexus({"backends": [backend_entry(backend, models=["static-model"])]}, check=False)
    state = gw.gateway.registry.get("fake")
    assert state is not None and state.status is Status.HEALTHY
    async with http.post(f"{gw.url}/v1/chat/completions",
                         json={"model": "static-model", "messages": [{"role": "user", "content": "x"}]}) as resp:
        assert resp.status == 200


def test_readable_ids_are_stable_and_deduplicated() -> None:
    taken = {"gpu-box"}
    assert readable_id("GPU Box", taken.__contains__) == "gpu-box-2"
    assert readable_id("My_Ollama.local", taken.__contains__) == "my-ollama-local"


async def test_discovered_backend_vanishes_after_grace_and_keeps_id_if_back(fake_backend: BackendFactory,
                                                                            nexus: NexusFactory) -> None:
    backend = await fake_backend()
    gw = await nexus({"discovery": {"grace_period_seconds": 0.2}})
    from nexus.discovery import DiscoverySink

    gateway = gw.gateway
    sink = DiscoverySink(gateway.registry, gateway.config, gateway.build_backend, lambda b: None)
    endpoint = DiscoveredEndpoint(key="svc-1", name="Lab Ollama", url=backend.url, type="generic")
    added = sink.found(endpoint, "test")
    assert added is not None and added.id == "lab-ollama" and added.source == "test"
    sink.lost("svc-1")
    assert added.status is Status.UNKNOWN
    assert sink.found(endpoint, "test") is added  # back within the grace period: same backend
    sink.lost("svc-1")
    removed = asyncio.Event()
    asyncio.get_running_loop().call_later(0.3, removed.set)
    await removed.wait()
    assert gateway.registry.get("lab-ollama") is None
    sink.close()


async def test_static_backend_wins_over_discovered_duplicate(fake_backend: BackendFactory,
                                                             nexus: NexusFactory) -> None:
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)]})
    from nexus.discovery import DiscoverySink

    gateway = gw.gateway
    sink = DiscoverySink(gateway.registry, gateway.config, gateway.build_backend, lambda b: None)
    assert sink.found(DiscoveredEndpoint(key="k", name="dup", url=backend.url + "/v1", type="generic"), "mdns") is None
    assert [b.id for b in gateway.registry.all()] == ["fake"]


async def test_an_empty_model_list_clears_the_models(fake_backend: BackendFactory, nexus: NexusFactory) -> None:
    backend = await fake_backend(models=["gone-soon"])
    gw = await nexus({"backends": [backend_entry(backend, models=["pinned"])]})
    state = gw.gateway.registry.get("fake")
    assert state is not None and sorted(state.models) == ["gone-soon", "pinned"]
    backend.models = []
    await gw.check_health()
    assert list(state.models) == ["pinned"]  # configured models always stay listed
