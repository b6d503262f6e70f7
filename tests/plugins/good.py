"""A well-behaved third-party plugin: a backend type, a reconciler, a command and a route."""

from __future__ import annotations

import click
from aiohttp import web

from nexus import GenericAdapter, ReconcilerContext, RoutingIntent, hookimpl


class EchoAdapter(GenericAdapter):
    """An OpenAI-compatible backend under another type name."""

    type_name = "echo-test"
    default_port = 9999


class AvoidBackends:
    """Excludes the backends named in ``[plugins.<name>] avoid = [...]``; sits between the built-ins."""

    name = "avoid_backends"
    order = 450

    def __init__(self, context: ReconcilerContext) -> None:
        self.avoid = set(context.settings.get("avoid", []))

    def reconcile(self, intent: RoutingIntent) -> None:
        for candidate in list(intent.candidates):
            if candidate.name in self.avoid:
                intent.exclude(candidate.id, "avoided by the good test plugin",
                               suggested_action="remove it from [plugins.good].avoid")


@hookimpl
def register_backend_types() -> list[type[GenericAdapter]]:
    return [EchoAdapter]


@hookimpl
def register_reconcilers() -> list[type[AvoidBackends]]:
    return [AvoidBackends]


@click.command("hello")
@click.option("--name", default="world")
def hello(name: str) -> None:
    """Say hello (added by the good test plugin)."""
    click.echo(f"hello, {name}, from the good plugin")


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(hello)


async def _hello_route(request: web.Request) -> web.Response:
    return web.json_response({"hello": "from the good plugin"})


@hookimpl
def register_routes() -> list[web.RouteDef]:
    return [web.get("/good/hello", _hello_route)]
