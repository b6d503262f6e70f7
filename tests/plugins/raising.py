"""A plugin whose hook implementations raise: each failure is reported and skipped."""

from __future__ import annotations

import click
from aiohttp import web

from nexus import BackendAdapter, Reconciler, hookimpl


@hookimpl
def register_backend_types() -> list[type[BackendAdapter]]:
    raise RuntimeError("backend types exploded")


@hookimpl
def register_reconcilers() -> list[Reconciler]:
    raise ValueError("reconcilers exploded")


@hookimpl
def register_routes() -> list[web.RouteDef]:
    raise KeyError("routes exploded")


@hookimpl
def register_commands(cli: click.Group) -> None:
    raise RuntimeError("commands exploded")
