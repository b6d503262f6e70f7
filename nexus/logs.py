"""Logging: one line per event, ``pretty`` or ``json``, with ``request_id`` on every line.

The request id lives in a context variable set by the request middleware, so every log
line written while serving a request carries it, retries and fallbacks included.
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import queue
import sys
import threading
import time
from typing import Any, TextIO

import msgspec

from nexus.config import LoggingConfig

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("nexus_request_id", default=None)
_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "warning": logging.WARNING, "error": logging.ERROR}
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id"}
_encode = msgspec.json.Encoder(enc_hook=str).encode  # an odd ``extra`` value is written as text, never fatal


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


_second_cache: tuple[int, str] = (-1, "")


def _timestamp(record: logging.LogRecord) -> str:
    """RFC 3339 UTC with milliseconds; the per-second part is formatted once per second."""
    global _second_cache
    second = int(record.created)
    if _second_cache[0] != second:
        _second_cache = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_second_cache[1]}.{int(record.msecs):03d}Z"


# Every control character is shown escaped, so text from clients or backends (a model name,
# an error body) can neither start a fake log line (\n, \r) nor drive the terminal (ESC).
_CONTROLS = str.maketrans({i: f"\\x{i:02x}" for i in (*range(32), 127)} | {10: "\\n", 13: "\\r", 9: "\\t"})


class PrettyFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items()).translate(_CONTROLS)
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}"
        if rid:
            line += f" [{rid}]"
        line += " " + record.getMessage().translate(_CONTROLS)  # one line per event, always
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


class _Writer(threading.Thread):
    """Formats and writes queued records in batches, off the event loop."""

    def __init__(self, records: queue.SimpleQueue[logging.LogRecord | None], stream: TextIO,
                 formatter: logging.Formatter) -> None:
        super().__init__(name="nexus-log-writer", daemon=True)
        self.records, self.stream, self.formatter = records, stream, formatter

    def run(self) -> None:
        get, get_nowait = self.records.get, self.records.get_nowait
        while True:
            batch = [get()]
            try:
                while len(batch) < 512:
                    batch.append(get_nowait())
            except queue.Empty:
                pass
            lines = [self._format(r) for r in batch if r is not None]
            if lines:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            if batch[-1] is None:
                return

    def _format(self, record: logging.LogRecord) -> str:
        """One bad record (format arguments that do not match) must not stop the writer:
        every later line would be lost. It becomes an ERROR line naming its template."""
        try:
            return self.formatter.format(record)
        except Exception as exc:
            return self.formatter.format(logging.makeLogRecord({
                "name": record.name, "levelno": logging.ERROR, "levelname": "ERROR",
                "msg": "Unformattable log record (%s: %s); template %r",
                "args": (type(exc).__name__, exc, str(record.msg)[:200]),
                "created": record.created, "msecs": record.msecs,
                "request_id": getattr(record, "request_id", None),
            }))


class _EnqueueHandler(logging.Handler):
    """Binds the request id on the loop thread, then hands the record to the writer."""

    def __init__(self, records: queue.SimpleQueue[logging.LogRecord | None]) -> None:
        super().__init__()
        self.put = records.put

    def handle(self, record: logging.LogRecord) -> bool:  # no lock needed: the queue is thread-safe
        record.request_id = request_id_var.get()
        self.put(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)


_writer: tuple[_Writer, queue.SimpleQueue[logging.LogRecord | None]] | None = None


def setup(config: LoggingConfig, stream: TextIO | None = None) -> None:
    """Configure the ``nexus`` logger tree (idempotent: replaces earlier handlers).

    Records are formatted and written by a background thread in batches, so a slow
    terminal or pipe never blocks the event loop; the request id is bound before the
    record leaves the loop.
    """
    global _writer
    flush()
    # Documented logging optimisations: no caller, thread or process lookups per record.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    formatter = JsonFormatter() if config.format == "json" else PrettyFormatter()
    records: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
    writer = _Writer(records, stream or sys.stderr, formatter)
    writer.start()
    _writer = (writer, records)
    atexit.register(flush)
    handler = _EnqueueHandler(records)
    root = logging.getLogger("nexus")
    root.handlers[:] = [handler]
    root.setLevel(level_number(config.level))
    root.propagate = False
    for component, level in config.component_levels.items():
        logging.getLogger(f"nexus.{component}").setLevel(level_number(level))
    if config.enable_content_logging:
        if config.format == "json":  # one JSON line, so the stream stays parseable; shown at any level
            handler.handle(logging.makeLogRecord({
                "name": "nexus.logs", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "logging.enable_content_logging is on: prompt and completion text will be written to "
                       "logs; do not enable this where logs are shared or retained."}))
        else:
            print(
                "WARNING: logging.enable_content_logging is on: prompt and completion text will be written to logs.\n"
                "WARNING: do not enable this where logs are shared or retained.",
                file=stream or sys.stderr,
            )


def flush() -> None:
    """Write out every queued record and stop the writer (at exit, or before a new setup)."""
    global _writer
    if _writer is not None:
        writer, records = _writer
        _writer = None
        records.put(None)
        writer.join()
