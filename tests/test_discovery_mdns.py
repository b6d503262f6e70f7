"""mDNS discovery over real multicast on loopback (see tests/discovery_support.py), and the
parsing of what a service announces."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest
from zeroconf.asyncio import AsyncServiceInfo

from nexus import GenericAdapter
from nexus.discovery_mdns import backend_type, endpoint_from_service, instance_label, parse_txt
from nexus.registry import Status
from nexus.testing import CHAT, BackendFactory
from tests.discovery_support import (
    DiscoveringFactory,
    Publisher,
    discovering_nexus,
    eventually,
    loopback_mdns,
    publisher,
    service,
)

__all__ = ["discovering_nexus", "loopback_mdns", "publisher"]  # fixtures used here


async def listed_models(http: aiohttp.ClientSession, url: str) -> set[str]:
    async with http.get(f"{url}/v1/models") as resp:
        return {entry["id"] for entry in (await resp.json())["data"]}


async def test_announced_backend_is_served_then_removed_after_the_grace_period(
        fake_backend: BackendFactory, publisher: Publisher, discovering_nexus: DiscoveringFactory,
        http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(models=["mdns-model"])
    gw = await discovering_nexus({"grace_period_seconds": 0.5})
    info = service(gw.service_type, "Lab_Box", backend.port, {"type": "generic", "api_path": "/v1", "version": "1.2"})
    started = time.monotonic()
    await publisher.register(info)
    while "mdns-model" not in await listed_models(http, gw.url):  # what a client sees, within a few seconds
        assert time.monotonic() - started < 5, "the announced backend's model was not listed within 5 s"
        await asyncio.sleep(0.02)
    found = gw.gateway.registry.get("lab-box")
    assert found is not None
    assert (found.source, found.url, found.type_name, found.status) == ("mdns", backend.url, "generic", Status.HEALTHY)
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "mdns-model"}) as resp:
        assert resp.status == 200 and resp.headers["X-Nexus-Backend"] == "lab-box"

    await publisher.unregister(info)
    await eventually(lambda: found.status is Status.UNKNOWN, what="the vanished backend to become unknown")
    assert gw.gateway.registry.get("lab-box") is found  # kept during the grace period
    assert "mdns-model" not in await listed_models(http, gw.url)
    await eventually(lambda: gw.gateway.registry.get("lab-box") is None, what="removal after the grace period")


async def test_a_service_back_within_the_grace_period_keeps_its_id_and_is_healthy_again(
        fake_backend: BackendFactory, publisher: Publisher, discovering_nexus: DiscoveringFactory) -> None:
    backend = await fake_backend(models=["comeback-model"])
    gw = await discovering_nexus({"grace_period_seconds": 2})
    registry = gw.gateway.registry
    info = service(gw.service_type, "Comeback", backend.port, {})
    await publisher.register(info)
    found = await eventually(lambda: registry.get("comeback"), what="discovery")
    await eventually(lambda: found.status is Status.HEALTHY, what="the first health check")

    await publisher.unregister(info)
    await eventually(lambda: found.status is Status.UNKNOWN, what="the service to be lost")
    lost_at = time.monotonic()
    await publisher.register(service(gw.service_type, "Comeback", backend.port, {}))
    await eventually(lambda: found.status is Status.HEALTHY, what="health restored after coming back")
    assert registry.get("comeback") is found and [b.id for b in registry.all()] == ["comeback"]
    await eventually(lambda: time.monotonic() > lost_at + 2.3, what="the end of the old grace period")
    assert registry.get("comeback") is found, "the removal was not cancelled"


async def test_static_config_wins_over_the_same_server_announced(
        fake_backend: BackendFactory, publisher: Publisher, discovering_nexus: DiscoveringFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    backend = await fake_backend()
    caplog.set_level(logging.DEBUG, logger="nexus.discovery")
    static = {"name": "static-box", "url": f"http://localhost:{backend.port}/v1", "type": "generic"}
    gw = await discovering_nexus(backends=[static])
    await publisher.register(service(gw.service_type, "Same Box", backend.port, {"api_path": "/v1"}))
    await eventually(lambda: any("Ignoring Same Box" in r.getMessage() for r in caplog.records),
                     what="the announced duplicate to be resolved and ignored")
    assert [b.id for b in gw.gateway.registry.all()] == ["static-box"]


async def test_mdns_unavailable_is_one_warning_and_the_gateway_runs_on(
        discovering_nexus: DiscoveringFactory, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nexus")
    # 198.51.100.7 (TEST-NET-2) is on no interface here: zeroconf cannot bind it, and sends nothing.
    gw = await discovering_nexus({"interfaces": ["198.51.100.7"]})
    warnings = await eventually(lambda: [r for r in caplog.records if "mDNS discovery is unavailable" in r.getMessage()],
                                what="the warning")
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    async with http.get(f"{gw.url}/health") as resp:
        assert resp.status == 200


# -- what a service announces ------------------------------------------------------------

LLM = "_llm._tcp.local."


class FakeOllamaAdapter(GenericAdapter):
    type_name = "ollama"
    mdns_service_types = ("_ollama._tcp.local.",)


class FakeCloudAdapter(GenericAdapter):
    type_name = "openai"
    cloud = True


TYPES = {"generic": GenericAdapter, "ollama": FakeOllamaAdapter, "openai": FakeCloudAdapter}


def resolved(txt: dict[bytes, bytes | None], *, addresses: list[str] | None = None, port: int = 8080,
             service_type: str = LLM, instance: str = "GPU_Box.2", interface_index: int | None = None,
             ) -> AsyncServiceInfo:
    info = AsyncServiceInfo(service_type, f"{instance}.{service_type}", port=port, properties=txt,
                            parsed_addresses=addresses or ["192.0.2.10"], interface_index=interface_index)
    return info


def test_txt_values_are_parsed_and_malformed_ones_ignored() -> None:
    txt = {
        b"type": b"LLAMA.CPP", b"api_path": b"/v1", b"version": b"0.5.1", b"zone": b"Open", b"tier": b"3",
        b"priority": b"10", b"models": b" a , b,,a ", b"unknown": b"kept out",
    }
    assert parse_txt(txt) == {"type": "llamacpp", "api_path": "/v1", "version": "0.5.1", "zone": "open",
                              "tier": 3, "priority": 10, "models": ["a", "b"]}
    malformed = {
        b"type": b"", b"api_path": b"v1", b"version": b"\xff\xfe", b"zone": b"internal", b"tier": b"9",
        b"priority": b"high", b"models": b" , ", b"flag": None, b"zone\xff": b"open",
    }
    assert parse_txt(malformed) == {}
    assert parse_txt({b"tier": None, b"models": None}) == {}  # keys without "=value"


def test_endpoint_from_a_service_normalises_the_url_and_reads_txt() -> None:
    endpoint = endpoint_from_service(
        resolved({b"type": b"generic", b"api_path": b"/v1", b"zone": b"open", b"tier": b"2", b"models": b"m1,m2",
                  b"version": b"7"}), LLM, TYPES)
    assert endpoint is not None
    assert (endpoint.url, endpoint.type, endpoint.zone, endpoint.tier, endpoint.priority, endpoint.models) == (
        "http://192.0.2.10:8080", "generic", "open", 2, 50, ["m1", "m2"])
    assert (endpoint.name, endpoint.key) == ("GPU Box.2", f"gpu_box.2.{LLM}")
    assert endpoint.metadata == {"mdns_instance": f"GPU_Box.2.{LLM}", "service_type": LLM, "version": "7"}
    bare = endpoint_from_service(resolved({}, port=11434), LLM, TYPES)  # no TXT at all: defaults
    assert bare is not None and (bare.url, bare.type, bare.zone, bare.tier, bare.models) == (
        "http://192.0.2.10:11434", "generic", None, 1, [])
    assert endpoint_from_service(resolved({b"api_path": b"/api/openai/v1/"}), LLM, TYPES).url == (  # type: ignore[union-attr]
        "http://192.0.2.10:8080/api/openai")


def test_ipv4_is_preferred_and_ipv6_is_bracketed() -> None:
    def url(addresses: list[str], interface_index: int | None = None) -> str:
        endpoint = endpoint_from_service(resolved({}, addresses=addresses, interface_index=interface_index), LLM, TYPES)
        assert endpoint is not None
        return endpoint.url

    assert url(["fd00::5", "192.0.2.7"]) == "http://192.0.2.7:8080"
    assert url(["fd00::5"]) == "http://[fd00::5]:8080"
    assert url(["fe80::1", "2001:db8::9"]) == "http://[2001:db8::9]:8080"  # global before link-local
    assert url(["fe80::1"], interface_index=3) == "http://[fe80::1%253]:8080"  # zone id, %-encoded


def test_a_service_without_address_or_port_is_ignored() -> None:
    assert endpoint_from_service(AsyncServiceInfo(LLM, f"x.{LLM}", port=8080, properties={}), LLM, TYPES) is None
    assert endpoint_from_service(resolved({}, port=0), LLM, TYPES) is None


def test_the_type_comes_from_txt_else_from_the_service_type() -> None:
    assert backend_type("ollama", LLM, TYPES) == "ollama"
    assert backend_type("vllm", LLM, TYPES) == "generic"  # not installed here
    assert backend_type("openai", LLM, TYPES) == "generic"  # a LAN service is never a cloud backend
    assert backend_type(None, "_ollama._tcp.local.", TYPES) == "ollama"  # declared by the adapter
    assert backend_type(None, "_OLLAMA._tcp.local.", TYPES) == "ollama"
    assert backend_type(None, LLM, TYPES) == "generic"


def test_the_instance_label_is_the_name_without_its_service_type() -> None:
    assert instance_label(f"Lab_Ollama.{LLM}", LLM) == "Lab Ollama"
    assert instance_label(f"ollama on gpu.box.{LLM}", LLM) == "ollama on gpu.box"
    assert instance_label("odd.name.local.", LLM) == "odd"
