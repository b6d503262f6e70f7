"""The extension point, proven with a real pip install of the plugin the guide describes.

The package is built from the code blocks of docs/plugins.md ("A complete third-party
plugin"), so the guide and this test cannot drift apart. It is installed into the test
environment with pip, used by a real `nexus serve`, and uninstalled afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from nexus.testing import CHAT, BackendFactory
from tests.plugins.support import (
    guide_package_installed,
    nexus_env,
    pip,
    run_nexus_async,
    serve_nexus,
    wait_for_health,
)


@pytest.fixture(scope="module")
def acme_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with guide_package_installed(tmp_path_factory.mktemp("guide"), '## A complete third-party plugin', "nexus-plugin-acme", "nexus_plugin_acme") as package:
        yield package


async def test_pip_installed_plugin_is_listed_and_serves(acme_installed: Path, fake_backend: BackendFactory,
                                                         tmp_path: Path) -> None:
    listing = await run_nexus_async("plugins", "--json", cwd=tmp_path, env=nexus_env())
    acme = next(p for p in json.loads(listing.stdout) if p["name"] == "acme")
    assert (acme["version"], acme["source"], acme["errors"]) == ("0.1.0", "nexus-plugin-acme", [])
    assert acme["hooks"] == ["register_backend_types", "register_reconcilers"]

    backend = await fake_backend(name="acme-1")
    config = tmp_path / "nexus.toml"
    config.write_text(f'[[backends]]\nname = "acme-1"\nurl = "{backend.url}"\ntype = "acme"\n\n'
                      '[plugins.acme]\ntenant = "research"\nmaintenance = []\n', encoding="utf-8")
    async with serve_nexus("-c", str(config), cwd=tmp_path) as served:
        await wait_for_health(served.url, healthy_backends=1)
        async with aiohttp.ClientSession() as http, http.post(f"{served.url}/v1/chat/completions",
                                                              json=CHAT) as resp:
            assert resp.status == 200
            assert resp.headers["X-Nexus-Backend"] == "acme-1"
    assert backend.chats[0].headers["X-Acme-Tenant"] == "research"


async def test_uninstalled_plugin_makes_its_config_fail_clearly(acme_installed: Path, tmp_path: Path) -> None:
    config = tmp_path / "nexus.toml"
    config.write_text('[[backends]]\nname = "acme-1"\nurl = "http://127.0.0.1:7000"\ntype = "acme"\n',
                      encoding="utf-8")
    assert (await run_nexus_async("config", "check", "-c", str(config), cwd=tmp_path)).returncode == 0
    pip("uninstall", "-y", "nexus-plugin-acme")
    try:
        result = await run_nexus_async("config", "check", "-c", str(config), cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert "nexus-plugin-acme" in result.stderr and "acme" in result.stderr
    finally:
        pip("install", "--no-deps", "--no-build-isolation", str(acme_installed))
