"""The docs stay in step with the code.

These tests fail when a plugin hook is not documented with its exact signature, when a
config key is missing from the configuration reference, when a CLI command is missing
from the README, or when the README's set-up commands drift from what CI runs.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pluggy
import pytest

from nexus import hookspecs
from nexus.cli import cli
from nexus.config import documented_keys

ROOT = Path(__file__).resolve().parent.parent
RUN_COMMAND = "python3 -m venv .venv && .venv/bin/pip install . './plugins/llamacpp[demo]' && .venv/bin/nexus demo"


def read(relative: str) -> str:
    return (ROOT / relative).read_text(encoding="utf-8")


def squash(text: str) -> str:
    """Whitespace-insensitive form, so line wrapping and spacing around ``->`` don't matter."""
    return re.sub(r"\s+", "", text)


# -- hooks -------------------------------------------------------------------------------


def hookspec_functions() -> dict[str, Callable[..., object]]:
    """Every hook specification, found the way pluggy finds them (the ``nexus_spec`` marker)."""
    marker = f"{hookspecs.hookspec.project_name}_spec"
    return {
        name: fn
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, marker)
    }


def _annotation(value: object) -> str:
    # hookspecs.py uses `from __future__ import annotations`: annotations are the source text.
    return value if isinstance(value, str) else inspect.formatannotation(value)


def render_signature(name: str, fn: Callable[..., object]) -> str:
    """``name(arg: Type, ...) -> Return`` as written in the source, without quotes."""
    signature = inspect.signature(fn)
    params: list[str] = []
    star_written = False
    for param in signature.parameters.values():
        if param.kind is param.KEYWORD_ONLY and not star_written:
            params.append("*")
            star_written = True
        if param.kind is param.VAR_POSITIONAL:
            star_written = True
        prefix = {param.VAR_POSITIONAL: "*", param.VAR_KEYWORD: "**"}.get(param.kind, "")
        text = prefix + param.name
        if param.annotation is not param.empty:
            text += f": {_annotation(param.annotation)}"
        if param.default is not param.empty:
            text += f" = {param.default!r}"
        params.append(text)
    rendered = f"{name}({', '.join(params)})"
    if signature.return_annotation is not signature.empty:
        rendered += f" -> {_annotation(signature.return_annotation)}"
    return rendered


def documented_hook_headings() -> dict[str, str]:
    """Level-3 headings of docs/plugins.md that hold a signature in backticks, by hook name."""
    headings = re.findall(r"^###\s+`([^`]+)`\s*$", read("docs/plugins.md"), flags=re.MULTILINE)
    found: dict[str, str] = {}
    for heading in headings:
        match = re.match(r"\s*([A-Za-z_]\w*)\s*\(", heading)
        if match:
            found[match.group(1)] = heading
    return found


def test_hookspecs_are_found_through_pluggy() -> None:
    pm = pluggy.PluginManager(hookspecs.hookspec.project_name)
    pm.add_hookspecs(hookspecs)
    registered = {name for name, caller in vars(pm.hook).items() if isinstance(caller, pluggy.HookCaller)}
    assert registered == set(hookspec_functions())
    assert registered, "no hook specifications found"


@pytest.mark.parametrize("name", sorted(hookspec_functions()))
def test_every_hook_is_documented_with_its_exact_signature(name: str) -> None:
    expected = render_signature(name, hookspec_functions()[name])
    headings = documented_hook_headings()
    assert name in headings, f"docs/plugins.md has no heading '### `{expected}`'"
    assert squash(headings[name]) == squash(expected), (
        f"docs/plugins.md documents `{headings[name]}`, but the hookspec is `{expected}`"
    )


def test_plugins_doc_documents_no_hook_that_does_not_exist() -> None:
    stale = set(documented_hook_headings()) - set(hookspec_functions())
    assert not stale, f"docs/plugins.md documents hooks that nexus.hookspecs does not define: {sorted(stale)}"


def test_signature_rendering_keeps_string_annotations_unquoted() -> None:
    def sample(cli: click.Group, *, depth: int = 1) -> list[str]: ...

    assert render_signature("sample", sample) == "sample(cli: click.Group, *, depth: int = 1) -> list[str]"


# -- config ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", documented_keys())
def test_every_config_key_is_documented(key: str) -> None:
    assert f"`{key}`" in read("docs/configuration.md"), f"docs/configuration.md does not mention `{key}`"


# -- CLI ---------------------------------------------------------------------------------


def core_commands(group: click.Group = cli, prefix: str = "nexus") -> Iterator[str]:
    """Every command path of the core CLI, groups and their subcommands.

    Commands that plugins add through ``register_commands`` are left out: their
    plugins document them.
    """
    for name, command in sorted(group.commands.items()):
        module = getattr(command.callback, "__module__", None) or "nexus"
        if module != "nexus" and not module.startswith("nexus."):
            continue
        path = f"{prefix} {name}"
        yield path
        if isinstance(command, click.Group):
            yield from core_commands(command, path)


def test_core_cli_is_walked() -> None:
    assert {"nexus serve", "nexus config init", "nexus config check"} <= set(core_commands())


@pytest.mark.parametrize("command", list(core_commands()))
def test_every_cli_command_is_in_the_readme(command: str) -> None:
    pattern = rf"`{re.escape(command)}(?![\w-])"
    assert re.search(pattern, read("README.md")), f"README.md's CLI table does not mention `{command}`"


def test_version_flag_is_in_the_readme() -> None:
    assert "`nexus --version`" in read("README.md")


# -- set-up commands ---------------------------------------------------------------------


def ci_command() -> str:
    lines = [line.strip() for line in read(".ci/run").splitlines()]
    commands = [line for line in lines if "pytest" in line and not line.startswith("#")]
    assert len(commands) == 1, f".ci/run should run exactly one test command, found {commands}"
    return commands[0]


def test_ci_runs_the_readme_test_command() -> None:
    command = ci_command()
    assert command == (
        "(command -v redis-server && command -v chromium || (apt-get update && DEBIAN_FRONTEND=noninteractive "
        "apt-get install -y "
        "--no-install-recommends redis-server chromium)) >/dev/null && "
        "python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt && .venv/bin/python -m pytest"
    )
    assert command in read("README.md"), "README.md does not show the command .ci/run runs"


def test_ci_script_is_strict_and_executable() -> None:
    script = read(".ci/run")
    assert script.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script
    assert os.access(ROOT / ".ci" / "run", os.X_OK), ".ci/run is not executable"


def test_readme_shows_the_run_command_and_zero_config_serve() -> None:
    readme = read("README.md")
    assert RUN_COMMAND in readme
    assert "`.venv/bin/nexus serve`" in readme
    assert "http://127.0.0.1:8000/v1" in readme


def test_readme_links_to_docs_that_exist() -> None:
    links = re.findall(r"\]\(((?:docs|bench)/[^)#]+)", read("README.md"))
    assert {"docs/plugins.md", "docs/configuration.md", "docs/api.md", "docs/architecture.md"} <= set(links)
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, f"README.md links to missing files: {missing}"
