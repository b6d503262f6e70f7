"""Local port probing: a backend on a probed port appears, is served like a static one,
and is lost when it stops; `nexus serve` routes to it with no backend configured."""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from nexus import GenericAdapter, config as config_mod
from nexus.discovery_probe import PortProbe
from nexus.registry import Status
from nexus.testing import CHAT, BackendFactory, FakeBackend, free_port
from nexus.testing.ollama import FakeOllama, OllamaModel
from tests.discovery_support import DiscoveringFactory, discovering_nexus, eventually, unique_service_type
from tests.plugins.support import nexus_env, serve_nexus, wait_for_health

__all__ = ["discovering_nexus"]  # fixture used here


async def test_a_backend_started_later_appears_is_served_and_is_lost_when_it_stops(
        discovering_nexus: DiscoveringFactory, http: aiohttp.ClientSession) -> None:
    port = free_port()
    gw = await discovering_nexus({"probe_localhost": True, "probe_ports": [port], "probe_interval_seconds": 0.1,
                                  "grace_period_seconds": 0.3})
    registry, backend_id = gw.gateway.registry, f"local-generic-{port}"
    backend = await FakeBackend(models=["probed-model"]).start(port=port)
    try:
        found = await eventually(lambda: registry.get(backend_id), what="the probe to find the backend")
        await eventually(lambda: found.status is Status.HEALTHY, what="its first health check")
        assert (found.source, found.url, found.type_name) == ("probe", f"http://127.0.0.1:{port}", "generic")
        async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "probed-model"}) as resp:
            assert resp.status == 200 and resp.headers["X-Nexus-Backend"] == backend_id
    finally:
        await backend.stop()
    await eventually(lambda: found.status is Status.UNKNOWN, what="the stopped backend to be lost")
    await eventually(lambda: registry.get(backend_id) is None, what="removal after the grace period")


async def test_static_config_wins_over_a_probed_duplicate(
        discovering_nexus: DiscoveringFactory, fake_backend: BackendFactory, caplog: pytest.LogCaptureFixture) -> None:
    backend = await fake_backend()
    caplog.set_level(logging.DEBUG, logger="nexus.discovery")
    static = {"name": "mine", "url": f"http://localhost:{backend.port}/v1", "type": "generic"}
    gw = await discovering_nexus({"probe_localhost": True, "probe_ports": [backend.port]}, backends=[static])
    await eventually(lambda: any(r.getMessage().startswith("Ignoring local generic") for r in caplog.records),
                     what="the probe to find the configured backend and leave it alone")
    assert [b.id for b in gw.gateway.registry.all()] == ["mine"]


def test_the_probe_skips_the_gateways_own_port_and_cloud_types() -> None:
    class Vllm(GenericAdapter):
        type_name, default_port = "vllm", 8000

    class Ollama(GenericAdapter):
        type_name, default_port = "ollama", 11434

    class Cloud(GenericAdapter):
        type_name, default_port, cloud = "openai", 443, True

    types = {"generic": GenericAdapter, "vllm": Vllm, "ollama": Ollama, "openai": Cloud}
    config = config_mod.build({"discovery": {"probe_hosts": ["10.0.0.5"]}})
    assert PortProbe(config, {}).targets(types) == [
        ("127.0.0.1", 11434), ("10.0.0.5", 8000), ("10.0.0.5", 11434)]
    elsewhere = config_mod.build({"server": {"port": 9000}, "discovery": {"probe_localhost": False}})
    assert PortProbe(elsewhere, {}).targets(types) == []
    overridden = config_mod.build({"discovery": {"probe_ports": [8000, 1234]}})
    assert PortProbe(overridden, {}).targets(types) == [("127.0.0.1", 1234)]


async def test_nexus_serve_with_no_backend_configured_routes_to_a_probed_ollama(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    ollama = await FakeOllama(catalog=[OllamaModel("probed:3b")]).start()
    config = tmp_path / "nexus.toml"
    config.write_text(f'[discovery]\nprobe_ports = [{ollama.port}]\ninterfaces = ["127.0.0.1"]\n'
                      f'service_types = ["{unique_service_type()}"]\n')
    try:
        async with serve_nexus("-c", str(config), cwd=tmp_path, discovery=True) as gateway:
            await wait_for_health(gateway.url, 1)
            async with http.post(f"{gateway.url}/v1/chat/completions", json={**CHAT, "model": "probed:3b"}) as resp:
                assert resp.status == 200
                assert resp.headers["X-Nexus-Backend"] == f"local-ollama-{ollama.port}"
            async with http.get(f"{gateway.url}/v1/backends") as resp:
                (entry,) = (await resp.json())["backends"]
            assert (entry["source"], entry["type"]) == ("probe", "ollama")
    finally:
        await ollama.stop()


@pytest.fixture
def network_namespace() -> Iterator[str]:
    """A network namespace of the test's own with only loopback, removed afterwards; the
    test is skipped (reason printed) where namespaces cannot be made."""
    ip = shutil.which("ip")
    name = f"nexus-test-{secrets.token_hex(3)}"
    made = subprocess.run([ip, "netns", "add", name], capture_output=True, text=True, check=False) if ip else None
    if made is None or made.returncode != 0:
        reason = ("iproute2's `ip` is not installed" if made is None else
                  f"`ip netns add` failed: {made.stderr.strip()} (needs root or CAP_SYS_ADMIN)")
        print(f"SKIPPED: cannot make a network namespace: {reason}")
        pytest.skip(f"cannot make a network namespace: {reason}")
    try:
        subprocess.run([ip, "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run([ip, "netns", "delete", name], check=False)


def test_nexus_serve_with_no_config_file_routes_to_ollama_on_its_well_known_port(
        network_namespace: str, tmp_path: Path) -> None:
    """The zero-config promise, literally: in a namespace of its own (so 11434 and 8000
    are free, and nothing leaves it), `nexus serve` with no config file and a fake
    Ollama on 11434."""
    driver = Path(__file__).with_name("netns_zero_config.py")
    done = subprocess.run(["ip", "netns", "exec", network_namespace, sys.executable, str(driver)], cwd=tmp_path,
                          env=nexus_env(), capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert (result["status"], result["backend"]) == (200, "local-ollama"), result["stderr"]
    assert result["backends"] == [["local-ollama", "ollama", "probe"]]
