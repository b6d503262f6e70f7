"""A plugin with two routes that clash with built-in ones and one that does not."""

from __future__ import annotations

from aiohttp import web

from nexus import hookimpl


async def _handler(request: web.Request) -> web.Response:
    return web.json_response({"clash": True})


@hookimpl
def register_routes() -> list[web.RouteDef]:
    return [web.get("/health", _handler), web.get("/v1/models", _handler), web.get("/clash/ok", _handler)]
