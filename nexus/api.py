"""HTTP handlers of the OpenAI-compatible API and ``/health``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import msgspec
from aiohttp import web

from nexus import config as config_mod
from nexus.errors import (
    ConfigError,
    Conflict,
    Forbidden,
    InvalidRequest,
    NexusError,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from nexus.gateway import Gateway
from nexus.registry import Backend
from nexus.logs import request_id_var
from nexus import metrics as metrics_mod, openapi
from nexus.routing.analysis import analyse_chat, analyse_completion, analyse_embedding
from nexus.proxy import CapacityLost
from nexus.record import RequestRecord
from nexus.redact import redact_url
from nexus.queue import priority_of
from nexus.routing.intent import Requirements
from nexus.routing.router import RoutePlan, Unavailable

log = logging.getLogger("nexus.api")
GATEWAY = web.AppKey("gateway", Gateway)
_MAX_REQUEUES = 3  # a request that keeps losing its slot to others gets a 503 after this many rounds
_encode = msgspec.json.Encoder().encode
Analyse = Callable[[bytes], tuple[str, Requirements]]


def json_response(payload: object, status: int = 200) -> web.Response:
    return web.Response(body=_encode(payload), status=status, content_type="application/json")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The raw JSON body, after the content-type and size checks."""
    ctype = request.content_type
    if request.headers.get("Content-Type") and ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got '{ctype}' "
            "(with curl, add -H 'Content-Type: application/json').",
        )
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"Request body of {request.content_length} bytes exceeds the limit of {limit} bytes.")
    return await request.read()


def prompt_preview(body: bytes, limit: int = 100) -> str:
    """The first message's text (or the prompt/input), cut to ``limit`` characters (upstream §9.2)."""
    payload = json.loads(body)
    if "messages" in payload:
        content = (payload["messages"] or [{}])[0].get("content") or ""
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("text"))
    else:
        content = payload.get("prompt", payload.get("input", ""))
    text = content if isinstance(content, str) else json.dumps(content)
    return text if len(text) <= limit else text[:limit] + "..."


def _proxied(endpoint: str, analyse: Analyse) -> Callable[[web.Request], object]:
    async def handler(request: web.Request) -> web.StreamResponse:
        gateway = request.app[GATEWAY]
        request_id = request_id_var.get() or ""
        # Made first, so requests refused for their body (bad JSON, too large) are counted too.
        record = RequestRecord(endpoint, "", False, request_id=request_id)
        try:
            body = await read_body(request, gateway.config.server.max_body_bytes)
            record.model, requirements = analyse(body)
            record.stream = requirements.stream
            if gateway.config.logging.enable_content_logging:
                log.info("Prompt preview: %s", prompt_preview(body))
            model = record.model

            def route() -> RoutePlan:
                return gateway.router.plan(model, requirements, request_id=request_id, headers=request.headers)

            priority = priority_of(request.headers.get("X-Nexus-Priority"))
            return await _serve(gateway, request, endpoint, body, route, priority, record)
        except NexusError as exc:
            record.outcome, record.status, record.error = "error", exc.status, exc.message
            raise
        except web.HTTPException as exc:  # aiohttp's own refusals (body over client_max_size)
            record.outcome, record.status, record.error = "error", exc.status, exc.reason
            raise
        except asyncio.CancelledError:
            record.outcome = "cancelled"
            raise
        finally:
            gateway.finish(record)

    handler.__name__ = endpoint.rsplit("/", 1)[-1].replace("-", "_")
    return handler


async def _serve(gateway: Gateway, request: web.Request, endpoint: str, body: bytes,
                 route: Callable[[], RoutePlan], priority: str, record: RequestRecord) -> web.StreamResponse:
    """Route (waiting in the queue while every candidate is busy), then forward."""
    assert gateway.proxy is not None
    for _ in range(_MAX_REQUEUES):
        try:
            plan = route()
        except Unavailable as unavailable:
            plan = await gateway.queue.wait(route, unavailable, priority)
        try:
            return await gateway.proxy.forward(request, endpoint, body, plan, record)
        except CapacityLost as lost:  # another request took the slot first: wait for the next one
            last_lost = lost
    raise last_lost


chat_completions = _proxied("/v1/chat/completions", analyse_chat)
completions = _proxied("/v1/completions", analyse_completion)
embeddings = _proxied("/v1/embeddings", analyse_embedding)


async def list_models(request: web.Request) -> web.Response:
    """One entry per (healthy backend, model), sorted by id then owner."""
    now = int(time.time())
    entries = [
        {
            "id": model.id,
            "object": "model",
            "created": now,
            "owned_by": backend.name,
            "context_length": model.context_length,
            "capabilities": {
                "vision": model.vision,
                "tools": model.tools,
                "json_mode": model.json_mode,
                "embeddings": model.embeddings,
            },
        }
        for backend in request.app[GATEWAY].registry.all()
        if backend.healthy
        for model in backend.models.values()
    ]
    entries.sort(key=lambda e: (e["id"], e["owned_by"]))
    return json_response({"object": "list", "data": entries})


async def health(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    backends = gateway.registry.all()
    healthy = sum(1 for b in backends if b.healthy)
    if backends and healthy == len(backends):
        status = "healthy"
    elif healthy:
        status = "degraded"
    else:
        status = "unhealthy"
    return json_response(
        {
            "status": status,
            "uptime_seconds": int(time.time() - gateway.started_at),
            "backends": {"total": len(backends), "healthy": healthy, "unhealthy": len(backends) - healthy},
            "models": len(gateway.registry.model_ids()),
        }
    )


def backend_view(b: Backend) -> dict[str, object]:
    """A backend as ``/v1/backends`` and ``nexus backends list`` show it (never its key)."""
    return {
        "id": b.id,
        "name": b.name,
        "url": redact_url(b.url),
        "type": b.type_name,
        "status": b.status.value,
        "source": b.source,
        "zone": b.zone,
        "tier": b.tier,
        "priority": b.priority,
        "models": sorted(b.models),
        "pending": b.pending,
        "total_requests": b.total_requests,
        "avg_latency_ms": round(b.avg_latency_ms, 1),
        "last_error": b.last_error,
    }


async def stats(request: web.Request) -> web.Response:
    """``GET /v1/stats``: request counters, per-backend load and quality, per-model totals, queue."""
    gateway = request.app[GATEWAY]
    return json_response(gateway.stats.snapshot(gateway.registry, gateway.queue, gateway.pipeline, gateway.budget))


async def history(request: web.Request) -> web.Response:
    """``GET /v1/history``: the last 100 requests, oldest first (served from memory)."""
    return json_response(request.app[GATEWAY].history.entries())


async def list_backends(request: web.Request) -> web.Response:
    """``GET /v1/backends``."""
    backends = sorted(request.app[GATEWAY].registry.all(), key=lambda b: b.name)
    return json_response({"backends": [backend_view(b) for b in backends]})


def _require_loopback(request: web.Request) -> None:
    """Changing the fleet is allowed from this machine only, even when Nexus listens on 0.0.0.0."""
    remote = (request.remote or "").removeprefix("::ffff:")
    if not (remote.startswith("127.") or remote == "::1"):
        raise Forbidden("Backends can only be added or removed from the machine Nexus runs on.")


async def add_backend(request: web.Request) -> web.Response:
    """``POST /v1/backends``: register a backend until restart (``nexus backends add``)."""
    _require_loopback(request)
    gateway = request.app[GATEWAY]
    try:
        raw = json.loads(await read_body(request, gateway.config.server.max_body_bytes))
    except ValueError as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}.") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("url"), str):
        raise InvalidRequest("Expected a JSON object with at least a 'url'.", param="url")
    raw.setdefault("name", urlsplit(raw["url"]).hostname or raw["url"])
    if "type" not in raw:
        raw["type"] = await gateway.detect_type(raw["url"])
    try:
        spec = config_mod.build({"backends": [raw]}, source="request").backends[0]
    except ConfigError as exc:
        raise InvalidRequest(str(exc).removeprefix("request: ").replace("backends[0].", "")) from None
    if spec.type not in gateway.adapter_types:
        installed = ", ".join(sorted(gateway.adapter_types))
        raise InvalidRequest(f"Unknown backend type '{spec.type}' (installed: {installed}).", param="type")
    if gateway.registry.get(spec.name) is not None:
        raise Conflict(f"A backend named '{spec.name}' already exists.", param="name")
    backend = gateway.build_backend(spec, spec.name, "manual")
    if backend is None:
        raise InvalidRequest(f"Backend '{spec.name}' could not be created; see the server log.")
    await gateway.health.check(backend)
    return json_response(backend_view(backend), status=201)


async def remove_backend(request: web.Request) -> web.Response:
    """``DELETE /v1/backends/{id}`` (``nexus backends remove``)."""
    _require_loopback(request)
    backend_id = request.match_info["backend_id"]
    backend = request.app[GATEWAY].registry.remove(backend_id)
    if backend is None:
        raise NotFound(f"No backend with id '{backend_id}'.", param="backend_id")
    log.info("Removed backend %s on request", backend_id)
    return json_response({"removed": backend_id})


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format; fleet, queue, quality and budget gauges read now."""
    body = request.app[GATEWAY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": metrics_mod.CONTENT_TYPE})


async def openapi_json(request: web.Request) -> web.Response:
    """``GET /openapi.json``: the OpenAPI 3.1 document of this API (built once, at import)."""
    return web.Response(body=openapi.DOCUMENT, content_type="application/json")


ROUTES = [
    web.post("/v1/chat/completions", chat_completions),
    web.post("/v1/completions", completions),
    web.post("/v1/embeddings", embeddings),
    web.get("/v1/models", list_models),
    web.get("/v1/backends", list_backends),
    web.get("/v1/stats", stats),
    web.get("/v1/history", history),
    web.post("/v1/backends", add_backend),
    web.delete("/v1/backends/{backend_id}", remove_backend),
    web.get("/health", health),
    web.get("/metrics", metrics),
    web.get("/openapi.json", openapi_json),
]
