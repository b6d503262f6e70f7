"""Typed errors and their one exit: the OpenAI error envelope.

Handlers, the router and adapters raise these; one middleware (``nexus.app.request_middleware``)
turns them into responses, and the CLI turns :class:`ConfigError` into one line on
stderr.
"""

from __future__ import annotations

from typing import Any

import msgspec

_encode = msgspec.json.Encoder().encode


class NexusError(Exception):
    """An error Nexus answers itself, in the OpenAI envelope."""

    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        context: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.context = context
        self.headers = headers or {}

    def body(self) -> bytes:
        payload: dict[str, Any] = {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        }
        if self.context is not None:
            payload["context"] = self.context
        return _encode(payload)


class InvalidRequest(NexusError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request_error"


class ModelNotFound(InvalidRequest):
    status = 404
    code = "model_not_found"


class NotFound(InvalidRequest):
    status = 404
    code = "not_found"


class Forbidden(InvalidRequest):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class Conflict(InvalidRequest):
    status = 409
    code = "conflict"


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"


class ServiceUnavailable(NexusError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class BadGateway(NexusError):
    status = 502
    code = "bad_gateway"


class GatewayTimeout(NexusError):
    status = 504
    code = "gateway_timeout"


class ConfigError(Exception):
    """A configuration problem: one line naming the key, the bad value and what is allowed."""
