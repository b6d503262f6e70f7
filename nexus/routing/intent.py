"""The routing intent that reconcilers read and narrow, and the reconciler protocol."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import msgspec

from nexus.registry import Backend, ModelInfo

if TYPE_CHECKING:
    from nexus.budget import Budget
    from nexus.config import Config
    from nexus.registry import Registry

ExclusionKind = Literal["capability", "unavailable", "policy"]


class Requirements(msgspec.Struct, kw_only=True, frozen=True):
    """What a request needs from a backend (reference §5.2)."""

    vision: bool = False
    tools: bool = False
    json_mode: bool = False
    embeddings: bool = False
    estimated_tokens: int = 0
    stream: bool = False
    max_tokens: int | None = None  # what the client capped its output at (0: no output, embeddings)


class Candidate:
    """A backend that lists the model, as reconcilers see it."""

    __slots__ = ("backend", "model", "id", "name", "zone", "tier", "priority")

    def __init__(self, backend: Backend, model: ModelInfo) -> None:
        self.backend = backend
        self.model = model
        # Fixed for the backend's lifetime: copied so stages read them without indirection.
        self.id = backend.id
        self.name = backend.name
        self.zone = backend.zone
        self.tier = backend.tier
        self.priority = backend.priority

    @property
    def type(self) -> str:
        return self.backend.type_name

    @property
    def status(self) -> str:
        return self.backend.status.value

    def __repr__(self) -> str:
        return f"Candidate({self.id!r})"


class Exclusion(msgspec.Struct, kw_only=True, frozen=True):
    backend: str
    reconciler: str
    reason: str
    suggested_action: str | None = None
    kind: ExclusionKind = "policy"
    retry_in: float | None = None  # seconds until this exclusion lifts by itself, when known


class RoutingIntent:
    """One routing decision in progress. Reconcilers may only narrow it.

    ``candidates`` are the backends still eligible; ``ranked`` is set by the scheduling
    stage (best first; retries walk it in order).
    """

    __slots__ = (
        "request_id",
        "requested_model",
        "primary_model",
        "model",
        "requirements",
        "headers",
        "_candidates",
        "_known",
        "_excluded",
        "exclusions",
        "annotations",
        "ranked",
        "route_reason",
        "_stage",
    )

    def __init__(
        self,
        *,
        request_id: str,
        requested_model: str,
        model: str,
        requirements: Requirements,
        candidates: list[Candidate],
        headers: Mapping[str, str] | None = None,
        primary_model: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.requested_model = requested_model  # as the client sent it
        self.primary_model = primary_model or model  # after aliases, before fallbacks
        self.model = model  # the model being evaluated (the primary or a fallback)
        self.requirements = requirements
        self.headers: Mapping[str, str] = headers or {}
        self._candidates = candidates
        self._known: Collection[str] | None = None  # ids of the initial candidates, built on first exclusion
        self._excluded: set[str] = set()
        self.exclusions: list[Exclusion] = []
        self.annotations: dict[str, Any] = {}
        self.ranked: list[Candidate] = []
        self.route_reason = ""
        self._stage = ""

    def exclude(
        self,
        backend_id: str,
        reason: str,
        suggested_action: str | None = None,
        *,
        kind: ExclusionKind = "policy",
        retry_in: float | None = None,
    ) -> None:
        """Remove a candidate, recording which reconciler did it and why.

        ``kind`` tells the router how to answer when nothing is left: ``capability``
        (the request can never be served: 400), ``unavailable`` (transient: 503,
        may be queued), ``policy`` (privacy, tier, budget: 503, never queued).
        """
        if self._known is None:
            self._known = {c.id for c in self._candidates}
        if backend_id in self._excluded or backend_id not in self._known:
            return
        self._excluded.add(backend_id)
        if self.ranked:  # a stage after scheduling narrows the ranking too
            self.ranked = [c for c in self.ranked if c.id != backend_id]
        self.exclusions.append(
            Exclusion(
                backend=backend_id,
                reconciler=self._stage,
                reason=reason,
                suggested_action=suggested_action,
                kind=kind,
                retry_in=retry_in,
            )
        )

    @property
    def candidates(self) -> list[Candidate]:
        """The candidates not excluded so far (a fresh list after each exclusion, so a
        stage may exclude while iterating what it read)."""
        if self._excluded and len(self._candidates) + len(self._excluded) > len(self._known or ()):
            excluded = self._excluded
            self._candidates = [c for c in self._candidates if c.id not in excluded]
        return self._candidates

    def annotate(self, key: str, value: Any) -> None:
        self.annotations[key] = value


@dataclass
class ReconcilerContext:
    """What a reconciler class receives when it is built (once, at start-up)."""

    config: Config
    registry: Registry
    settings: Mapping[str, Any] = field(default_factory=dict)
    budget: Budget | None = None  # the gateway's budget, for the budget stage


@runtime_checkable
class Reconciler(Protocol):
    """A routing stage. ``reconcile`` is synchronous and must do no I/O."""

    name: str
    order: int

    def reconcile(self, intent: RoutingIntent) -> None: ...
