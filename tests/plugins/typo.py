"""A plugin with a misspelt hook: ``check_pending`` reports it and the plugin is dropped."""

from __future__ import annotations

from aiohttp import web

from nexus import GenericAdapter, hookimpl


class TypoAdapter(GenericAdapter):
    type_name = "typo-test"


@hookimpl
def register_backend_typos() -> list[type[GenericAdapter]]:
    return [TypoAdapter]


async def _route(request: web.Request) -> web.Response:
    return web.json_response({})


@hookimpl
def register_routes() -> list[web.RouteDef]:
    return [web.get("/typo/route", _route)]
