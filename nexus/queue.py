"""The request queue (reference §5.13, CONTRACT §4): wait for capacity, then route.

A request is queued only when its model exists and every exclusion is transient (all
candidates busy at their concurrency cap, unhealthy, loading, or asking to wait), never
for unknown models or privacy, tier, quality or budget rejections. It is dispatched the
moment capacity frees: a finished request, a backend turning healthy, or a ``Retry-After``
running out each trigger :meth:`RequestQueue.dispatch`, which routes waiting requests in
priority order (high before normal, oldest first). Routing is synchronous, so a waiter
is handed a ready plan; the next one is tried only after it started its request.
"""

from __future__ import annotations

import asyncio
import math
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from nexus.config import QueueConfig
from nexus.errors import NexusError, ServiceUnavailable
from nexus.routing.router import RoutePlan, Unavailable

log = logging.getLogger("nexus.queue")
PRIORITIES = ("high", "normal")


def priority_of(header: str | None) -> str:
    """``X-Nexus-Priority``: ``high`` (case-insensitive, trimmed) or else ``normal``."""
    return "high" if header is not None and header.strip().lower() == "high" else "normal"


@dataclass(eq=False)
class _Waiter:
    route: Callable[[], RoutePlan]
    outcome: asyncio.Future[RoutePlan] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class RequestQueue:
    def __init__(self, config: QueueConfig) -> None:
        self.enabled = config.enabled and config.max_size > 0
        self.max_size = config.max_size
        self.max_wait = config.max_wait_seconds
        self._waiting: dict[str, deque[_Waiter]] = {p: deque() for p in PRIORITIES}
        self._wakeup: asyncio.TimerHandle | None = None
        self._closed = False
        self.dispatched = self.timed_out = self.rejected_full = 0

    def __len__(self) -> int:
        return sum(len(d) for d in self._waiting.values())

    def depth(self) -> dict[str, int]:
        return {p: len(d) for p, d in self._waiting.items()}

    async def wait(self, route: Callable[[], RoutePlan], unavailable: Unavailable, priority: str) -> RoutePlan:
        """Wait until ``route()`` succeeds; raise the 503 that applies when it cannot."""
        if not self.enabled:
            raise ServiceUnavailable(unavailable.message, context=unavailable.context, headers=unavailable.headers)
        if self._closed:
            raise _shutting_down()
        if len(self) >= self.max_size:
            self.rejected_full += 1
            raise ServiceUnavailable(
                "All backends at capacity and the queue is full",
                context=unavailable.context,
                headers={**unavailable.headers, "Retry-After": str(math.ceil(self.max_wait))},
            )
        waiter = _Waiter(route)
        self._waiting[priority].append(waiter)
        log.info("Request enqueued", extra={"priority": priority, "queue_depth": len(self)})
        if unavailable.retry_in is not None:
            self._wake_in(unavailable.retry_in)
        try:
            async with asyncio.timeout(self.max_wait):
                plan = await asyncio.shield(waiter.outcome)
        except TimeoutError:
            self.timed_out += 1
            raise ServiceUnavailable(
                "Request timed out in the queue waiting for capacity",
                context={**unavailable.context, "eta_seconds": math.ceil(self.max_wait)},
                headers={**unavailable.headers, "Retry-After": str(math.ceil(self.max_wait))},
            ) from None
        finally:
            self._discard(waiter)  # served, timed out, or the client gave up: never left behind
            # The next waiter gets its chance once this request has started and taken its
            # capacity (or given it up): after this task next yields.
            asyncio.get_running_loop().call_soon(self.dispatch)
        return plan

    def dispatch(self) -> None:
        """Route the first waiter that can be routed now (high priority first)."""
        if not len(self):
            return
        for priority in PRIORITIES:
            for waiter in list(self._waiting[priority]):
                if waiter.outcome.done():
                    continue
                try:
                    plan = waiter.route()
                except Unavailable as still:
                    if still.retry_in is not None:
                        self._wake_in(still.retry_in)
                    continue
                except NexusError as exc:  # the model went away, or a policy now refuses it
                    waiter.outcome.set_exception(exc)
                    continue
                self.dispatched += 1
                waiter.outcome.set_result(plan)
                return

    def close(self) -> None:
        """Shutdown: every waiting request is answered 503 with ``Retry-After: 5``."""
        self._closed = True
        for queue in self._waiting.values():
            for waiter in queue:
                if not waiter.outcome.done():
                    waiter.outcome.set_exception(_shutting_down())
        if self._wakeup is not None:
            self._wakeup.cancel()

    def _discard(self, waiter: _Waiter) -> None:
        for queue in self._waiting.values():
            try:
                queue.remove(waiter)
                return
            except ValueError:
                continue

    def _wake_in(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + seconds
        current = self._wakeup
        if current is None or current.cancelled() or current.when() <= loop.time() or when < current.when():
            if self._wakeup is not None:
                self._wakeup.cancel()
            self._wakeup = loop.call_at(when, self.dispatch)


def _shutting_down() -> ServiceUnavailable:
    return ServiceUnavailable("Nexus is shutting down", headers={"Retry-After": "5"})
