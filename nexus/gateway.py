"""The gateway: everything a running Nexus holds, built from config and plugins."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping

import aiohttp

from nexus.adapters.base import BackendAdapter
from nexus.adapters.detect import identify_type
from nexus.announce import announce_gateway
from nexus.config import BackendConfig, Config
from nexus.discovery import DiscoverySink
from nexus.errors import ConfigError
from nexus.health import HealthChecker
from nexus.history import History
from nexus.metrics import Metrics
from nexus.plugins import PluginHost
from nexus.proxy import Proxy
from nexus.budget import Budget
from nexus.pricing import PriceTable
from nexus.quality import BackendQuality
from nexus.state import open_store
from nexus.record import RequestRecord
from nexus.queue import RequestQueue
from nexus.stats import Stats
from nexus.registry import Backend, Registry, Status
from nexus.routing.intent import ReconcilerContext
from nexus.routing.router import Pipeline, Router

log = logging.getLogger("nexus.gateway")


def check_backend_types(config: Config, types: Mapping[str, type[BackendAdapter]]) -> None:
    """Fail start-up clearly when a configured backend type has no installed plugin."""
    for i, spec in enumerate(config.backends):
        if spec.type not in types:
            installed = ", ".join(sorted(types))
            raise ConfigError(
                f"backends[{i}].type = {spec.type!r} is not an installed backend type "
                f"(installed: {installed}); install the plugin nexus-plugin-{spec.type}"
            )
        try:
            types[spec.type].check_spec(spec)
        except ValueError as exc:
            raise ConfigError(f"backends[{i}] ({spec.name}): {exc}") from None


def _warm_tokenizer(backend: Backend) -> None:
    for model in ("gpt-4o", "gpt-4"):  # the two encodings of current OpenAI models
        backend.adapter.count_tokens(model, "warm up")


class Gateway:
    """Registry, router, proxy, health checker and discovery of one Nexus process."""

    def __init__(self, config: Config, host: PluginHost, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.host = host
        self.env = os.environ if env is None else env
        self.started_at = time.time()
        self.adapter_types = host.backend_types()
        check_backend_types(config, self.adapter_types)
        self.registry = Registry()
        self.store = open_store(config.state)
        self.budget = Budget(config.routing.budget, self.store, PriceTable(config.routing.budget))
        self.pipeline = Pipeline(host.reconcilers(ReconcilerContext(config=config, registry=self.registry,
                                                                    budget=self.budget)))
        self.router = Router(self.registry, self.pipeline, config.routing)
        self.queue = RequestQueue(config.queue)
        self.stats = Stats()
        # Called with every request's record when it ends (see nexus.record); cheap, non-blocking.
        self.observers: list[Callable[[RequestRecord], None]] = [self.stats.record, self.budget.settle]
        self.history = History()  # /v1/history and the dashboard's feed; persisted once a store is open
        self.observers.append(self.history.record)
        self.health = HealthChecker(self.registry, config.health_check, on_healthy=self.queue.dispatch)
        self.metrics = Metrics(self)  # /metrics; after the budget's settle, so it sees each cost
        self.observers.append(self.metrics.record)
        self.pipeline.observe_run = self.metrics.routed
        self.health.on_latency = self.metrics.backend_latency
        self.session: aiohttp.ClientSession | None = None
        self.proxy: Proxy | None = None
        self.sink: DiscoverySink | None = None
        self.health_checking = config.health_check.enabled
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle (called from the app's cleanup context) --------------------------------

    async def start(self, *, health_check: bool, discovery: bool) -> None:
        await self.store.open()  # first: an unusable state store stops start-up before anything runs
        await self.budget.refresh()
        await self.history.load(self.store)  # the newest 100 entries: history survives a restart
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=True,
        )
        self.proxy = Proxy(self.session, self.config.server, self.budget)
        self.proxy.on_release = self.queue.dispatch
        self.health_checking = health_check
        for spec in self.config.backends:
            self._settle(self.build_backend(spec, spec.name, "static"))
        for backend in self.registry.all():
            await self._restore_quality(backend)
        if health_check:
            self._spawn(self.health.run(), "health checker")
        self._spawn(self._recompute_quality(), "quality tracker")
        self._spawn(self.budget.run(self.config.server.request_timeout_seconds), "budget reconciliation")
        if discovery:
            self.sink = DiscoverySink(self.registry, self.config, self.build_backend, self._on_discovered,
                                      backend_types=self.adapter_types)
            for plugin_name, source_cls in self.host.discovery_sources():
                self._start_source(plugin_name, source_cls)
            if self.config.discovery.announce:
                self._spawn(announce_gateway(self.config), "mDNS announcement")

    def finish(self, record: RequestRecord) -> None:
        """A request ended: log it once and hand it to every observer (one failing observer
        is logged and never affects the response or the other observers)."""
        record.end()
        record.log()
        for observe in self.observers:
            try:
                observe(record)
            except Exception:
                log.exception("Request observer %r failed", observe)

    def refuse_new_work(self) -> None:
        """Shutdown begins: queued requests get 503 ``Retry-After: 5`` and open streams are cut
        with an error event, at once rather than after the grace period."""
        self.queue.close()
        if self.proxy is not None:
            self.proxy.shutdown()

    async def stop(self) -> None:
        self.refuse_new_work()  # already done at shutdown when run by the app; idempotent
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.sink is not None:
            self.sink.close()
        if self.session is not None:
            await self.session.close()
        await self.budget.drain()
        self._save_quality()
        await self.store.close()

    async def _recompute_quality(self) -> None:
        """Every ``quality.metrics_interval_seconds``: error rates, TTFT and exclusions."""
        quality = self.config.quality
        while True:
            await asyncio.sleep(quality.metrics_interval_seconds)
            for backend in self.registry.all():
                backend.quality.recompute(quality.error_rate_threshold)
            self._save_quality()

    def _save_quality(self) -> None:
        for backend in self.registry.all():
            if backend.quality.has_history:
                self.store.save_quality(backend.id, backend.quality.export())

    async def _restore_quality(self, backend: Backend) -> None:
        """A backend known before (same id) gets its last 24 h of outcomes back."""
        backend.quality.restore(await self.store.load_quality(backend.id))
        backend.quality.recompute(self.config.quality.error_rate_threshold)

    def _spawn(self, coro: object, what: str) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        task.add_done_callback(lambda t: self._report_crash(t, what))
        self._tasks.append(task)

    @staticmethod
    def _report_crash(task: asyncio.Task[None], what: str) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s stopped: %r", what, task.exception())

    def _start_source(self, plugin_name: str, source_cls: type) -> None:
        name = getattr(source_cls, "name", source_cls.__name__)
        try:
            source = source_cls(self.config, self.config.plugins.get(plugin_name, {}))
        except Exception as exc:
            self.host.report(plugin_name, f"discovery source {name} failed to start: {exc}")
            return
        assert self.sink is not None
        self._spawn(source.run(self.sink), f"discovery source {name}")

    def _on_discovered(self, backend: Backend) -> None:
        self._spawn(self._restore_quality(backend), f"quality history of {backend.id}")
        if self.health_checking:
            self._spawn(self.health.check(backend), f"first check of {backend.id}")
        else:
            self._settle(backend)

    def _settle(self, backend: Backend | None) -> None:
        """Without health checks, a backend with configured models is taken as healthy."""
        if backend is not None and not self.health_checking and backend.models:
            backend.set_status(Status.HEALTHY)

    async def detect_type(self, url: str) -> str:
        """The first installed type whose probe accepts ``url`` (plugins before ``generic``)."""
        assert self.session is not None
        timeout = min(2.0, self.config.health_check.timeout_seconds)
        return await identify_type(url, self.adapter_types, self.session, timeout) or "generic"

    # -- backends -------------------------------------------------------------------------

    def build_backend(self, spec: BackendConfig, backend_id: str, source: str) -> Backend | None:
        """Create and register a backend; ``None`` (with a warning) when it must be skipped."""
        adapter_cls = self.adapter_types.get(spec.type)
        if adapter_cls is None:
            log.warning("Skipping backend %s: no installed plugin for type %r", backend_id, spec.type)
            return None
        api_key = None
        if spec.api_key_env:
            api_key = self.env.get(spec.api_key_env)
            if not api_key:
                log.warning("Skipping backend %s: environment variable %s is not set", backend_id, spec.api_key_env)
                return None
        assert self.session is not None
        try:
            adapter = adapter_cls(
                spec,
                self.session,
                api_key=api_key,
                probe_timeout=self.config.health_check.timeout_seconds,
                settings=self.config.plugins.get(self.host.type_plugins.get(spec.type, spec.type), {}),
            )
        except Exception as exc:
            log.warning("Skipping backend %s: adapter %s failed: %s", backend_id, spec.type, exc)
            return None
        backend = Backend(
            id=backend_id,
            name=spec.name,
            url=adapter.base_url,
            adapter=adapter,
            zone=(spec.zone or adapter_cls.default_zone()).lower(),
            tier=spec.tier,
            priority=spec.priority,
            source=source,
            max_concurrent=spec.max_concurrent,
            quality=BackendQuality(self.config.quality.retry_after_seconds),
        )
        self.registry.add(backend)
        if backend.cloud:  # load its tokenizer now, off the loop, not on its first request
            self._spawn(asyncio.to_thread(_warm_tokenizer, backend), f"tokenizer of {backend.id}")
        if spec.models:
            self.registry.set_models(backend, [adapter.describe_model(m) for m in spec.models])
        return backend
