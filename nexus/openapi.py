"""The OpenAPI 3.1 document of Nexus's own HTTP surface, served at ``GET /openapi.json``.

Why a hand-written document: the proxied endpoints forward bodies byte for byte, so
only the fields Nexus reads are described (every other field passes through, hence
``additionalProperties: true``); what Nexus adds travels in headers, and those are the
point of the document. ``tests/test_openapi.py`` compares the paths here with the routes
the app registers, so the two cannot drift apart. Built once at import, served as bytes.
"""

from __future__ import annotations

from typing import Any

import msgspec

from nexus import __version__
from nexus.state.base import HistoryEntry

JSON = "application/json"
Schema = dict[str, Any]


def _ref(name: str, kind: str = "schemas") -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json(schema: Schema, description: str, headers: dict[str, Any] | None = None) -> Schema:
    response: Schema = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _error(description: str) -> Schema:
    return _json(_ref("ErrorEnvelope"), description, {"X-Request-Id": _ref("X-Request-Id", "headers")})


_STRING = {"type": "string"}
_NULLABLE_STRING = {"type": ["string", "null"]}

_ROUTED_HEADERS = {
    "X-Nexus-Backend": ("The id of the backend that served (a static backend's configured name).", _STRING),
    "X-Nexus-Backend-Type": ("Where it runs.", {"type": "string", "enum": ["local", "cloud"]}),
    "X-Nexus-Route-Reason": ("Why this backend.", {"type": "string", "enum": [
        "capability-match", "privacy-requirement", "capacity-overflow", "failover"]}),
    "X-Nexus-Privacy-Zone": ("The zone of the backend that served.",
                             {"type": "string", "enum": ["restricted", "open"]}),
    "X-Nexus-Cost-Estimated": ("Estimated cost in USD, 4 decimals; only when > 0.", _STRING),
    "X-Nexus-Fallback-Model": ("The fallback model that served; only when a fallback was used.", _STRING),
    "X-Nexus-Budget-Status": ("Only when not Normal.", {"type": "string", "enum": ["SoftLimit", "HardLimit"]}),
    "X-Nexus-Budget-Utilization": ("Percent of the monthly limit, 2 decimals; with the status.", _STRING),
    "X-Nexus-Budget-Remaining": ("USD left this month, 2 decimals; with the status.", _STRING),
    "X-Nexus-Retries": ("Attempts that failed before this one; only when > 0.", {"type": "string",
                                                                                  "pattern": "^[0-9]+$"}),
    "X-Request-Id": ("The request's id (echoes a valid incoming X-Request-Id). On every response.", _STRING),
}
_REJECTION_HEADERS = {
    "X-Nexus-Rejection-Reasons": ("'<n> backends rejected by <stage>, <stage>' (routing rejections).", _STRING),
    "X-Nexus-Rejection-Details": ("JSON array of {backend, reconciler, reason, suggested_action}.", _STRING),
    "Retry-After": ("Seconds to wait (a full queue, a queue timeout, shutdown).", _STRING),
}
_REQUEST_HEADERS = {
    "X-Request-Id": ("Reused as the request id when it is 1-128 characters of [A-Za-z0-9._:@/+=-].", _STRING),
    "X-Nexus-Strict": ("Present (any value): strict tier mode (the default), wins over X-Nexus-Flexible.", _STRING),
    "X-Nexus-Flexible": ("Exactly 'true': a lower tier may serve when none at the policy's min_tier can.",
                         {"type": "string", "enum": ["true"]}),
    "X-Nexus-Priority": ("Queue priority: 'high' (case-insensitive) goes first; anything else is normal.",
                         {"type": "string", "enum": ["high", "normal"]}),
}


def _headers(spec: dict[str, tuple[str, Schema]]) -> dict[str, Schema]:
    return {name: {"description": doc, "schema": schema} for name, (doc, schema) in spec.items()}


def _parameters() -> dict[str, Schema]:
    return {name: {"name": name, "in": "header", "required": False, "description": doc, "schema": schema}
            for name, (doc, schema) in _REQUEST_HEADERS.items()}


def _schemas() -> dict[str, Schema]:
    history, history_defs = msgspec.json.schema_components([HistoryEntry],
                                                           ref_template="#/components/schemas/{name}")
    error_body = {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": _STRING, "type": _STRING, "param": _NULLABLE_STRING, "code": _NULLABLE_STRING}}
    backend = {"type": "object", "properties": {
        "id": _STRING, "name": _STRING, "url": _STRING, "type": _STRING,
        "status": {"type": "string", "enum": ["unknown", "healthy", "unhealthy", "loading", "draining"]},
        "source": _STRING, "zone": {"type": "string", "enum": ["restricted", "open"]},
        "tier": {"type": "integer", "minimum": 1, "maximum": 5}, "priority": {"type": "integer"},
        "models": {"type": "array", "items": _STRING}, "pending": {"type": "integer"},
        "total_requests": {"type": "integer"}, "avg_latency_ms": {"type": "number"},
        "last_error": _NULLABLE_STRING}}
    return {
        **history_defs,
        "ErrorEnvelope": {
            "type": "object", "required": ["error"],
            "description": "The OpenAI error envelope; actionable 503s add 'context'.",
            "properties": {"error": error_body, "context": _ref("ErrorContext")}},
        "ErrorContext": {"type": "object", "additionalProperties": True, "properties": {
            "available_backends": {"type": "array", "items": _STRING},
            "required_tier": {"type": "integer"}, "privacy_zone_required": _STRING,
            "eta_seconds": {"type": "integer"}, "models_tried": {"type": "array", "items": _STRING}}},
        "ChatCompletionRequest": {
            "type": "object", "required": ["model", "messages"], "additionalProperties": True,
            "description": "Forwarded byte for byte; only 'model' may be rewritten (alias or fallback).",
            "properties": {"model": _STRING, "messages": {"type": "array", "items": {"type": "object"}},
                           "stream": {"type": "boolean"}, "max_tokens": {"type": "integer"},
                           "tools": {"type": "array"}, "response_format": {"type": "object"}}},
        "CompletionRequest": {
            "type": "object", "required": ["model"], "additionalProperties": True,
            "properties": {"model": _STRING, "prompt": {}, "stream": {"type": "boolean"},
                           "max_tokens": {"type": "integer"}}},
        "EmbeddingRequest": {
            "type": "object", "required": ["model", "input"], "additionalProperties": True,
            "properties": {"model": _STRING, "input": {"oneOf": [_STRING, {"type": "array"}]}}},
        "BackendResponse": {"type": "object", "additionalProperties": True,
                            "description": "The backend's OpenAI-compatible body, unchanged."},
        "Model": {"type": "object", "required": ["id", "object", "owned_by"], "properties": {
            "id": _STRING, "object": {"const": "model"}, "created": {"type": "integer"},
            "owned_by": {"type": "string", "description": "The backend's name."},
            "context_length": {"type": ["integer", "null"]},
            "capabilities": {"type": "object", "properties": {
                k: {"type": "boolean"} for k in ("vision", "tools", "json_mode", "embeddings")}}}},
        "ModelList": {"type": "object", "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}},
        "Health": {"type": "object", "required": ["status", "uptime_seconds", "backends", "models"], "properties": {
            "status": {"type": "string", "enum": ["healthy", "degraded", "unhealthy"]},
            "uptime_seconds": {"type": "integer"},
            "backends": {"type": "object", "properties": {
                k: {"type": "integer"} for k in ("total", "healthy", "unhealthy")}},
            "models": {"type": "integer"}}},
        "Stats": {"type": "object", "additionalProperties": True, "properties": {
            "uptime_seconds": {"type": "integer"}, "requests": {"type": "object"},
            "backends": {"type": "array", "items": {"type": "object"}},
            "models": {"type": "array", "items": {"type": "object"}},
            "queue": {"type": "object"}, "routing": {"type": "object"}, "budget": {"type": "object"}}},
        "HistoryList": {"type": "array", "items": history[0], "maxItems": 100,
                        "description": "The last 100 requests, oldest first."},
        "Backend": backend,
        "BackendList": {"type": "object", "properties": {"backends": {"type": "array", "items": _ref("Backend")}}},
        "NewBackend": {"type": "object", "required": ["url"], "additionalProperties": True,
                       "description": "The keys of a [[backends]] table; name and type are optional.",
                       "properties": {"url": _STRING, "name": _STRING, "type": _STRING}},
        "Removed": {"type": "object", "properties": {"removed": _STRING}},
    }


def _proxied(summary: str, body: str, *, stream: bool) -> Schema:
    content: Schema = {JSON: {"schema": _ref("BackendResponse")}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string", "description": (
            "SSE, relayed event by event; ends with 'data: [DONE]', or with one "
            "'data: {\"error\": ...}' event and no [DONE] when the stream was cut.")}}
    routed = {name: _ref(name, "headers") for name in _ROUTED_HEADERS}
    rejected = {name: _ref(name, "headers") for name in (*_REJECTION_HEADERS, "X-Request-Id")}
    return {"post": {
        "summary": summary,
        "parameters": [_ref(name, "parameters") for name in _REQUEST_HEADERS],
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref(body)}}},
        "responses": {
            "200": {"description": "The backend's answer, with the X-Nexus-* headers.", "headers": routed,
                    "content": content},
            "400": _error("Malformed JSON, a missing field, a missing capability or context_length_exceeded."),
            "404": _error("model_not_found: no backend lists the model (after aliases), and it has no fallbacks."),
            "413": _error("The body exceeds server.max_body_bytes."),
            "415": _error("The Content-Type is not JSON."),
            "4XX": _json(_ref("BackendResponse"), "A backend's own 4xx, passed through.", routed),
            "502": _error("Every attempt failed (connection, 429, 5xx, invalid JSON)."),
            "503": _json(_ref("ErrorEnvelope"), "No backend can serve now (queue full or timed out, policy, "
                         "fallbacks exhausted).", rejected),
            "504": _error("The last attempt timed out."),
        }}}


def _get(summary: str, response: Schema) -> Schema:
    return {"get": {"summary": summary, "responses": {"200": response}}}


def _paths() -> dict[str, Schema]:
    text = {"type": "string"}
    return {
        "/v1/chat/completions": _proxied("Chat completion, JSON or SSE", "ChatCompletionRequest", stream=True),
        "/v1/completions": _proxied("Legacy text completion", "CompletionRequest", stream=True),
        "/v1/embeddings": _proxied("Embeddings", "EmbeddingRequest", stream=False),
        "/v1/models": _get("One entry per (healthy backend, model)", _json(_ref("ModelList"), "The models.")),
        "/health": _get("Gateway health (always 200)", _json(_ref("Health"), "Health summary.")),
        "/metrics": _get("Prometheus metrics", {"description": "Prometheus text format 0.0.4.", "content": {
            "text/plain; version=0.0.4; charset=utf-8": {"schema": text}}}),
        "/v1/stats": _get("Request, backend, model, queue and routing statistics",
                          _json(_ref("Stats"), "Statistics.")),
        "/v1/history": _get("The last 100 requests, oldest first", _json(_ref("HistoryList"), "History.")),
        "/v1/backends": {
            **_get("Every backend with status and counters", _json(_ref("BackendList"), "The backends.")),
            "post": {"summary": "Add a backend until restart (loopback clients only)",
                     "requestBody": {"required": True, "content": {JSON: {"schema": _ref("NewBackend")}}},
                     "responses": {"201": _json(_ref("Backend"), "The new backend, probed once."),
                                   "400": _error("Invalid values, or an unknown type."),
                                   "403": _error("Not a loopback client."),
                                   "409": _error("The name is taken.")}}},
        "/v1/backends/{backend_id}": {"delete": {
            "summary": "Remove a backend until restart (loopback clients only)",
            "parameters": [{"name": "backend_id", "in": "path", "required": True, "schema": text}],
            "responses": {"200": _json(_ref("Removed"), "Removed."), "403": _error("Not a loopback client."),
                          "404": _error("No such backend.")}}},
        "/": _get("The dashboard", {"description": "HTML page.", "content": {"text/html": {"schema": text}}}),
        "/dashboard/static/{filename}": {"get": {
            "summary": "The dashboard's static files (script, style sheet)",
            "parameters": [{"name": "filename", "in": "path", "required": True, "schema": text}],
            "responses": {"200": {"description": "The file."}, "404": {"description": "No such file."}}}},
        "/ws": {"get": {"summary": "WebSocket push channel of the dashboard",
                        "responses": {"101": {"description": "Switching protocols to WebSocket."}}}},
        "/openapi.json": _get("This document", {"description": "OpenAPI 3.1.", "content": {
            JSON: {"schema": {"type": "object"}}}}),
    }


def build() -> dict[str, Any]:
    """The document as a dict (a new one on each call)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "Nexus LLM gateway", "version": __version__,
                 "description": "An OpenAI-compatible gateway over local and cloud LLM backends. Request and "
                                "response bodies pass through unchanged; Nexus speaks in X-Nexus-* headers. "
                                "Every error Nexus produces uses the OpenAI error envelope."},
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "headers": _headers({**_ROUTED_HEADERS, **_REJECTION_HEADERS}),
            "parameters": _parameters(),
        },
    }


DOCUMENT: bytes = msgspec.json.encode(build())
