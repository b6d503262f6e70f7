"""Pytest fixtures for Nexus and its plugins: fake backends and an in-process Nexus.

Registered as a pytest plugin (entry point ``pytest11``), so the core's tests, each
backend plugin's tests and third-party plugins' tests all use the same fixtures:
``fake_backend``, ``nexus`` and ``http``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from nexus import config as config_mod
from nexus.api import GATEWAY
from nexus.app import NexusRunner, create_app
from nexus.gateway import Gateway
from nexus.plugins import create_host
from nexus.testing.fakes import FakeBackend


@dataclass
class RunningNexus:
    url: str
    app: web.Application
    runner: NexusRunner

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    async def check_health(self) -> None:
        await self.gateway.health.check_all()


BackendFactory = Callable[..., Awaitable[FakeBackend]]


async def serve_app(app: web.Application, host: str = "127.0.0.1") -> tuple[str, NexusRunner]:
    """Run ``app`` as ``nexus serve`` does, on a random port of ``host``; returns its URL."""
    runner = NexusRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return f"http://{host}:{port}", runner


def installed_plugin(name: str) -> dict[str, Any]:
    """What ``nexus plugins --json`` (run as a fresh process, no NEXUS_* variables) says of ``name``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    done = subprocess.run([sys.executable, "-m", "nexus", "plugins", "--json"], env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    listing: dict[str, dict[str, Any]] = {p["name"]: p for p in json.loads(done.stdout)}
    return listing[name]
NexusFactory = Callable[..., Awaitable[RunningNexus]]


@pytest.fixture
async def fake_backend() -> AsyncIterator[BackendFactory]:
    started: list[FakeBackend] = []

    async def make(kind: type[FakeBackend] = FakeBackend, /, **kwargs: Any) -> FakeBackend:
        """Start a fake (``kind``: FakeBackend or one of the native-API fakes); stopped after the test."""
        backend = await kind(**kwargs).start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        await backend.stop()


def backend_entry(backend: FakeBackend, **extra: Any) -> dict[str, Any]:
    return {"name": backend.name, "url": backend.url, "type": "generic", **extra}


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test (nor a ``nexus serve`` it starts) reads or writes the user's own state file."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))


@pytest.fixture
async def nexus() -> AsyncIterator[NexusFactory]:
    """Start Nexus in-process. Health is checked once before returning (no loop runs),
    so backends are settled deterministically; call ``check_health()`` for more cycles."""
    runners: list[NexusRunner] = []

    async def make(raw: dict[str, Any] | None = None, *, extra_plugins: list[tuple[str, object]] | None = None,
                   check: bool = True) -> RunningNexus:
        raw = dict(raw or {})
        raw.setdefault("health_check", {}).setdefault("failure_threshold", 1)
        raw.setdefault("state", {"backend": "memory"})  # tests that check persistence say where
        config = config_mod.build(raw, source="test")
        host = create_host(load_entry_points=False, extra=extra_plugins)
        app = create_app(config, host, health_check=False, discovery=False)
        url, runner = await serve_app(app)
        runners.append(runner)
        running = RunningNexus(url, app, runner)
        if check:
            await running.check_health()
        return running

    yield make
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a throw-away ``redis-server`` (one per session: give each test its own key prefix).
    Skipped when redis-server is not installed, except under CI, where that is a failure."""
    from nexus.testing.redis import RedisUnavailable, start_redis_server

    try:
        server = start_redis_server()
    except RedisUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc}; CI must install it (see the README's test command)", pytrace=False)
        pytest.skip(str(exc))
    try:
        yield server.url
    finally:
        server.stop()
