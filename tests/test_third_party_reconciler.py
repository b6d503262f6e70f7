"""A third-party routing stage, proven with a real pip install of the plugin the guide describes.

The package is built from the code blocks of docs/plugins.md ("A complete reconciler
plugin"), so the guide and this test cannot drift apart. It is installed with pip, loaded
by a real `nexus serve` through its entry point only, and uninstalled afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from nexus.testing import CHAT, BackendFactory, FakeBackend
from tests.plugins.support import (
    guide_package_installed,
    nexus_env,
    run_nexus_async,
    serve_nexus,
    wait_for_health,
)

SECTION = "## A complete reconciler plugin"
STAGE = "prefix_exclusion"


@pytest.fixture(scope="module")
def prefix_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with guide_package_installed(tmp_path_factory.mktemp("guide"), SECTION, "nexus-reconciler-prefix", "nexus_reconciler_prefix") as package:
        yield package


def write_config(path: Path, backends: list[tuple[FakeBackend, int]], plugin_table: str) -> Path:
    entries = [f'[[backends]]\nname = "{b.name}"\nurl = "{b.url}"\ntype = "generic"\npriority = {priority}\n'
               for b, priority in backends]
    path.write_text("\n".join(entries) + "\n" + plugin_table, encoding="utf-8")
    return path


async def chat(http: aiohttp.ClientSession, url: str, model: str = "test-model") -> aiohttp.ClientResponse:
    async with http.post(f"{url}/v1/chat/completions", json={**CHAT, "model": model}) as resp:
        await resp.read()
        return resp


async def test_installed_reconciler_is_listed(prefix_installed: Path, tmp_path: Path) -> None:
    listing = await run_nexus_async("plugins", "--json", cwd=tmp_path, env=nexus_env())
    prefix = next(p for p in json.loads(listing.stdout) if p["name"] == "prefix")
    assert (prefix["version"], prefix["source"], prefix["errors"]) == ("0.1.0", "nexus-reconciler-prefix", [])
    assert prefix["hooks"] == ["register_reconcilers"]


async def test_routing_obeys_the_installed_reconciler(prefix_installed: Path, fake_backend: BackendFactory,
                                                      tmp_path: Path) -> None:
    canary = await fake_backend(name="canary-1")  # the better priority: chosen unless excluded
    stable = await fake_backend(name="stable-1")
    canary_only = await fake_backend(name="canary-2", models=["canary-model"])
    backends = [(canary, 1), (stable, 90), (canary_only, 1)]

    # Control: without the setting the stage does nothing, and canary-1 wins on priority.
    config = write_config(tmp_path / "plain.toml", backends, "")
    async with serve_nexus("-c", str(config), cwd=tmp_path) as served, aiohttp.ClientSession() as http:
        await wait_for_health(served.url, healthy_backends=3)
        resp = await chat(http, served.url)
        assert (resp.status, resp.headers["X-Nexus-Backend"]) == (200, "canary-1")
    canary.received.clear()

    config = write_config(tmp_path / "nexus.toml", backends, '[plugins.prefix]\nexclude_prefix = "canary-"\n')
    async with serve_nexus("-c", str(config), cwd=tmp_path) as served, aiohttp.ClientSession() as http:
        await wait_for_health(served.url, healthy_backends=3)
        for _ in range(5):
            resp = await chat(http, served.url)
            assert (resp.status, resp.headers["X-Nexus-Backend"]) == (200, "stable-1")
        assert canary.chats == [] and len(stable.chats) == 5

        # Only canary backends serve this model: refused at once, and the refusal says why.
        async with http.post(f"{served.url}/v1/chat/completions", json={**CHAT, "model": "canary-model"}) as resp:
            body = await resp.json()
            assert resp.status == 503, body
            assert STAGE in resp.headers["X-Nexus-Rejection-Reasons"]
            details = json.loads(resp.headers["X-Nexus-Rejection-Details"])
        assert canary_only.chats == []
        assert details == [{
            "backend": "canary-2",
            "reconciler": STAGE,
            "reason": "Backend name starts with 'canary-' ([plugins.prefix] exclude_prefix)",
            "suggested_action": "Use a backend whose name does not start with 'canary-', or change [plugins.prefix]",
        }]
    assert not any("plugin prefix" in line for line in served.stderr), served.stderr


@pytest.mark.parametrize(("table", "message"), [
    ("exclude_prefix = 5", "[plugins.prefix] exclude_prefix = 5 is invalid: expected a non-empty string"),
    ('exclude_prefix = ""', "[plugins.prefix] exclude_prefix = '' is invalid"),
    ('exclude_prefx = "canary-"', "[plugins.prefix] has unknown keys ['exclude_prefx']"),
])
async def test_a_bad_setting_is_reported_and_the_stage_skipped(prefix_installed: Path, fake_backend: BackendFactory,
                                                               tmp_path: Path, table: str, message: str) -> None:
    canary = await fake_backend(name="canary-1")
    stable = await fake_backend(name="stable-1")
    config = write_config(tmp_path / "nexus.toml", [(canary, 1), (stable, 90)], f"[plugins.prefix]\n{table}\n")
    async with serve_nexus("-c", str(config), cwd=tmp_path) as served, aiohttp.ClientSession() as http:
        await wait_for_health(served.url, healthy_backends=2)
        reports = [line for line in served.stderr if "plugin prefix:" in line]
        assert len(reports) == 1, served.stderr
        assert "ERROR" in reports[0] and "PrefixExclusion" in reports[0] and message in reports[0]
        # A broken plugin never stops the server; without the stage, priority decides again.
        resp = await chat(http, served.url)
        assert (resp.status, resp.headers["X-Nexus-Backend"]) == (200, "canary-1")


async def test_config_check_refuses_a_bad_plugin_setting(prefix_installed: Path, tmp_path: Path) -> None:
    """`serve` runs without the refused stage; `config check` says so before you start it."""
    config = tmp_path / "nexus.toml"
    config.write_text("[plugins.prefix]\nexclude_prefix = 5\n", encoding="utf-8")
    result = await run_nexus_async("config", "check", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: [plugins.prefix]: ") and "exclude_prefix = 5 is invalid" in line
    config.write_text('[plugins.prefix]\nexclude_prefix = "canary-"\n', encoding="utf-8")
    assert (await run_nexus_async("config", "check", "-c", str(config), cwd=tmp_path)).returncode == 0
