"""Plugins: real entry points of fake installed distributions, broken plugins, and what
third-party hooks change in a running Nexus (CONTRACT §2).

The plugins themselves live in ``tests/plugins/``. A fake distribution is a
``<dist>-<version>.dist-info`` directory (METADATA + entry_points.txt with a
``[nexus.plugins]`` group) on ``PYTHONPATH``: exactly what ``pip install`` leaves behind.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import click
import pytest
from aiohttp import web

from nexus import config as config_mod
from nexus.api import GATEWAY, ROUTES
from nexus.discovery_mdns import MdnsDiscovery
from nexus.discovery_probe import PortProbe
from nexus.app import create_app
from nexus.gateway import Gateway
from nexus.plugins import PluginHost, create_host
from nexus.registry import Registry
from nexus.routing.intent import ReconcilerContext
from nexus.testing import CHAT, BackendFactory, NexusFactory, backend_entry
from tests.plugins import clashing_route, good, misbehaving, raising, typo, wrong_args
from tests.plugins.support import fake_distribution, nexus_env, run_nexus, run_nexus_async, serve_nexus

DISTS = {
    "good": ("nexus-plugin-goodtest", "0.1.0", "tests.plugins.good"),
    "broken": ("nexus-plugin-brokentest", "0.2.0", "tests.plugins.broken_import"),
    "typo": ("nexus-plugin-typotest", "0.3.0", "tests.plugins.typo"),
}
BROKEN_IMPORT = ("failed to load tests.plugins.broken_import from nexus-plugin-brokentest 0.2.0: "
                 "RuntimeError: broken on purpose at import")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the three fake distributions (put on PYTHONPATH)."""
    root = tmp_path_factory.mktemp("site")
    for entry_point, (dist, version, module) in DISTS.items():
        fake_distribution(root, dist, version, {entry_point: module})
    return root


@pytest.fixture(scope="module")
def listing(site: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """``nexus plugins --json`` with the fake distributions installed, by plugin name."""
    result = run_nexus("plugins", "--json", cwd=tmp_path_factory.mktemp("cwd"), env=nexus_env(site))
    assert result.returncode == 0, result
    return {p["name"]: p for p in json.loads(result.stdout)}


def host_with(*plugins: tuple[str, object]) -> PluginHost:
    return create_host(load_entry_points=False, extra=list(plugins))


# -- through real entry points of fake installed distributions ----------------------------


def test_entry_point_plugin_is_listed_with_its_version_and_hooks(listing: dict[str, dict[str, Any]]) -> None:
    assert listing["good"] == {
        "name": "good",
        "version": "0.1.0",
        "source": "nexus-plugin-goodtest",
        "hooks": ["register_backend_types", "register_commands", "register_reconcilers", "register_routes"],
        "errors": [],
    }
    assert listing["builtin"]["errors"] == []


def test_plugin_whose_import_raises_is_listed_with_its_error(listing: dict[str, dict[str, Any]]) -> None:
    broken = listing["broken"]
    assert (broken["version"], broken["source"], broken["hooks"]) == ("0.2.0", "nexus-plugin-brokentest", [])
    assert broken["errors"] == [BROKEN_IMPORT]


def test_misspelt_hook_is_reported_and_the_plugin_dropped(listing: dict[str, dict[str, Any]]) -> None:
    entry = listing["typo"]
    assert entry["hooks"] == []  # dropped: none of its hooks run
    (error,) = entry["errors"]
    assert error.startswith("implements an unknown hook: unknown hook 'register_backend_typos'"), error
    assert error.endswith("did you mean 'register_backend_types'?")


async def test_table_output_and_commands_with_broken_plugins_installed(site: Path, tmp_path: Path) -> None:
    env = nexus_env(site)
    (tmp_path / "nexus.toml").write_text(
        '[[backends]]\nname = "b"\nurl = "http://127.0.0.1:1"\ntype = "broken"\n', encoding="utf-8")
    table, hello, help_, check = await asyncio.gather(
        run_nexus_async("plugins", cwd=tmp_path, env=env),
        run_nexus_async("hello", "--name", "tester", cwd=tmp_path, env=env),
        run_nexus_async("--help", cwd=tmp_path, env=env),
        run_nexus_async("config", "check", cwd=tmp_path, env=env),
    )
    # `nexus plugins` still works, says what is broken, and logs nothing of its own.
    assert table.returncode == 0 and table.stderr == "", table
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:]}
    assert rows["good"].endswith(" ok") and "nexus-plugin-goodtest" in rows["good"]
    assert rows["broken"].endswith(BROKEN_IMPORT)
    # A plugin's register_commands adds a command to the real `nexus` group.
    assert hello.returncode == 0 and hello.stdout == "hello, tester, from the good plugin\n", hello
    assert "hello" in help_.stdout.split("Commands:")[1].split()
    # A configured type whose plugin is installed but broken says so (not "install it").
    assert check.returncode == 1 and check.stderr_lines == [
        f"Error: backends[0].type = 'broken': plugin broken (nexus-plugin-brokentest 0.2.0) "
        f"is installed but broken: {BROKEN_IMPORT}"
    ], check


async def test_serve_starts_despite_broken_plugins_and_logs_them(site: Path, tmp_path: Path,
                                                                 fake_backend: BackendFactory) -> None:
    backend = await fake_backend(name="echo")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[[backends]]\nname = "echo"\nurl = "{backend.url}"\ntype = "echo-test"\n'
                   'models = ["test-model"]\n', encoding="utf-8")
    async with serve_nexus("-c", str(cfg), "--no-health-check", cwd=tmp_path, env=nexus_env(site)) as served:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{served.url}/good/hello") as resp:  # a route from an entry-point plugin
                assert resp.status == 200
                assert await resp.json() == {"hello": "from the good plugin"}
            async with http.post(f"{served.url}/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200
                assert resp.headers["X-Nexus-Backend"] == "echo"  # served through the plugin's backend type
    errors = [line for line in served.stderr if " ERROR " in line]
    assert len(errors) == 2, served.stderr
    assert errors[0].endswith(f"nexus.plugins plugin broken: {BROKEN_IMPORT}")
    assert "plugin typo: implements an unknown hook" in errors[1]


def test_in_process_entry_points_same_name_and_no_hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_distribution(tmp_path, "nexus-plugin-impostor", "6.6.6", {"good": "tests.plugins.typo"})
    fake_distribution(tmp_path, "nexus-plugin-classtest", "0.4.0", {"classy": "tests.plugins.good:EchoAdapter"})
    monkeypatch.syspath_prepend(str(tmp_path))
    host = create_host(extra=[("good", good)])
    # The first plugin of a name stays; the second is skipped and said so, never a silent swap.
    assert host.plugins["good"].source == "in-process" and good in host.pm.get_plugins()
    assert host.plugins["good"].errors == [
        "nexus-plugin-impostor 6.6.6 also provides a plugin named 'good'; that one was skipped"]
    assert typo not in host.pm.get_plugins()
    # An entry point naming a class instead of the hook module registers nothing: reported.
    classy = host.plugins["classy"]
    assert (classy.version, classy.source, classy.hooks) == ("0.4.0", "nexus-plugin-classtest", [])
    assert classy.errors == ["implements no nexus hooks (does the entry point name the module "
                             "that holds the @hookimpl functions?)"]


# -- in-process: misspelt hooks, raising hooks, bad return values --------------------------


def test_misspelt_hook_drops_only_that_plugin() -> None:
    host = host_with(("typo", typo), ("good", good))
    assert host.plugins["typo"].hooks == []
    assert "did you mean 'register_backend_types'?" in host.plugins["typo"].errors[0]
    assert typo not in host.pm.get_plugins()
    assert sorted(host.backend_types()) == ["echo-test", "generic"]
    assert [route.path for route in host.routes()] == ["/good/hello"]  # not the typo plugin's route
    assert host.plugins["good"].errors == []


def test_raising_hook_implementations_are_reported_and_skipped() -> None:
    host = host_with(("raising", raising), ("good", good))
    config = config_mod.build({})
    assert sorted(host.backend_types()) == ["echo-test", "generic"]
    context = ReconcilerContext(config=config, registry=Registry())
    assert [r.name for r in host.reconcilers(context)] == ["request_analysis", "privacy", "budget", "avoid_backends", "tier", "quality", "scheduling"]
    assert [route.path for route in host.routes()] == ["/good/hello"]
    group = click.Group()
    host.add_commands(group)
    assert list(group.commands) == ["hello"]
    host.backend_types()  # a second call reports nothing new
    assert host.plugins["raising"].errors == [
        "register_backend_types failed: RuntimeError: backend types exploded",
        "register_reconcilers failed: ValueError: reconcilers exploded",
        "register_routes failed: KeyError: 'routes exploded'",
        "register_commands failed: RuntimeError: commands exploded",
    ]
    assert host.plugins["good"].errors == []


def test_wrong_return_values_are_reported_and_skipped() -> None:
    host = host_with(("misbehaving", misbehaving))
    config = config_mod.build({})
    types = host.backend_types()
    assert types["generic"].__module__ == "nexus.adapters.generic"  # not replaced
    reconcilers = host.reconcilers(ReconcilerContext(config=config, registry=Registry()))
    assert [r.name for r in reconcilers] == ["request_analysis", "privacy", "budget", "tier", "quality", "scheduling"]
    errors = host.plugins["misbehaving"].errors
    assert errors[0] == "register_backend_types returned <class 'dict'>, not a BackendAdapter subclass"
    assert errors[1] == "backend type 'generic' is already registered; skipped"
    assert errors[2].startswith("reconciler <tests.plugins.misbehaving.NoOrder object") and "'order'" in errors[2]
    assert errors[3] == "reconciler <class 'tests.plugins.misbehaving.FailsToBuild'> skipped: cannot build"
    assert host.discovery_sources() == [("builtin", MdnsDiscovery), ("builtin", PortProbe)]  # not LonelySource
    assert host.routes() == []
    assert errors[4:] == [
        "register_discovery_sources returned <class 'tests.plugins.misbehaving.LonelySource'>, expected a list",
        "register_routes must be a plain function, not async (hooks run once, at start-up)",
    ]


def test_hook_with_unknown_arguments_is_refused_in_one_line() -> None:
    host = host_with(("wrong_args", wrong_args), ("good", good))
    assert wrong_args not in host.pm.get_plugins()
    (error,) = host.plugins["wrong_args"].errors
    assert "\n" not in error
    assert error.startswith("failed to register: Plugin 'wrong_args' for hook 'register_commands'; ")
    assert "{'verbose'}" in error
    group = click.Group()
    host.add_commands(group)
    assert list(group.commands) == ["hello"]


def test_deferred_reports_are_logged_only_when_flushed(caplog: pytest.LogCaptureFixture) -> None:
    host = create_host(load_entry_points=False, extra=[("raising", raising)], defer_log=True)
    with caplog.at_level("ERROR", logger="nexus.plugins"):
        host.backend_types()
        assert caplog.records == []
        host.flush_log()
        host.routes()
    assert [r.getMessage() for r in caplog.records] == [
        "plugin raising: register_backend_types failed: RuntimeError: backend types exploded",
        "plugin raising: register_routes failed: KeyError: 'routes exploded'",
    ]


async def test_nexus_serves_with_a_raising_plugin(fake_backend: BackendFactory, nexus: NexusFactory,
                                                  http: aiohttp.ClientSession) -> None:
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)]}, extra_plugins=[("raising", raising), ("typo", typo)])
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
    assert gw.gateway.host.plugins["raising"].errors


# -- third-party reconcilers -----------------------------------------------------------------


def test_third_party_reconciler_slots_between_the_builtins() -> None:
    config = config_mod.build({})
    gateway = Gateway(config, host_with(("good", good)))
    assert [(r.name, r.order) for r in gateway.pipeline.reconcilers] == [
        ("request_analysis", 100), ("privacy", 300), ("budget", 400), ("avoid_backends", 450), ("tier", 500), ("quality", 600),
        ("scheduling", 900)]


async def test_create_app_pipeline_includes_the_plugin_reconciler() -> None:
    app = create_app(config_mod.build({}), host_with(("good", good)), health_check=False, discovery=False)
    assert [r.name for r in app[GATEWAY].pipeline.reconcilers] == ["request_analysis", "privacy", "budget", "avoid_backends", "tier", "quality", "scheduling"]


def test_reconciler_class_gets_its_own_plugin_settings() -> None:
    config = config_mod.build({"plugins": {"good": {"avoid": ["x"]}, "other": {"avoid": ["y"]}}})
    (avoid,) = [r for r in Gateway(config, host_with(("good", good))).pipeline.reconcilers
                if isinstance(r, good.AvoidBackends)]
    assert avoid.avoid == {"x"}


async def test_third_party_reconciler_changes_routing(fake_backend: BackendFactory, nexus: NexusFactory,
                                                      http: aiohttp.ClientSession) -> None:
    alpha = await fake_backend(name="alpha")
    beta = await fake_backend(name="beta")
    backends = [backend_entry(alpha, priority=10), backend_entry(beta, priority=50)]

    plain = await nexus({"backends": backends})
    async with http.post(f"{plain.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.headers["X-Nexus-Backend"] == "alpha"  # preferred by priority without the plugin

    avoiding = await nexus({"backends": backends, "plugins": {"good": {"avoid": ["alpha"]}}},
                           extra_plugins=[("good", good)])
    async with http.post(f"{avoiding.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
        assert resp.headers["X-Nexus-Backend"] == "beta"
    assert len(alpha.chats) == 1 and len(beta.chats) == 1


async def test_rejection_by_a_third_party_reconciler_is_explained(fake_backend: BackendFactory, nexus: NexusFactory,
                                                                  http: aiohttp.ClientSession) -> None:
    alpha = await fake_backend(name="alpha")
    beta = await fake_backend(name="beta")
    gw = await nexus({"backends": [backend_entry(alpha), backend_entry(beta)],
                      "plugins": {"good": {"avoid": ["alpha", "beta"]}}}, extra_plugins=[("good", good)])
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 503
        body = await resp.json()
        details = json.loads(resp.headers["X-Nexus-Rejection-Details"])
        assert "avoid_backends" in resp.headers["X-Nexus-Rejection-Reasons"]
    assert body["error"]["type"] == "service_unavailable"
    assert sorted(details, key=lambda d: d["backend"]) == [
        {"backend": name, "reconciler": "avoid_backends", "reason": "avoided by the good test plugin",
         "suggested_action": "remove it from [plugins.good].avoid"} for name in ("alpha", "beta")]
    assert alpha.chats == [] and beta.chats == []


# -- routes ----------------------------------------------------------------------------------


async def test_register_routes_adds_an_http_route(nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw = await nexus(extra_plugins=[("good", good), ("typo", typo)])
    async with http.get(f"{gw.url}/good/hello") as resp:
        assert resp.status == 200
        assert await resp.json() == {"hello": "from the good plugin"}
    async with http.get(f"{gw.url}/typo/route") as resp:  # the dropped plugin's route is not mounted
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"


def test_routes_are_aiohttp_route_definitions() -> None:
    (route,) = host_with(("good", good)).routes()
    assert isinstance(route, web.RouteDef) and (route.method, route.path) == ("GET", "/good/hello")


async def test_plugin_route_that_clashes_with_a_builtin_is_reported_not_fatal() -> None:
    app = web.Application()
    app.add_routes(ROUTES)
    host = host_with(("clashing", clashing_route))
    host.add_routes(app.router)
    assert host.plugins["clashing"].errors == [
        "route GET /health skipped: it clashes with an existing route",
        "route GET /v1/models skipped: it clashes with an existing route",  # not the last one added: still caught
    ]
    assert "/clash/ok" in {route.resource.canonical for route in app.router.routes() if route.resource}
