"""`nexus advertise` makes a fake Ollama visible to a second gateway over real mDNS on
loopback, keeps the record current, and withdraws it on exit."""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from zeroconf import ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser

from nexus import __version__
from nexus.testing import free_port
from nexus.testing.ollama import FakeOllama, OllamaModel
from tests.discovery_support import DEADLINE, Publisher, eventually, loopback_mdns, publisher, unique_service_type
from tests.plugins.support import nexus_env, run_nexus_async, serve_nexus

__all__ = ["loopback_mdns", "publisher"]  # fixtures used here


@asynccontextmanager
async def advertising(*args: str, cwd: Path) -> AsyncIterator[list[str]]:
    """Run ``nexus advertise ARGS`` until it says it advertises; SIGTERM it on exit and
    check that it withdrew the record and exited with status 0."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nexus", "advertise", *args, cwd=cwd, env=nexus_env(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    lines: list[str] = []

    async def collect() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            lines.append(line.decode().rstrip("\n"))

    reader = asyncio.ensure_future(collect())
    try:
        await eventually(lambda: any(line.startswith("Advertising ") for line in lines) or proc.returncode is not None,
                         what="nexus advertise to start")
        assert proc.returncode is None, lines
        yield lines
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), DEADLINE) == 0, lines
        await reader
    assert lines[-1].startswith("Withdrawn: "), lines


async def backends(http: aiohttp.ClientSession, url: str) -> dict[str, dict[str, Any]]:
    async with http.get(f"{url}/v1/backends") as resp:
        return {b["id"]: b for b in (await resp.json())["backends"]}


async def models(http: aiohttp.ClientSession, url: str) -> set[str]:
    async with http.get(f"{url}/v1/models") as resp:
        return {m["id"] for m in (await resp.json())["data"]}


async def poll(check: Any, what: str) -> Any:
    """Poll a running gateway (another process) until ``await check()`` is truthy."""
    async with asyncio.timeout(DEADLINE):
        while not (value := await check()):
            await asyncio.sleep(0.05)
    return value


def txt(info: Any) -> dict[str, str | None]:
    return dict(info.decoded_properties)


async def test_advertised_ollama_is_discovered_kept_current_and_withdrawn(
        tmp_path: Path, publisher: Publisher, http: aiohttp.ClientSession) -> None:
    token = secrets.token_hex(3)
    model = f"advertised-{token}:1b"
    ollama = await FakeOllama(catalog=[OllamaModel(model)]).start()
    config = tmp_path / "nexus.toml"
    config.write_text('[discovery]\ninterfaces = ["127.0.0.1"]\ngrace_period_seconds = 1\nprobe_localhost = false\n')
    name, backend_id = f"Lab Ollama {token}", f"lab-ollama-{token}"
    try:
        async with serve_nexus("-c", str(config), cwd=tmp_path, discovery=True) as gateway:
            async with advertising("--url", ollama.url, "--name", name, "--zone", "open", "--interface", "127.0.0.1",
                                   "--interval", "0.2", cwd=tmp_path):
                async def listed() -> bool:
                    return model in await models(http, gateway.url)

                await poll(listed, "the advertised model in the second gateway's /v1/models")
                entry = (await backends(http, gateway.url))[backend_id]
                assert (entry["source"], entry["type"], entry["zone"], entry["url"]) == (
                    "mdns", "ollama", "open", ollama.url)

                # The record, as any mDNS client reads it (type detected: no --type was given).
                record = await publisher.resolve("_ollama._tcp.local.", f"{name}._ollama._tcp.local.")
                assert record is not None and record.port == ollama.port
                assert txt(record) == {"type": "ollama", "api_path": "/v1", "version": "0.12.6", "zone": "open",
                                       "models": model}
                ollama.catalog.append(OllamaModel(f"pulled-{token}"))

                async def updated() -> bool:
                    current = await publisher.resolve("_ollama._tcp.local.", f"{name}._ollama._tcp.local.")
                    return current is not None and txt(current)["models"] == f"{model},pulled-{token}"

                await poll(updated, "the record to list the new model")

            async def gone() -> bool:
                entries = await backends(http, gateway.url)
                return backend_id not in entries

            assert model not in await models(http, gateway.url)  # unknown at once: not served
            await poll(gone, "removal after the grace period")

            async def removal_logged() -> bool:  # the log line travels through a pipe: it may trail the API
                return any("Removed" in line and backend_id in line for line in gateway.stderr)

            await poll(removal_logged, "the removal's log line")
            logged = [line.split() for line in gateway.stderr if " nexus.discovery " in line and backend_id in line]
            assert [(words[1], words[3]) for words in logged] == [  # one line each: found, gone, removed
                ("INFO", "Discovered"), ("WARNING", "Backend"), ("INFO", "Removed")], gateway.stderr
    finally:
        await ollama.stop()


async def test_advertise_withdraws_the_record_while_the_backend_is_down(tmp_path: Path, publisher: Publisher) -> None:
    name = f"Flaky {secrets.token_hex(3)}"
    full_name = f"{name}._ollama._tcp.local."
    events: list[ServiceStateChange] = []

    def on_change(state_change: ServiceStateChange, name: str, **_: object) -> None:
        if name == full_name:
            events.append(state_change)

    browser = AsyncServiceBrowser(publisher.zeroconf.zeroconf, ["_ollama._tcp.local."], handlers=[on_change])
    ollama = await FakeOllama().start()
    try:
        async with advertising("--url", ollama.url, "--type", "ollama", "--name", name, "--interface", "127.0.0.1",
                               "--interval", "0.1", cwd=tmp_path) as lines:
            await eventually(lambda: ServiceStateChange.Added in events, what="the record")
            await ollama.stop()
            await eventually(lambda: ServiceStateChange.Removed in events, what="the record to be withdrawn")
            ollama = await FakeOllama().start(port=ollama.port)
            await eventually(lambda: events.count(ServiceStateChange.Added) == 2, what="the record to come back")
        assert "The backend does not answer; record withdrawn until it does" in lines
        assert "The backend answers again; record published (1 model)" in lines
    finally:
        await browser.async_cancel()
        await ollama.stop()


async def test_serve_announces_itself_when_asked_and_withdraws_on_exit(
        tmp_path: Path, publisher: Publisher) -> None:
    config = tmp_path / "nexus.toml"
    config.write_text(f'[discovery]\nannounce = true\ninterfaces = ["127.0.0.1"]\nprobe_localhost = false\n'
                      f'service_types = ["{unique_service_type()}"]\n')
    events: list[tuple[ServiceStateChange, str]] = []

    def on_change(state_change: ServiceStateChange, name: str, **_: object) -> None:
        events.append((state_change, name))

    browser = AsyncServiceBrowser(publisher.zeroconf.zeroconf, ["_nexus._tcp.local."], handlers=[on_change])
    try:
        async with serve_nexus("-c", str(config), cwd=tmp_path, discovery=True) as gateway:
            port = int(gateway.url.rsplit(":", 1)[1])

            async def ours() -> str | None:
                for state, name in list(events):
                    record = await publisher.resolve("_nexus._tcp.local.", name)
                    if state is ServiceStateChange.Added and record is not None and record.port == port:
                        assert txt(record) == {"api_path": "/v1", "version": __version__}
                        assert record.parsed_addresses() == ["127.0.0.1"]
                        return name
                return None

            name = await poll(ours, "the gateway's _nexus._tcp announcement")
        await eventually(lambda: (ServiceStateChange.Removed, name) in events, what="the goodbye at shutdown")
    finally:
        await browser.async_cancel()


async def test_advertise_errors_are_one_line(tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    cases = [
        (["--url", nobody], f"Error: no backend of an installed type answers at {nobody}"),
        (["--url", nobody, "--type", "ollama"], f"Error: the ollama backend at {nobody} does not answer its probe"),
        (["--url", "localhost:11434"], "Error: --url 'localhost:11434' is invalid: expected an http:// or https:// "
                                       "URL such as http://127.0.0.1:11434"),
        (["--url", nobody, "--interface", "lo"], "Error: --interface 'lo' is invalid: expected an interface "
                                                  "address such as 127.0.0.1"),
    ]
    results = await asyncio.gather(*(run_nexus_async("advertise", *args, cwd=tmp_path) for args, _ in cases))
    for (_, message), result in zip(cases, results, strict=True):
        assert (result.returncode, result.stderr_lines) == (1, [message])
