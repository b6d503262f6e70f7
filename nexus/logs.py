"""Logging: one line per event, ``pretty`` or ``json``, with ``request_id`` on every line.

The request id lives in a context variable set by the request middleware, so every log
line written while serving a request carries it, retries and fallbacks included.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any, TextIO

import msgspec

from nexus.config import LoggingConfig

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("nexus_request_id", default=None)
_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "warning": logging.WARNING, "error": logging.ERROR}
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id"}
_encode = msgspec.json.Encoder().encode


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class PrettyFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}"
        if rid:
            line += f" [{rid}]"
        line += f" {record.getMessage()}"
        if extra:
            line += f" {extra}"
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "timestamp": _timestamp(record),
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            payload["request_id"] = rid
        payload.update(_fields(record))
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return _encode(payload).decode()


def level_number(name: str) -> int:
    return _LEVELS[name.lower()]


def setup(config: LoggingConfig, stream: TextIO | None = None) -> None:
    """Configure the ``nexus`` logger tree (idempotent: replaces earlier handlers)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else PrettyFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger("nexus")
    root.handlers[:] = [handler]
    root.setLevel(level_number(config.level))
    root.propagate = False
    for component, level in config.component_levels.items():
        logging.getLogger(f"nexus.{component}").setLevel(level_number(level))
    if config.enable_content_logging:
        print(
            "WARNING: logging.enable_content_logging is on: prompt and completion text will be written to logs.\n"
            "WARNING: do not enable this where logs are shared or retained.",
            file=stream or sys.stderr,
        )
