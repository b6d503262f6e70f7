"""Prometheus metrics for ``GET /metrics`` (reference §2.7), cheap enough for the request path.

Why not prometheus_client's ``Counter``/``Histogram``: each of their observations takes a
lock and costs about 2 µs, a request records about six and every routing decision another
six, against a routing budget of 20 µs. Everything that records here runs on the event
loop thread, so plain dicts and lists suffice (about 0.3 µs per observation); a collector
turns them into metric families only when ``/metrics`` is scraped. Fleet, queue, quality
and budget gauges are read from their owners at scrape time, so they are never stale.

Each gateway owns its :class:`CollectorRegistry` (never the process-wide default), so
several gateways in one process (tests) never share or collide on series.

Cardinality is bounded: a ``model`` label value is a model some registered backend lists
or the config names (aliases, fallbacks); any other name a client sends becomes
``other``. At most :data:`MAX_MODEL_LABELS` models and :data:`MAX_BACKEND_LABELS`
backends get their own label value; later ones are ``other`` too. The caps count what is
live: when a new name finds its cap full and the registry has changed since the last look
(``registry.version``), names of backends no longer registered and of models no longer
listed or configured are forgotten first, so churn over the process's lifetime (mDNS,
``POST``/``DELETE /v1/backends``) never leaves newcomers with ``other``. A known name
costs one dict lookup, as before. (Series of departed backends stay, as every series does,
so a gateway with much churn exposes more series over its lifetime than the caps.)

Two backend ids may sanitise to one label value (``gpu-1`` and ``gpu_1``). Per-request
series simply add up; gauges read at scrape are merged per label value, so no series is
ever exposed twice: ``nexus_pending_requests`` is summed, and the ``nexus_agent_*``
quality gauges show the worst of them (highest error rate and TTFT, lowest success
rate), so an alert on the label fires when any backend behind it is bad.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left
from collections.abc import Iterator
from functools import lru_cache
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from nexus.gateway import Gateway
    from nexus.record import RequestRecord
    from nexus.registry import Backend
    from nexus.routing.intent import RoutingIntent

log = logging.getLogger("nexus.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (10.0, 50.0, 100.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16000.0, 32000.0, 64000.0, 128000.0)
STAGE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COST_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
MAX_MODEL_LABELS = 500
MAX_BACKEND_LABELS = 200
OTHER = "other"  # a model no backend lists, or a label beyond the caps
NONE = "none"  # no backend was tried / no HTTP status was sent
BUDGET_STATUS = {"Normal": 0, "SoftLimit": 1, "HardLimit": 2}

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
# Status codes of errors Nexus raises before any backend was tried (routing, request checks).

@lru_cache(maxsize=4096)
def sanitize_label(value: str) -> str:
    """As upstream: every character but ASCII letters, digits and ``_`` becomes ``_``, and a
    leading digit gets a ``_`` prefix (``ollama-local:11434`` -> ``ollama_local_11434``)."""
    clean = _UNSAFE.sub("_", value)
    return "_" + clean if clean[:1].isdigit() else clean


class _Counter:
    """Label values -> count. Written on the event loop only."""

    __slots__ = ("name", "doc", "labels", "values")

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        values = self.values
        values[key] = values.get(key, 0.0) + amount

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for key, value in self.values.items():
            family.add_metric(key, value)
        return family


class _Histogram:
    """Label values -> ``[count per bucket..., count above the last bound, sum]``."""

    __slots__ = ("name", "doc", "labels", "bounds", "series", "_les")

    def __init__(self, name: str, doc: str, labels: tuple[str, ...], bounds: tuple[float, ...]) -> None:
        self.name, self.doc, self.labels, self.bounds = name, doc, labels, bounds
        self.series: dict[tuple[str, ...], list[float]] = {}
        self._les = [floatToGoString(b) for b in bounds] + ["+Inf"]

    def child(self, key: tuple[str, ...]) -> list[float]:
        """The series of ``key`` (created empty), for callers that keep it to observe faster."""
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = [0.0] * (len(self.bounds) + 2)
        return series

    def observe(self, key: tuple[str, ...], value: float) -> None:
        series = self.series.get(key) or self.child(key)
        series[bisect_left(self.bounds, value)] += 1  # first bound >= value: Prometheus "le"
        series[-1] += value

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, series in self.series.items():
            total, buckets = 0.0, []
            for le, count in zip(self._les, series):
                total += count
                buckets.append((le, total))
            family.add_metric(list(key), buckets, series[-1])
        return family


class Metrics:
    """All of one gateway's metrics. ``record`` is a request observer, ``routed`` the routing
    pipeline's hook and ``backend_latency`` the health checker's."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._registry = gateway.registry
        routing = gateway.config.routing
        self._configured_models = frozenset(
            [*routing.aliases, *routing.aliases.values(), *routing.fallbacks,
             *(m for chain in routing.fallbacks.values() for m in chain)])
        self._model_labels: dict[str, str] = {}
        self._backend_labels: dict[str, str] = {}
        self._pruned_version = self._registry.version  # when the label caches were last pruned

        self.requests = _Counter("nexus_requests_total", "Requests that ended, by HTTP status and outcome.",
                                 ("model", "backend", "status", "outcome"))
        self.errors = _Counter("nexus_errors_total", "Requests that ended in error, and retried attempts.",
                               ("error_type", "model"))
        self.fallbacks = _Counter("nexus_fallbacks_total", "Requests served by a fallback model.",
                                  ("from_model", "to_model"))
        self.cancelled = _Counter("nexus_requests_cancelled_total", "Requests whose client went away.", ("model",))
        self.exclusions = _Counter("nexus_reconciler_exclusions_total", "Candidates removed by a routing stage.",
                                   ("reconciler",))
        self.duration = _Histogram("nexus_request_duration_seconds", "Duration of successful requests.",
                                   ("model", "backend"), LATENCY_BUCKETS)
        self.ttft = _Histogram("nexus_time_to_first_token_seconds",
                               "Time from arrival to the first streamed byte (streams).",
                               ("model", "backend"), TTFT_BUCKETS)
        self.tokens = _Histogram("nexus_tokens_total", "Tokens per request, from the response's usage.",
                                 ("model", "backend", "type"), TOKEN_BUCKETS)
        self.cost = _Histogram("nexus_cost_per_request_usd", "Cost of priced requests in USD.", ("model",),
                               COST_BUCKETS)
        self.health_latency = _Histogram("nexus_backend_latency_seconds", "Latency of successful health checks.",
                                         ("backend",), LATENCY_BUCKETS)
        self.stage_duration = _Histogram("nexus_reconciler_duration_seconds", "Time spent in each routing stage.",
                                         ("reconciler",), STAGE_BUCKETS)
        self.pipeline_duration = _Histogram("nexus_pipeline_duration_seconds", "Time of the whole routing pipeline.",
                                            (), STAGE_BUCKETS)
        self._pipeline_child = self.pipeline_duration.child(())
        # One series per stage, in pipeline order (as ``routed`` gets the timings), each
        # visible from the first scrape.
        self._stage_children: list[list[float]] = []
        for reconciler in gateway.pipeline.reconcilers:
            label = (sanitize_label(reconciler.name),)
            self._stage_children.append(self.stage_duration.child(label))
            self.exclusions.inc(label, 0.0)
        self._recorded: tuple[_Counter | _Histogram, ...] = (
            self.requests, self.errors, self.fallbacks, self.cancelled, self.exclusions, self.duration, self.ttft,
            self.tokens, self.cost, self.health_latency, self.stage_duration, self.pipeline_duration)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # type: ignore[arg-type]  # a collector by duck typing: collect()

    # -- label values ----------------------------------------------------------------------

    def _known_model(self, name: str) -> bool:
        return bool(self._registry.backends_for(name)) or name in self._configured_models

    def _prune(self) -> None:
        """Forget the label values of backends no longer registered and of models no longer
        listed or configured, if the registry changed since the last prune. Called only when
        a new name finds its cap full, so it costs nothing on the request path until then,
        and runs at most once per registry change."""
        registry = self._registry
        if registry.version == self._pruned_version:
            return
        self._pruned_version = registry.version
        self._backend_labels = {i: v for i, v in self._backend_labels.items() if registry.get(i) is not None}
        self._model_labels = {n: v for n, v in self._model_labels.items() if self._known_model(n)}

    def model_label(self, name: str) -> str:
        """``name`` sanitised if the fleet or config knows it, else ``other``."""
        label = self._model_labels.get(name)
        if label is not None:
            return label
        if not self._known_model(name):
            return OTHER  # not cached: a client spraying names must not grow anything
        if len(self._model_labels) >= MAX_MODEL_LABELS:
            self._prune()
            if len(self._model_labels) >= MAX_MODEL_LABELS:
                return OTHER
        label = self._model_labels[name] = sanitize_label(name)
        return label

    def backend_label(self, backend_id: str | None) -> str:
        if backend_id is None:
            return NONE
        label = self._backend_labels.get(backend_id)
        if label is None:
            if len(self._backend_labels) >= MAX_BACKEND_LABELS:
                self._prune()
                if len(self._backend_labels) >= MAX_BACKEND_LABELS:
                    return OTHER
            label = self._backend_labels[backend_id] = sanitize_label(backend_id)
        return label

    # -- recording (event loop, request path) -----------------------------------------------

    def record(self, r: RequestRecord) -> None:
        """A request ended (a ``Gateway.observers`` entry)."""
        model = self.model_label(r.served_model or r.model)
        backend = self.backend_label(r.backend)
        outcome = r.outcome
        self.requests.inc((model, backend, str(r.status) if r.status else NONE, outcome))
        if outcome == "success":
            if r.duration_ms is not None:
                self.duration.observe((model, backend), r.duration_ms / 1000)
            if r.fallback:
                self.fallbacks.inc((self.model_label(r.model), model))
        elif outcome == "cancelled":
            self.cancelled.inc((model,))
        else:
            self.errors.inc((r.error_kind(), model))
        if r.retries > 0:
            self.errors.inc(("retry", model), r.retries)
        if r.stream and r.ttft_ms is not None:
            self.ttft.observe((model, backend), r.ttft_ms / 1000)
        if r.prompt_tokens is not None:
            self.tokens.observe((model, backend, "prompt"), r.prompt_tokens)
        if r.completion_tokens is not None:
            self.tokens.observe((model, backend, "completion"), r.completion_tokens)
        if r.cost_usd is not None and outcome in ("success", "interrupted"):  # served; else only an estimate
            self.cost.observe((model,), r.cost_usd)

    def routed(self, intent: RoutingIntent, timings: list[float], total: float) -> None:
        """The routing pipeline ran once (``Pipeline.observe_run``): ``timings`` are the seconds
        of each stage that ran, in pipeline order; each exclusion names its stage."""
        bounds = STAGE_BUCKETS
        for child, seconds in zip(self._stage_children, timings):
            child[bisect_left(bounds, seconds)] += 1
            child[-1] += seconds
        child = self._pipeline_child
        child[bisect_left(bounds, total)] += 1
        child[-1] += total
        for exclusion in intent.exclusions:
            self.exclusions.inc((sanitize_label(exclusion.reconciler),))

    def backend_latency(self, backend: Backend, seconds: float) -> None:
        """A health check succeeded (``HealthChecker.on_latency``)."""
        self.health_latency.observe((self.backend_label(backend.id),), seconds)

    # -- scraping --------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition (content type :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        for metric in self._recorded:
            yield metric.family()
        yield from self._fleet()
        yield from self._budget()

    def _fleet(self) -> Iterator[Metric]:
        backends = self._registry.all()
        healthy = [b for b in backends if b.healthy]
        yield GaugeMetricFamily("nexus_backends_total", "Registered backends.", value=len(backends))
        yield GaugeMetricFamily("nexus_backends_healthy", "Healthy backends.", value=len(healthy))
        yield GaugeMetricFamily("nexus_models_available", "Distinct models on healthy backends.",
                                value=len({m for b in healthy for m in b.models}))
        yield GaugeMetricFamily("nexus_queue_depth", "Requests waiting in the queue.", value=len(self.gateway.queue))
        pending: dict[str, float] = {}
        worst: dict[str, list[float]] = {}  # label -> [error rate, success rate, TTFT s], worst per label
        error_rate = GaugeMetricFamily("nexus_agent_error_rate", "Backend error rate over the last hour.",
                                       labels=["agent_id"])
        success = GaugeMetricFamily("nexus_agent_success_rate_24h", "Backend success rate over 24 hours.",
                                    labels=["agent_id"])
        ttft = GaugeMetricFamily("nexus_agent_ttft_seconds", "Backend average time to first token, last hour.",
                                 labels=["agent_id"])
        for backend in backends:
            label = self.backend_label(backend.id)
            pending[label] = pending.get(label, 0.0) + backend.pending
            quality = backend.quality
            if label != OTHER and quality.has_history:
                values = [quality.error_rate_1h, quality.success_rate_24h, quality.avg_ttft_ms / 1000]
                seen = worst.get(label)
                if seen is None:
                    worst[label] = values
                else:  # another backend id with the same label value: keep the worst of each
                    seen[:] = [max(seen[0], values[0]), min(seen[1], values[1]), max(seen[2], values[2])]
        for label, (error, ok, seconds) in worst.items():
            error_rate.add_metric([label], error)
            success.add_metric([label], ok)
            ttft.add_metric([label], seconds)
        gauge = GaugeMetricFamily("nexus_pending_requests", "Requests in flight per backend.", labels=["backend"])
        for label, value in pending.items():
            gauge.add_metric([label], value)
        yield from (gauge, error_rate, success, ttft)

    def _budget(self) -> Iterator[Metric]:
        """Budget gauges, only while a monthly limit is set (``gateway.budget.snapshot()``)."""
        budget = self.gateway.budget
        try:
            snap = budget.snapshot()
            if not snap:
                return
            month = [str(snap["billing_month"])]
            values = (
                ("nexus_budget_spending_usd", "Spending this billing month in USD.", snap["current_spending_usd"]),
                ("nexus_budget_utilization_percent", "Spending as a percentage of the monthly limit.",
                 snap["utilization_percent"]),
                ("nexus_budget_status", "Budget status: 0 Normal, 1 SoftLimit, 2 HardLimit.",
                 BUDGET_STATUS.get(str(snap["status"]), 0)),
            )
            families: list[Metric] = []
            for name, doc, value in values:
                family = GaugeMetricFamily(name, doc, labels=["billing_month"])
                family.add_metric(month, float(value))
                families.append(family)
            families.append(GaugeMetricFamily("nexus_budget_limit_usd", "Monthly budget limit in USD.",
                                              value=float(snap["monthly_limit_usd"])))
            reserved = GaugeMetricFamily("nexus_budget_reserved_usd", "USD held by requests in flight.",
                                         labels=["billing_month"])
            reserved.add_metric(month, float(snap["reserved_usd"]))
            events = CounterMetricFamily("nexus_budget_events", "Budget events since start.", labels=["event_type"])
            events.add_metric(["month_rollover"], float(budget.rollovers))
            events.add_metric(["request_refused"], float(budget.refused))
            families += [reserved, events]
        except Exception:  # a broken budget must not take the other metrics down with it
            log.exception("Budget snapshot failed; budget metrics left out of this scrape")
            return
        yield from families
