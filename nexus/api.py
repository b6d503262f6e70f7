"""HTTP handlers of the OpenAI-compatible API and ``/health``."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import msgspec
from aiohttp import web

from nexus.errors import PayloadTooLarge, UnsupportedMediaType
from nexus.gateway import Gateway
from nexus.logs import request_id_var
from nexus.routing.analysis import analyse_chat, analyse_completion, analyse_embedding
from nexus.routing.intent import Requirements

log = logging.getLogger("nexus.api")
GATEWAY = web.AppKey("gateway", Gateway)
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
        body = await read_body(request, gateway.config.server.max_body_bytes)
        model, requirements = analyse(body)
        if gateway.config.logging.enable_content_logging:
            log.info("Prompt preview: %s", prompt_preview(body))
        plan = gateway.router.plan(
            model, requirements, request_id=request_id_var.get() or "", headers=request.headers
        )
        assert gateway.proxy is not None
        return await gateway.proxy.forward(request, endpoint, body, plan, stream=requirements.stream)

    handler.__name__ = endpoint.rsplit("/", 1)[-1].replace("-", "_")
    return handler


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


async def list_backends(request: web.Request) -> web.Response:
    """``GET /v1/backends``: what ``nexus backends list`` shows (no secrets)."""
    return json_response(
        {
            "backends": [
                {
                    "id": b.id,
                    "name": b.name,
                    "url": b.url,
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
                for b in sorted(request.app[GATEWAY].registry.all(), key=lambda b: b.name)
            ]
        }
    )


ROUTES = [
    web.post("/v1/chat/completions", chat_completions),
    web.post("/v1/completions", completions),
    web.post("/v1/embeddings", embeddings),
    web.get("/v1/models", list_models),
    web.get("/v1/backends", list_backends),
    web.get("/health", health),
]
