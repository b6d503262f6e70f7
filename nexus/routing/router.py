"""The router: aliases, the reconciler pipeline, fallbacks, and the order of attempts."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import msgspec

from nexus.config import RoutingConfig, resolve_alias
from nexus.errors import InvalidRequest, ModelNotFound, NexusError, ServiceUnavailable
from nexus.registry import Registry
from nexus.routing.analysis import missing_capabilities
from nexus.routing.intent import Candidate, Reconciler, Requirements, RoutingIntent

log = logging.getLogger("nexus.routing")
_encode = msgspec.json.Encoder().encode


class Pipeline:
    """Reconcilers run in declared ``order`` (ties by name), each timed."""

    def __init__(self, reconcilers: list[Reconciler]) -> None:
        self.reconcilers = sorted(reconcilers, key=lambda r: (r.order, r.name))
        self.stage_seconds: dict[str, float] = {r.name: 0.0 for r in self.reconcilers}
        # Optional observer (metrics), called once after each run with the intent (its
        # exclusions name their stage), the seconds of each stage that ran, in order, and
        # the whole run's seconds. One call per run, not per stage: routing is the hot path.
        self.observe_run: Callable[[RoutingIntent, list[float], float], None] | None = None

    def run(self, intent: RoutingIntent) -> None:
        clock = time.perf_counter
        observe = self.observe_run
        timings: list[float] | None = [] if observe is not None else None
        began = clock()
        for reconciler in self.reconcilers:
            intent._stage = reconciler.name
            started = clock()
            try:
                reconciler.reconcile(intent)
            except Exception:
                # Fail closed: skipping a broken stage could route around a privacy or budget rule.
                log.exception("Routing stage %s failed", reconciler.name)
                raise NexusError(f"Routing stage '{reconciler.name}' failed; see the server log.") from None
            elapsed = clock() - started
            self.stage_seconds[reconciler.name] += elapsed
            if timings is not None:
                timings.append(elapsed)
            if not intent.candidates:
                break
        intent._stage = ""
        if observe is not None and timings is not None:
            observe(intent, timings, clock() - began)


@dataclass(slots=True)
class Attempt:
    """One backend to try, in order."""

    candidate: Candidate
    model: str
    intent: RoutingIntent
    fallback: bool


class RoutePlan:
    """The attempts for one request: the primary's ranked candidates (at most
    ``max_retries + 1``), then each fallback model's, evaluated only when reached."""

    def __init__(self, router: Router, first: RoutingIntent, rest: list[str], fallback: bool) -> None:
        self._router = router
        self.first = first
        self._rest = rest
        self._first_is_fallback = fallback

    def __iter__(self) -> Iterator[Attempt]:
        limit = self._router.config.max_retries + 1
        intent: RoutingIntent | None = self.first
        fallback = self._first_is_fallback
        rest = list(self._rest)
        while intent is not None:
            for candidate in intent.ranked[:limit]:
                yield Attempt(candidate, intent.model, intent, fallback)
            intent = None
            while rest and intent is None:
                first = self.first
                next_intent = self._router.evaluate(first.requested_model, first.primary_model, rest.pop(0),
                                                    first.requirements, first.request_id, first.headers)
                if next_intent.ranked:
                    intent, fallback = next_intent, True


class Unavailable(ServiceUnavailable):
    """No route now, for transient reasons only: the caller may queue the request.

    ``error`` is the 503 to answer when it is not queued; ``retry_in`` is the earliest
    moment (seconds) an exclusion lifts by itself, when one is known.
    """

    def __init__(self, error: ServiceUnavailable, retry_in: float | None) -> None:
        super().__init__(error.message, context=error.context, headers=error.headers)
        self.retry_in = retry_in


class Router:
    def __init__(self, registry: Registry, pipeline: Pipeline, config: RoutingConfig) -> None:
        self.registry = registry
        self.pipeline = pipeline
        self.config = config
        self._candidates: dict[str, list[Candidate]] = {}  # per model, rebuilt when the fleet changes
        self._version = -1

    def candidates_for(self, model: str) -> list[Candidate]:
        """A fresh list of the model's candidates (the objects are shared until the fleet changes)."""
        if self._version != self.registry.version:
            self._candidates.clear()
            self._version = self.registry.version
        cached = self._candidates.get(model)
        if cached is None:
            cached = [Candidate(b, b.models[model]) for b in self.registry.backends_for(model)]
            if cached:
                self._candidates[model] = cached
        return cached[:]

    def evaluate(self, requested: str, primary: str, model: str, requirements: Requirements, request_id: str,
                 headers: Mapping[str, str] | None) -> RoutingIntent:
        """Run the pipeline for ``model``: the alias-resolved ``primary`` or one of its fallbacks."""
        intent = RoutingIntent(
            request_id=request_id,
            requested_model=requested,
            primary_model=primary,
            model=model,
            requirements=requirements,
            candidates=self.candidates_for(model),
            headers=headers,
        )
        if intent.candidates:
            self.pipeline.run(intent)
        return intent

    def plan(
        self,
        requested: str,
        requirements: Requirements,
        *,
        request_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> RoutePlan:
        """Route a request, or raise the error that explains why it cannot be routed."""
        model = resolve_alias(self.config.aliases, requested)
        chain = [model, *self.config.fallbacks.get(model, [])]
        tried: list[RoutingIntent] = []
        for i, candidate_model in enumerate(chain):
            intent = self.evaluate(requested, model, candidate_model, requirements, request_id, headers)
            if intent.ranked:
                if i:
                    log.warning("Using fallback model %s for %s", candidate_model, requested)
                return RoutePlan(self, intent, chain[i + 1 :], fallback=i > 0)
            tried.append(intent)
        raise self._no_route(requested, tried)

    def _no_route(self, requested: str, tried: list[RoutingIntent]) -> NexusError:
        primary = tried[0]
        if len(tried) == 1 and not self.registry.backends_for(primary.model):
            available = ", ".join(self.registry.model_ids()) or "No models available"
            return ModelNotFound(f"Model '{requested}' not found. Available: {available}", param="model")
        exclusions = [e for intent in tried for e in intent.exclusions]
        if exclusions and all(e.kind == "capability" for e in exclusions) and all(
                self.registry.backends_for(intent.model) for intent in tried):
            return self._capability_error(requested, primary)
        context: dict[str, object] = {
            "available_backends": sorted(b.id for b in self.registry.all() if b.healthy),
        }
        for key in ("required_tier", "privacy_zone_required", "budget_status"):
            value = next((i.annotations[key] for i in tried if key in i.annotations), None)
            if value is not None:
                context[key] = value
        waits = [e.retry_in for e in exclusions if e.retry_in is not None]
        if waits:
            context["eta_seconds"] = max(1, round(min(waits)))
        if len(tried) > 1:
            context["models_tried"] = [intent.model for intent in tried]
            message = f"No backend could serve '{requested}' or any of its fallbacks: {context['models_tried']}"
        else:
            message = f"No backend can serve model '{requested}' now"
        final = [e for e in exclusions if e.kind != "unavailable"]
        if final and len(final) == len(exclusions):  # policy alone refused: say which rule, once
            message += ": " + "; ".join(dict.fromkeys(e.reason for e in final[:3]))
        details = [
            {"backend": e.backend, "reconciler": e.reconciler, "reason": e.reason, "suggested_action": e.suggested_action}
            for e in exclusions
        ]
        headers = {}
        if details:
            stages = sorted({e.reconciler for e in exclusions})
            headers = {
                "X-Nexus-Rejection-Reasons": f"{len(details)} backends rejected by {', '.join(stages)}",
                "X-Nexus-Rejection-Details": _encode(details).decode(),
            }
        log.warning("Routing failure for %s: %s", requested, message)
        error = ServiceUnavailable(message, context=context, headers=headers)
        if final and all(e.reconciler == "budget" for e in exclusions):
            error.code = "budget_exceeded"
        if any(e.kind == "unavailable" for e in exclusions):
            # Some backend that policy allows is held back only for a transient reason
            # (unhealthy, loading, at capacity, asked to wait): the request may wait in the
            # queue for it (CONTRACT §4). Policy exclusions are final, so they alone never queue.
            return Unavailable(error, min(waits) if waits else None)
        return error

    def _capability_error(self, requested: str, intent: RoutingIntent) -> NexusError:
        req = intent.requirements
        missing = sorted(
            {word for b in self.registry.backends_for(intent.model) for word in missing_capabilities(req, b.models[intent.model])}
        )
        if missing == ["context_length"]:
            return InvalidRequest(
                f"This request (about {req.estimated_tokens} tokens) exceeds the context length "
                f"of every backend serving '{requested}'.",
                param="messages",
                code="context_length_exceeded",
            )
        return InvalidRequest(f"Model '{requested}' lacks required capabilities: {missing}", param="model")
