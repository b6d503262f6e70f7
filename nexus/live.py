"""The dashboard's live feed: ``GET /ws``, a server-push WebSocket (upstream §2.9).

Every message is one text frame ``{"update_type": T, "data": ...}``:

* ``BackendStatus`` -- after every health-check cycle (and once on connect): every backend
  as :func:`backend_status_view` shows it.
* ``ModelChange`` -- ``{"backend_id", "models": [...]}`` after a cycle in which that
  backend's model list changed (``[]`` when it lost them or was removed). Upstream sends it
  after every successful check; sending only changes carries the same information.
* ``RequestComplete`` -- one history entry, for every request (streams, refusals and
  cancellations included), sent as the request ends.
* ``StatsUpdate`` -- every :data:`STATS_INTERVAL` seconds while someone is connected (and
  once on connect): the ``/v1/stats`` body plus ``budget`` (``null`` without a monthly
  limit) and ``recent`` (requests per second and error rate over the last minute). Queue
  depth, quality and budget change continuously, so one periodic snapshot replaces the
  separate queue/quality/budget messages: a client never has to merge partial updates.

Why it is built this way: a message is encoded once, however many clients listen, and
handed to each client's own bounded queue; a per-client task writes it out. So a slow
or stuck browser never blocks a request (the request path only appends to deques), and
never makes the gateway buffer without bound: its queue drops the oldest message, and a
write that stalls for :data:`SEND_TIMEOUT` seconds disconnects it (the page reconnects
and gets a fresh snapshot). A message larger than :data:`MAX_MESSAGE_BYTES` is dropped,
never truncated into invalid JSON.

Only the dashboard's own page may open the socket from a browser: a request with an
``Origin`` header whose host and port differ from its ``Host`` gets 403 before the
upgrade (:func:`same_origin`), so a page on another site cannot read the feed (backend
URLs, models, history) through a visitor's browser. Clients that send no ``Origin``
(scripts, ``websocat``) are not browsers acting for another site, and are let in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

import msgspec
from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from yarl import URL

from nexus.api import GATEWAY, backend_view
from nexus.errors import Forbidden, ServiceUnavailable
from nexus.gateway import Gateway
from nexus.registry import Backend, ModelInfo, Registry
from nexus.state.base import HistoryEntry

log = logging.getLogger("nexus.live")

MAX_MESSAGE_BYTES = 256 * 1024  # larger messages are dropped (upstream: 10 KiB, too small for a real fleet)
CLIENT_QUEUE = 256  # messages waiting for one client; beyond this the oldest is dropped
MAX_CLIENTS = 100  # open dashboards; more get 503 (each holds a task and a queue)
SEND_TIMEOUT = 10.0  # a write stalled this long disconnects the client
HEARTBEAT = 30.0  # WebSocket ping interval; a peer that does not answer is closed
STATS_INTERVAL = 2.0  # seconds between StatsUpdate messages while anyone is connected
MAX_CLIENT_FRAME = 4096  # client frames are ignored; they need not be large either
RATE_WINDOW = 60  # seconds covered by "recent" rates


class Update(msgspec.Struct):
    update_type: str
    data: Any


_encode = msgspec.json.Encoder().encode


def model_view(model: ModelInfo) -> dict[str, Any]:
    return {
        "id": model.id,
        "context_length": model.context_length,
        "vision": model.vision,
        "tools": model.tools,
        "json_mode": model.json_mode,
        "embeddings": model.embeddings,
        "loaded": model.loaded,
    }


def backend_status_view(backend: Backend) -> dict[str, Any]:
    """``/v1/backends``' view, with each model's capabilities, the concurrency cap, the last
    check and the quality figures (TTFT, error rate), which the dashboard cards show."""
    view = backend_view(backend)
    view["models"] = [model_view(m) for _, m in sorted(backend.models.items())]
    view["max_concurrent"] = backend.max_concurrent
    view["last_health_check"] = backend.last_health_check
    view["quality"] = backend.quality.snapshot() if backend.quality.has_history else None
    return view


def backend_views(registry: Registry) -> list[dict[str, Any]]:
    return [backend_status_view(b) for b in sorted(registry.all(), key=lambda b: b.name)]


def same_origin(origin: str, host: str) -> bool:
    """Whether the ``Origin`` header names the host and port of the ``Host`` header
    (case-insensitive; a port left out is the origin scheme's default). ``null``, a
    non-HTTP scheme or anything unparsable is not the same origin."""
    try:
        source = URL(origin)
        if source.scheme not in ("http", "https") or not source.host or source.user is not None:
            return False
        target = URL(f"{source.scheme}://{host}")
        return target.host is not None and target.user is None and (
            (source.host.lower(), source.port) == (target.host.lower(), target.port))
    except (ValueError, TypeError):
        return False


class RecentRate:
    """Finished requests and errors per second over the last :data:`RATE_WINDOW` seconds.

    One-second buckets, so memory stays at most ``RATE_WINDOW`` buckets at any request rate.
    """

    def __init__(self, window: int = RATE_WINDOW) -> None:
        self.window = window
        self._buckets: deque[list[int]] = deque()  # [second, requests, errors]

    def add(self, error: bool, *, now: float | None = None) -> None:
        second = int(time.monotonic() if now is None else now)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
            self._trim(second)
        bucket = self._buckets[-1]
        bucket[1] += 1
        bucket[2] += error

    def _trim(self, second: int) -> None:
        while self._buckets and self._buckets[0][0] <= second - self.window:
            self._buckets.popleft()

    def snapshot(self, *, now: float | None = None) -> dict[str, float | int]:
        self._trim(int(time.monotonic() if now is None else now))
        requests = sum(b[1] for b in self._buckets)
        errors = sum(b[2] for b in self._buckets)
        return {
            "window_seconds": self.window,
            "requests": requests,
            "requests_per_second": round(requests / self.window, 3),
            "error_rate": round(errors / requests, 4) if requests else 0.0,
        }


class _Client:
    """One connected dashboard: a bounded queue of encoded messages and the task writing them."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, size: int = CLIENT_QUEUE) -> None:
        self.ws = ws
        self.request = request
        self.pending: deque[bytes] = deque(maxlen=size)
        self.wake = asyncio.Event()
        self.dropped = 0

    def push(self, message: bytes) -> None:
        if len(self.pending) == self.pending.maxlen:
            self.dropped += 1  # the deque drops the oldest message: a slow client loses history rows
        self.pending.append(message)
        self.wake.set()

    async def pump(self) -> None:
        """Write queued messages until cancelled; a failed or stalled write disconnects."""
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while self.pending:
                    message = self.pending.popleft()
                    async with asyncio.timeout(SEND_TIMEOUT):
                        await self.ws.send_frame(message, WSMsgType.TEXT)
        except (TimeoutError, ConnectionError, RuntimeError) as exc:
            log.info("Dashboard client %s disconnected: %s", self.request.remote, str(exc) or type(exc).__name__)
            transport = self.request.transport
            if transport is not None:
                transport.abort()  # ends the reader loop in LiveHub.handle


class LiveHub:
    """Fans gateway events out to every connected dashboard (see the module docstring)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.clients: set[_Client] = set()
        self.rate = RecentRate()
        self.dropped_oversize = 0
        self._models_seen: dict[str, dict[str, ModelInfo]] = {}
        self._registry_version = -1
        self._ticker: asyncio.Task[None] | None = None
        gateway.history.listeners.append(self.request_complete)
        gateway.health.on_cycle = self.health_cycle

    # -- messages ------------------------------------------------------------------------

    def encode(self, update_type: str, data: Any) -> bytes | None:
        message = _encode(Update(update_type, data))
        if len(message) > MAX_MESSAGE_BYTES:
            self.dropped_oversize += 1
            log.warning("Dropped a %s message of %d bytes (limit %d)", update_type, len(message), MAX_MESSAGE_BYTES)
            return None
        return message

    def broadcast(self, update_type: str, data: Any) -> None:
        """Encode once, queue for every client; never waits."""
        if not self.clients:
            return
        message = self.encode(update_type, data)
        if message is None:
            return
        for client in self.clients:
            client.push(message)

    def stats_payload(self) -> dict[str, Any]:
        """The ``/v1/stats`` body with ``budget`` and ``recent``: what the page's summary,
        queue, budget and quality figures are drawn from."""
        gateway = self.gateway
        payload: dict[str, Any] = gateway.stats.snapshot(gateway.registry, gateway.queue, gateway.pipeline,
                                                         gateway.budget)
        payload.setdefault("budget", None)  # null: no monthly limit configured
        payload["recent"] = self.rate.snapshot()
        return payload

    # -- gateway events ------------------------------------------------------------------

    def request_complete(self, entry: HistoryEntry) -> None:
        """History listener: every finished request."""
        self.rate.add(entry.status in ("Error", "Interrupted"))
        self.broadcast("RequestComplete", entry)

    def health_cycle(self) -> None:
        """Health-checker listener: after each full cycle."""
        registry = self.gateway.registry
        if registry.version != self._registry_version:
            self._registry_version = registry.version
            self._model_changes(registry)
        if self.clients:  # views are built only when someone will see them
            self.broadcast("BackendStatus", backend_views(registry))

    def _model_changes(self, registry: Registry) -> None:
        current = {b.id: b.models for b in registry.all()}
        for backend_id in list(self._models_seen):
            if backend_id not in current:
                del self._models_seen[backend_id]
                self.broadcast("ModelChange", {"backend_id": backend_id, "models": []})
        for backend_id, models in current.items():
            if models != self._models_seen.get(backend_id, {}):
                self._models_seen[backend_id] = models
                if self.clients:
                    self.broadcast("ModelChange", {"backend_id": backend_id,
                                                   "models": [model_view(m) for _, m in sorted(models.items())]})

    async def _tick(self) -> None:
        while self.clients:
            await asyncio.sleep(STATS_INTERVAL)
            try:
                self.broadcast("StatsUpdate", self.stats_payload())
            except Exception:  # one bad snapshot must not end the updates
                log.exception("StatsUpdate failed")

    # -- connections ---------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        """``GET /ws``: push until the client closes; its own frames are read and ignored."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and not same_origin(origin, request.host):
            raise Forbidden("Cross-origin WebSocket connections are not allowed "
                            f"(Origin {origin[:200]!r} is not {request.host[:200]!r})")
        if len(self.clients) >= MAX_CLIENTS:
            raise ServiceUnavailable(f"Too many dashboard connections (limit {MAX_CLIENTS})",
                                     headers={"Retry-After": "5"})
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, compress=False, max_msg_size=MAX_CLIENT_FRAME)
        await ws.prepare(request)
        client = _Client(ws, request)
        for update_type, data in (("BackendStatus", backend_views(self.gateway.registry)),
                                  ("StatsUpdate", self.stats_payload())):
            message = self.encode(update_type, data)
            if message is not None:
                client.push(message)
        self.clients.add(client)
        # The last client to leave cancels the ticker; a client joining in the same loop
        # turn finds it cancelling but not yet done, and must start a fresh one.
        if self._ticker is None or self._ticker.done() or self._ticker.cancelling():
            self._ticker = asyncio.create_task(self._tick())
        pump = asyncio.create_task(client.pump())
        try:
            async for message in ws:  # CLOSE ends the loop; pings are answered by aiohttp
                if message.type is WSMsgType.ERROR:
                    break
        finally:
            self.clients.discard(client)
            if not self.clients and self._ticker is not None:
                self._ticker.cancel()
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        return ws

    async def close(self, _: web.Application | None = None) -> None:
        """Shutdown: say goodbye to every dashboard (they reconnect to the next instance)."""
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        clients = list(self.clients)
        if clients:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await asyncio.gather(*(c.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
                                           for c in clients), return_exceptions=True)


LIVE = web.AppKey("live", LiveHub)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    return await request.app[LIVE].handle(request)


def setup(app: web.Application) -> LiveHub:
    """Create the hub for the app's gateway and add ``GET /ws``."""
    hub = LiveHub(app[GATEWAY])
    app[LIVE] = hub
    app.add_routes([web.get("/ws", websocket)])
    app.on_shutdown.append(hub.close)
    return hub
