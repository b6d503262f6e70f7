"""A plugin whose hook takes an argument the hook does not have: pluggy refuses to register it."""

from __future__ import annotations

import click

from nexus import hookimpl


@hookimpl
def register_commands(cli: click.Group, verbose: bool) -> None:
    raise AssertionError("never called")
