"""The health checker: probes every backend each cycle and runs the status state machine.

Unknown -> Healthy/Unhealthy on the first result; Healthy -> Unhealthy after
``failure_threshold`` consecutive failures; Unhealthy -> Healthy after
``recovery_threshold`` consecutive successes (reference §6). Model lists and the
latency EMA are refreshed on every success.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

from nexus.adapters.base import BackendLoading, ProbeFailed
from nexus.config import HealthCheckConfig
from nexus.registry import Backend, ModelInfo, Registry, Status

log = logging.getLogger("nexus.health")


class HealthChecker:
    def __init__(self, registry: Registry, config: HealthCheckConfig,
                 on_healthy: Callable[[], None] = lambda: None) -> None:
        self.registry = registry
        self.config = config
        self.on_healthy = on_healthy  # a backend became healthy: queued requests may be served
        self.on_latency: Callable[[Backend, float], None] | None = None  # a probe succeeded (seconds): metrics
        # Called after every full cycle (the dashboard pushes BackendStatus); must not block.
        self.on_cycle: Callable[[], None] | None = None

    async def run(self) -> None:
        """Check at once, then every ``interval_seconds`` until cancelled."""
        while True:
            await self.check_all()
            await asyncio.sleep(self.config.interval_seconds)

    async def check_all(self) -> None:
        backends = self.registry.all()
        await asyncio.gather(*(self.check(b) for b in backends))
        log.debug("Health cycle done: %d backends", len(backends))
        if self.on_cycle is not None:
            try:
                self.on_cycle()
            except Exception:  # a listener must never stop health checking
                log.exception("Health cycle listener failed")

    async def check(self, backend: Backend) -> None:
        if backend.lost:  # its discovery source reported it gone: it stays unknown
            return
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.config.timeout_seconds):
                models = await backend.adapter.probe()
        except BackendLoading as exc:
            backend.consecutive_failures = backend.consecutive_successes = 0
            backend.set_status(Status.LOADING, str(exc))
        except ProbeFailed as exc:
            self._failure(backend, str(exc))
        except TimeoutError:
            self._failure(backend, f"request timeout after {self.config.timeout_seconds:g}s")
        except aiohttp.ClientError as exc:
            self._failure(backend, f"connection failed: {exc}")
        except Exception as exc:  # a probe must never kill the loop
            log.debug("Probe of %s raised", backend.id, exc_info=True)
            self._failure(backend, f"invalid response: {type(exc).__name__}: {exc}")
        else:
            if not backend.lost:  # not when reported gone while the probe ran
                self._success(backend, (time.perf_counter() - started) * 1000, models)

    def _failure(self, backend: Backend, error: str) -> None:
        backend.consecutive_successes = 0
        backend.consecutive_failures += 1
        backend.last_error = error
        if backend.status in (Status.UNKNOWN, Status.LOADING) or (
            backend.status is Status.HEALTHY and backend.consecutive_failures >= self.config.failure_threshold
        ):
            backend.set_status(Status.UNHEALTHY, error)

    def _success(self, backend: Backend, latency_ms: float, models: list[ModelInfo] | None) -> None:
        backend.consecutive_failures = 0
        backend.consecutive_successes += 1
        if self.on_latency is not None:
            self.on_latency(backend, latency_ms / 1000)
        old = backend.avg_latency_ms
        backend.avg_latency_ms = latency_ms if old == 0 else (latency_ms + 4 * old) / 5
        if models is not None:
            configured = [backend.adapter.describe_model(m) for m in backend.adapter.spec.models]
            listed = {m.id for m in models}
            self.registry.set_models(backend, models + [m for m in configured if m.id not in listed])
        if backend.status is not Status.HEALTHY and (
            backend.status in (Status.UNKNOWN, Status.LOADING)
            or backend.consecutive_successes >= self.config.recovery_threshold
        ):
            backend.set_status(Status.HEALTHY)
            self.on_healthy()
        elif backend.status is Status.HEALTHY:
            backend.last_error = None
