"""Support for the discovery tests: real mDNS, bound to loopback only.

This machine's network is closed, so every Zeroconf here (the test's publisher and
browser, and every Nexus under test) uses ``interfaces=["127.0.0.1"]``: multicast on the
loopback interface reaches other sockets and processes on this machine, and nothing goes
out on the other interfaces. ``loopback_multicast_works()`` checks that once per session;
where it does not, the tests that need mDNS are skipped with the reason printed.

Each test browses a service type of its own (``unique_service_type()``), so parallel runs
on one machine never see each other's services.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from zeroconf import ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from nexus import config as config_mod
from nexus.api import GATEWAY
from nexus.app import NexusRunner, create_app
from nexus.gateway import Gateway
from nexus.plugins import create_host
from nexus.testing import serve_app

LOOPBACK = "127.0.0.1"
DEADLINE = 10.0


def unique_service_type() -> str:
    return f"_nx{secrets.token_hex(4)}._tcp.local."


async def eventually(condition: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition") -> Any:
    """Wait until ``condition()`` is truthy (checked every 20 ms) and return its value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return value


async def _loopback_round_trip() -> str | None:
    """``None`` when a service registered on 127.0.0.1 is seen by another Zeroconf there."""
    service_type = unique_service_type()
    seen = asyncio.Event()
    try:
        publisher, browser_zc = AsyncZeroconf(interfaces=[LOOPBACK]), AsyncZeroconf(interfaces=[LOOPBACK])
    except OSError as exc:
        return f"cannot bind mDNS to {LOOPBACK}: {exc}"

    def on_change(state_change: ServiceStateChange, **_: object) -> None:
        if state_change is ServiceStateChange.Added:
            seen.set()

    browser = AsyncServiceBrowser(browser_zc.zeroconf, [service_type], handlers=[on_change])
    info = service(service_type, "loopback check", 9, {})
    try:
        await (await publisher.async_register_service(info, cooperating_responders=True))
        await asyncio.wait_for(seen.wait(), 5)
        return None
    except TimeoutError:
        return f"an mDNS service registered on {LOOPBACK} was not seen by a browser on {LOOPBACK} within 5 s"
    finally:
        await browser.async_cancel()
        await publisher.async_close()
        await browser_zc.async_close()


_multicast_verdict: list[str | None] = []


@pytest.fixture
async def loopback_mdns() -> None:
    """Skip (with the reason printed) where multicast on loopback does not work."""
    if not _multicast_verdict:
        _multicast_verdict.append(await _loopback_round_trip())
    if _multicast_verdict[0] is not None:
        print(f"SKIPPED: {_multicast_verdict[0]}")
        pytest.skip(_multicast_verdict[0])


def service(service_type: str, instance: str, port: int, txt: dict[str, Any], addresses: list[str] | None = None,
            ) -> AsyncServiceInfo:
    return AsyncServiceInfo(service_type, f"{instance}.{service_type}", port=port, properties=txt,
                            server=f"{secrets.token_hex(4)}.local.", parsed_addresses=addresses or [LOOPBACK])


class Publisher:
    """The test's own mDNS responder on loopback (python-zeroconf, not Nexus code)."""

    def __init__(self) -> None:
        self.zeroconf = AsyncZeroconf(interfaces=[LOOPBACK])

    async def register(self, info: AsyncServiceInfo) -> None:
        await (await self.zeroconf.async_register_service(info, cooperating_responders=True))

    async def unregister(self, info: AsyncServiceInfo) -> None:
        await (await self.zeroconf.async_unregister_service(info))

    async def resolve(self, service_type: str, name: str) -> AsyncServiceInfo | None:
        info = AsyncServiceInfo(service_type, name)
        return info if await info.async_request(self.zeroconf.zeroconf, 3000) else None


@pytest.fixture
async def publisher(loopback_mdns: None) -> AsyncIterator[Publisher]:
    published = Publisher()
    yield published
    await published.zeroconf.async_close()


@dataclass
class DiscoveringNexus:
    url: str
    app: web.Application
    service_type: str

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]


DiscoveringFactory = Callable[..., Awaitable[DiscoveringNexus]]


@pytest.fixture
async def discovering_nexus() -> AsyncIterator[DiscoveringFactory]:
    """Nexus in-process with discovery and health checks on, mDNS on loopback browsing a
    service type of its own, and no localhost probe unless ``discovery`` asks for one."""
    runners: list[NexusRunner] = []

    async def make(discovery: dict[str, Any] | None = None, **raw: Any) -> DiscoveringNexus:
        service_type = unique_service_type()
        raw["discovery"] = {"interfaces": [LOOPBACK], "service_types": [service_type], "probe_localhost": False,
                            **(discovery or {})}
        raw.setdefault("health_check", {"interval_seconds": 3600})
        config = config_mod.build(raw, source="test")
        app = create_app(config, create_host(load_entry_points=False), health_check=True, discovery=True)
        url, runner = await serve_app(app, LOOPBACK)
        runners.append(runner)
        return DiscoveringNexus(url, app, service_type)

    yield make
    for runner in runners:
        await runner.cleanup()
