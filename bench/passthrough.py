"""Bare aiohttp pass-through proxy: the floor an aiohttp gateway can reach.

No routing, no parsing: every request body is forwarded to ``<upstream><path>``
via one shared ClientSession. Non-streaming responses are read whole and
returned; ``text/event-stream`` responses are copied chunk by chunk.

Usage: ``python bench/passthrough.py --port 9002 --upstream http://127.0.0.1:9001``
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def proxy(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    body = await request.read()
    url = request.app[UPSTREAM] + request.path_qs
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    async with session.request(request.method, url, data=body, headers=headers) as upstream:
        if upstream.content_type != "text/event-stream":
            return web.Response(
                body=await upstream.read(), status=upstream.status, content_type=upstream.content_type
            )
        resp = web.StreamResponse(status=upstream.status, headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="backend base URL, e.g. http://127.0.0.1:9001")
    args = parser.parse_args()
    web.run_app(
        make_app(args.upstream),
        host=args.host,
        port=args.port,
        access_log=None,
        print=lambda _: print("ready", flush=True),
    )


if __name__ == "__main__":
    main()
