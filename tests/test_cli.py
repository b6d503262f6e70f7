"""The ``nexus`` command, run as a real process: one line on stderr and exit 1 for every error.

Client commands (``health``, ``models``, ``backends list``) are checked against a real
``nexus serve`` process in front of an in-process fake backend, so they run with
``asyncio.create_subprocess_exec`` and the test's loop keeps serving the fake.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from importlib import resources
from pathlib import Path

from nexus import __version__
from nexus.plugins import create_host
from nexus.testing import BackendFactory
from nexus.testing import free_port
from tests.plugins.support import (
    Result,
    nexus_env,
    run_nexus,
    run_nexus_async,
    serve_nexus,
    wait_for_health,
)


def assert_one_line_error(result: Result, *fragments: str) -> str:
    """Exit 1, nothing but one ``Error: ...`` line on stderr (no traceback, no log lines)."""
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert line.startswith("Error: "), line
    for fragment in fragments:
        assert fragment in line, line
    return line


def write_config(directory: Path, text: str, name: str = "nexus.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


# -- help, version, completions -----------------------------------------------------------


async def test_version_and_help(tmp_path: Path) -> None:
    version, help_ = await asyncio.gather(run_nexus_async("--version", cwd=tmp_path),
                                          run_nexus_async("--help", cwd=tmp_path))
    assert version.returncode == help_.returncode == 0
    assert version.stdout.strip() == f"nexus, version {__version__}"
    commands = help_.stdout.split("Commands:")[1].split()
    for command in ("serve", "backends", "models", "health", "config", "plugins", "completions"):
        assert command in commands, help_.stdout


async def test_completions_print_a_script_per_shell(tmp_path: Path) -> None:
    markers = {"bash": "complete -o", "zsh": "#compdef nexus", "fish": "complete --no-files --command nexus"}
    results = await asyncio.gather(*(run_nexus_async("completions", shell, cwd=tmp_path) for shell in markers),
                                   run_nexus_async("completions", "tcsh", cwd=tmp_path))
    for (shell, marker), result in zip(markers.items(), results, strict=False):
        assert result.returncode == 0, (shell, result)
        assert marker in result.stdout and "_NEXUS_COMPLETE" in result.stdout, shell
    unknown = results[-1]
    assert unknown.returncode == 2 and "'tcsh' is not one of" in unknown.stderr  # click usage error


# -- config init / check ------------------------------------------------------------------


def test_config_init_creates_then_refuses_then_forces(tmp_path: Path) -> None:
    first = run_nexus("config", "init", cwd=tmp_path)
    assert first.returncode == 0, first
    assert first.stdout.strip() == "Configuration file created: nexus.toml"
    example = resources.files("nexus").joinpath("nexus.example.toml").read_text(encoding="utf-8")
    assert (tmp_path / "nexus.toml").read_text(encoding="utf-8") == example

    (tmp_path / "nexus.toml").write_text("# mine\n", encoding="utf-8")
    second = run_nexus("config", "init", cwd=tmp_path)
    assert_one_line_error(second, "file already exists: nexus.toml", "--force")
    assert (tmp_path / "nexus.toml").read_text(encoding="utf-8") == "# mine\n"  # untouched

    forced = run_nexus("config", "init", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced
    assert (tmp_path / "nexus.toml").read_text(encoding="utf-8") == example

    checked = run_nexus("config", "check", cwd=tmp_path)
    assert checked.returncode == 0, checked
    assert checked.stdout.strip() == "nexus.toml is valid: 0 backends, strategy smart"


def test_config_init_into_a_missing_directory(tmp_path: Path) -> None:
    result = run_nexus("config", "init", "-o", "nowhere/x.toml", cwd=tmp_path)
    assert_one_line_error(result, "cannot write nowhere/x.toml")


CHECK_CASES: dict[str, tuple[str | None, list[str]]] = {
    "unknown-key": ("[server]\nprot = 1\n",
                    ["nexus.toml: unknown config key 'server.prot'", "allowed here: host, port"]),
    "bad-toml": ("[server\n", ["nexus.toml: invalid TOML"]),
    "type-not-installed": ('[[backends]]\nname = "a"\nurl = "http://127.0.0.1:1"\ntype = "kobold"\n',
                           ["backends[0].type = 'kobold'", "install the plugin nexus-plugin-kobold"]),
    "missing-file": (None, ["nexus.toml: config file not found"]),
}


async def test_config_check_invalid_is_one_line_without_traceback(tmp_path: Path) -> None:
    for case, (text, _) in CHECK_CASES.items():
        (tmp_path / case).mkdir()
        if text is not None:
            write_config(tmp_path / case, text)
    results = await asyncio.gather(*(run_nexus_async("config", "check", cwd=tmp_path / case) for case in CHECK_CASES))
    for (case, (_, fragments)), result in zip(CHECK_CASES.items(), results, strict=True):
        assert result.stdout == "", case
        assert_one_line_error(result, *fragments)


async def test_config_check_valid_with_backends(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    write_config(tmp_path / "conf", '[routing]\nstrategy = "priority_only"\n[[backends]]\nname = "a"\n'
                                    'url = "http://127.0.0.1:1"\ntype = "generic"\nzone = "Open"\n', name="x.toml")
    by_flag, by_env = await asyncio.gather(
        run_nexus_async("config", "check", "-c", "conf/x.toml", cwd=tmp_path),
        run_nexus_async("config", "check", cwd=tmp_path, env=nexus_env(NEXUS_CONFIG="conf/x.toml")))
    for result in (by_flag, by_env):
        assert result.returncode == 0, result
        assert result.stdout.strip() == "conf/x.toml is valid: 1 backends, strategy priority_only"


# -- plugins ------------------------------------------------------------------------------


async def test_plugins_lists_the_builtin_plugin(tmp_path: Path) -> None:
    table, as_json = await asyncio.gather(run_nexus_async("plugins", cwd=tmp_path),
                                          run_nexus_async("plugins", "--json", cwd=tmp_path))
    assert table.returncode == as_json.returncode == 0, (table, as_json)
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["NAME", "VERSION", "SOURCE", "HOOKS", "STATUS"]
    builtin = next(row for row in rows if row.startswith("builtin "))
    assert __version__ in builtin and "register_backend_types, register_discovery_sources, register_reconcilers" in builtin
    assert builtin.endswith("ok")
    entry = next(p for p in json.loads(as_json.stdout) if p["name"] == "builtin")
    assert entry == {"name": "builtin", "version": __version__, "source": "nexus-orchestrator",
                     "hooks": ["register_backend_types", "register_discovery_sources", "register_reconcilers"],
                     "errors": []}


# -- serve: start-up errors ---------------------------------------------------------------

INSTALLED_TYPES = ", ".join(sorted(create_host().backend_types()))  # the plugins of this environment
BACKEND = '[[backends]]\nname = "a"\nurl = "http://127.0.0.1:11434"\ntype = "{type}"\n'
SERVE_CASES: dict[str, tuple[str | None, list[str], dict[str, str], str]] = {
    # case: (nexus.toml, serve arguments, environment, the whole stderr line)
    "bad-config": (BACKEND.format(type="generic") + 'zone = "Secret"\n', [], {},
                   "Error: nexus.toml: backends[0].zone = 'Secret' is invalid: expected 'restricted' or 'open'"),
    "uninstalled-type": (BACKEND.format(type="kobold"), [], {},
                         "Error: backends[0].type = 'kobold' is not an installed backend type "
                         f"(installed: {INSTALLED_TYPES}); install the plugin nexus-plugin-kobold"),
    "missing-env-file": (None, [], {"NEXUS_CONFIG": "gone.toml"}, "Error: gone.toml: config file not found"),
    "port-abc": (None, [], {"NEXUS_PORT": "abc"},
                 "Error: environment NEXUS_PORT='abc' is invalid: expected an integer"),
    "cli-port-0": (None, ["--port", "0"], {},
                   "Error: command line: server.port = 0 is invalid: expected a port 1-65535"),
}


async def test_serve_start_up_errors_are_one_line_with_no_log_lines(tmp_path: Path) -> None:
    for case, (text, *_) in SERVE_CASES.items():
        (tmp_path / case).mkdir()
        if text is not None:
            write_config(tmp_path / case, text)
    results = await asyncio.gather(*(
        run_nexus_async("serve", "--no-discovery", *args, cwd=tmp_path / case, env=nexus_env(**env))
        for case, (_, args, env, _) in SERVE_CASES.items()
    ))
    for (case, (*_, expected)), result in zip(SERVE_CASES.items(), results, strict=True):
        assert assert_one_line_error(result) == expected, case


def test_serve_on_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_nexus("serve", "--port", str(port), "--no-discovery", cwd=tmp_path)
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}", "address already in use")


# -- serve: running -----------------------------------------------------------------------


async def test_sigterm_stops_serve_promptly_with_status_0(tmp_path: Path) -> None:
    async with serve_nexus(cwd=tmp_path) as served:
        started = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.proc.wait(), 10) == 0
        assert time.monotonic() - started < 5
    assert f"Nexus {__version__} listening on {served.url}/v1" in served.stderr
    assert "Shutting down: finishing in-flight requests" in served.stderr
    assert "Traceback" not in "\n".join(served.stderr)


async def test_client_commands_when_nothing_answers(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    commands = [[*cmd, *flag, "--url", url] for cmd in (["health"], ["models"], ["backends", "list"])
                for flag in ([], ["--json"])]
    results = await asyncio.gather(*(run_nexus_async(*cmd, cwd=tmp_path) for cmd in commands),
                                   run_nexus_async("models", "--url", "localhost:8000", cwd=tmp_path))
    for command, result in zip(commands, results, strict=False):
        line = assert_one_line_error(result, f"no Nexus answering at {url}", "is `nexus serve` running?")
        assert result.stdout == "", (command, line)
    assert assert_one_line_error(results[-1]) == (
        "Error: --url 'localhost:8000' is invalid: expected an http:// or https:// URL such as http://127.0.0.1:8000")


async def test_client_commands_against_a_running_serve(tmp_path: Path, fake_backend: BackendFactory) -> None:
    backend = await fake_backend(models=["test-model", "test-embed"], name="fake")
    cfg = write_config(tmp_path, f'[[backends]]\nname = "fake"\nurl = "{backend.url}"\ntype = "generic"\n'
                                 'priority = 10\ntier = 2\n', name="cfg.toml")
    async with serve_nexus("-c", str(cfg), cwd=tmp_path) as served:
        await wait_for_health(served.url, healthy_backends=1)
        url = ["--url", served.url]
        commands = [["health", *url], ["health", "--json", *url], ["models", *url], ["models", "--json", *url],
                    ["backends", "list", *url], ["backends", "list", "--json", *url], ["health", "--url", backend.url]]
        results = await asyncio.gather(*(run_nexus_async(*cmd, cwd=tmp_path) for cmd in commands))
    (health, health_json, models, models_json, table, table_json, not_nexus) = results
    for result in results[:-1]:
        assert result.returncode == 0 and result.stderr == "", result

    assert "Status:   healthy" in health.stdout and "Backends: 1/1 healthy" in health.stdout
    assert "Models:   2 available" in health.stdout
    data = json.loads(health_json.stdout)
    assert data["status"] == "healthy" and data["backends"] == {"total": 1, "healthy": 1, "unhealthy": 0}

    rows = [line.split() for line in models.stdout.splitlines()]
    assert rows[0] == ["MODEL", "BACKENDS", "CONTEXT"]
    assert sorted(row[:2] for row in rows[1:]) == [["test-embed", "fake"], ["test-model", "fake"]]
    listed = json.loads(models_json.stdout)["models"]
    assert sorted((m["id"], m["backends"]) for m in listed) == [("test-embed", ["fake"]), ("test-model", ["fake"])]

    header, row = table.stdout.splitlines()
    assert header.split() == ["NAME", "URL", "TYPE", "STATUS", "SOURCE", "ZONE", "MODELS", "LATENCY"]
    assert row.split()[:7] == ["fake", backend.url, "generic", "healthy", "static", "restricted", "2"]
    (entry,) = json.loads(table_json.stdout)["backends"]
    assert (entry["name"], entry["status"], entry["tier"], entry["priority"]) == ("fake", "healthy", 2, 10)
    assert entry["models"] == ["test-embed", "test-model"]

    assert_one_line_error(not_nexus, f"{backend.url}/health answered HTTP 404")


async def test_backends_add_and_remove_on_a_running_serve(tmp_path: Path, fake_backend: BackendFactory) -> None:
    backend = await fake_backend(name="extra")
    async with serve_nexus("--no-health-check", cwd=tmp_path) as served:
        url = ["--url", served.url]
        added = await run_nexus_async("backends", "add", backend.url, "--name", "extra", "-t", "generic", *url,
                                      cwd=tmp_path)
        again = await run_nexus_async("backends", "add", backend.url, "--name", "extra", "-t", "generic", *url,
                                      cwd=tmp_path)
        removed = await run_nexus_async("backends", "remove", "extra", *url, cwd=tmp_path)
        gone = await run_nexus_async("backends", "remove", "extra", *url, cwd=tmp_path)
    assert added.returncode == 0, added
    assert added.stdout.strip() == "Added backend 'extra' (generic, healthy, 1 models)"
    assert assert_one_line_error(again) == "Error: A backend named 'extra' already exists."
    assert removed.returncode == 0 and removed.stdout.strip() == "Removed backend: extra", removed
    assert assert_one_line_error(gone) == "Error: No backend with id 'extra'."
