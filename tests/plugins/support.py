"""Run the real ``nexus`` console script, and install fake distributions of test plugins.

Client commands run with ``asyncio.create_subprocess_exec`` when the test's event loop
must keep serving an in-process fake backend meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from nexus.testing import free_port

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 20.0


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()


def nexus_env(pythonpath: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment without any NEXUS_* variable (and with ``pythonpath`` first, plus the repo)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_") and k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), str(REPO)])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_nexus(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Result:
    done = subprocess.run([sys.executable, "-m", "nexus", *args], cwd=cwd, env=env or nexus_env(),
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)
    return Result(done.returncode, done.stdout, done.stderr)


async def run_nexus_async(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Result:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nexus", *args, cwd=cwd, env=env or nexus_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def fake_distribution(site: Path, dist: str, version: str, entry_points: dict[str, str]) -> None:
    """Write ``<dist>-<version>.dist-info`` with METADATA and a ``[nexus.plugins]`` entry_points.txt."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
    lines = ["[nexus.plugins]", *(f"{name} = {target}" for name, target in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass
class ServedNexus:
    """A ``nexus serve`` subprocess; ``stderr`` collects its lines while it runs."""

    proc: asyncio.subprocess.Process
    url: str
    stderr: list[str] = field(default_factory=list)


async def _collect(stream: asyncio.StreamReader, lines: list[str], listening: asyncio.Event) -> None:
    while line := await stream.readline():
        lines.append(line.decode().rstrip("\n"))
        if " listening on " in lines[-1]:
            listening.set()
    listening.set()  # EOF: the process ended; the caller checks why


async def _healthy(url: str) -> bool:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/health") as resp:
        return resp.status == 200


async def wait_for_health(url: str, healthy_backends: int) -> dict[str, object]:
    """Poll ``/health`` until that many backends are healthy (the first health check is async)."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(TIMEOUT):
        while True:
            async with http.get(f"{url}/health") as resp:
                data: dict[str, object] = await resp.json()
            if data["backends"]["healthy"] == healthy_backends:  # type: ignore[index]
                return data
            await asyncio.sleep(0.02)


@asynccontextmanager
async def serve_nexus(*args: str, cwd: Path, env: dict[str, str] | None = None,
                      discovery: bool = False) -> AsyncIterator[ServedNexus]:
    """Start ``nexus serve --port <free> --no-discovery ARGS`` (without ``--no-discovery``
    if ``discovery``); ready once it says it listens and ``/health`` answers. Stopped with
    SIGTERM (and killed if it does not exit)."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nexus", "serve", "--port", str(port), *([] if discovery else ["--no-discovery"]), *args,
        cwd=cwd, env=env or nexus_env(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    served = ServedNexus(proc, f"http://127.0.0.1:{port}")
    listening = asyncio.Event()
    reader = asyncio.ensure_future(_collect(proc.stderr, served.stderr, listening))
    try:
        await asyncio.wait_for(listening.wait(), TIMEOUT)
        assert any(" listening on " in line for line in served.stderr), served.stderr
        assert await _healthy(served.url), served.stderr
        yield served
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), TIMEOUT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await reader


def guide_block(section: str, after: str, language: str) -> str:
    """The first ``language`` code block after the line ``after`` in ``section`` of docs/plugins.md."""
    text = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    part = text[text.index(section):]
    match = re.compile(rf"```{language}\n(.*?)```", re.DOTALL).search(part, part.index(after))
    assert match is not None, f"no {language} block after {after!r} in docs/plugins.md"
    return match.group(1)


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                   check=True, capture_output=True, timeout=300)


@contextmanager
def guide_package_installed(base: Path, section: str, distribution: str, module: str) -> Iterator[Path]:
    """Build the package shown in ``section`` of docs/plugins.md, pip-install it, uninstall it after."""
    package = base / distribution
    (package / module).mkdir(parents=True)
    (package / "pyproject.toml").write_text(guide_block(section, "`pyproject.toml`", "toml"), encoding="utf-8")
    (package / module / "__init__.py").write_text(
        guide_block(section, f"`{module}/__init__.py`:", "python"), encoding="utf-8")
    pip("install", "--no-deps", "--no-build-isolation", str(package))
    try:
        yield package
    finally:
        pip("uninstall", "-y", distribution)
