"""The aiohttp application: middleware (request id + the one error exit), routes, lifecycle."""

from __future__ import annotations

import asyncio
import logging
import itertools
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from nexus import api, live
from nexus.config import Config
from nexus.dashboard import page as dashboard_page
from nexus.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NexusError,
    NotFound,
    PayloadTooLarge,
)
from nexus.gateway import Gateway
from nexus.logs import request_id_var
from nexus.plugins import PluginHost

log = logging.getLogger("nexus.app")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_ID_PREFIX = secrets.token_hex(8)  # random per process, so ids from several gateways never collide
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """A unique request id: 16 random hex digits per process, then a counter (cheaper than uuid4)."""
    return f"{_ID_PREFIX}{next(_id_counter):016x}"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _as_nexus_error(exc: web.HTTPException, request: web.Request) -> NexusError:
    if isinstance(exc, web.HTTPNotFound):
        return NotFound(f"Unknown route: {request.method} {request.path}")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return MethodNotAllowed(
            f"Method {request.method} is not allowed on {request.path} (allowed: {allowed})",
            headers={"Allow": allowed},
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(f"Request body exceeds the limit of {request.app[api.GATEWAY].config.server.max_body_bytes} bytes.")
    error = NexusError(exc.reason or "HTTP error", status=exc.status, code=exc.reason.lower().replace(" ", "_"))
    error.type = "invalid_request_error" if exc.status < 500 else "server_error"
    return error


def error_response(error: NexusError) -> web.Response:
    response = web.Response(body=error.body(), status=error.status, content_type="application/json")
    response.headers.update(error.headers)
    return response


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Binds the request id, and is the one place errors become the OpenAI envelope."""
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if incoming and _VALID_REQUEST_ID.match(incoming) else new_request_id()
    token = request_id_var.set(request_id)
    try:
        try:
            response = await handler(request)
        except NexusError as exc:
            response = error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = error_response(_as_nexus_error(exc, request))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("Unhandled error serving %s %s", request.method, request.path)
            response = error_response(NexusError("Internal error in Nexus; see the server log."))
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
        return response
    finally:
        request_id_var.reset(token)


class _EnvelopeRequestHandler(RequestHandler):
    """Errors caught by aiohttp's own HTTP parser (bad framing) also get the envelope."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("Response already started; cannot send an error response")
        log.debug("Malformed request from %s: %s", request.remote, exc)
        error = InvalidRequest(f"Malformed HTTP request: {message or exc or 'bad request'}", code="bad_request")
        if status >= 500:
            error = NexusError("Internal error in Nexus; see the server log.")
        else:
            error.status = status
        response = error_response(error)
        response.force_close()
        return response


class _EnvelopeServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)


class NexusRunner(web.AppRunner):
    """An AppRunner whose low-level protocol errors use the OpenAI envelope."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _EnvelopeServer  # same object; only its handler factory changes
        return server


def create_app(
    config: Config,
    host: PluginHost,
    *,
    health_check: bool | None = None,
    discovery: bool | None = None,
) -> web.Application:
    """Build the app. ``health_check``/``discovery`` default to the config's ``enabled``."""
    gateway = Gateway(config, host)
    app = web.Application(middlewares=[request_middleware], client_max_size=config.server.max_body_bytes)
    app[api.GATEWAY] = gateway
    app.add_routes(api.ROUTES)
    live.setup(app)  # GET /ws
    dashboard_page.setup(app, host)  # GET / and its static files
    host.add_routes(app.router)
    run_health = config.health_check.enabled if health_check is None else health_check
    run_discovery = config.discovery.enabled if discovery is None else discovery

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await gateway.start(health_check=run_health, discovery=run_discovery)
        yield
        await gateway.stop()

    async def refuse_new_work(_: web.Application) -> None:
        gateway.refuse_new_work()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(refuse_new_work)
    return app
