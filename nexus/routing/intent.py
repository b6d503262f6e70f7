"""The routing intent that reconcilers read and narrow, and the reconciler protocol."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import msgspec

from nexus.registry import Backend, ModelInfo

if TYPE_CHECKING:
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


class Candidate:
    """A backend that lists the model, as reconcilers see it."""

    __slots__ = ("backend", "model")

    def __init__(self, backend: Backend, model: ModelInfo) -> None:
        self.backend = backend
        self.model = model

    @property
    def id(self) -> str:
        return self.backend.id

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def type(self) -> str:
        return self.backend.type_name

    @property
    def zone(self) -> str:
        return self.backend.zone

    @property
    def tier(self) -> int:
        return self.backend.tier

    @property
    def priority(self) -> int:
        return self.backend.priority

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


class RoutingIntent:
    """One routing decision in progress. Reconcilers may only narrow it.

    ``candidates`` are the backends still eligible; ``ranked`` is set by the scheduling
    stage (best first; retries walk it in order).
    """

    __slots__ = (
        "request_id",
        "requested_model",
        "model",
        "requirements",
        "headers",
        "candidates",
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
    ) -> None:
        self.request_id = request_id
        self.requested_model = requested_model
        self.model = model
        self.requirements = requirements
        self.headers: Mapping[str, str] = headers or {}
        self.candidates = candidates
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
    ) -> None:
        """Remove a candidate, recording which reconciler did it and why.

        ``kind`` tells the router how to answer when nothing is left: ``capability``
        (the request can never be served: 400), ``unavailable`` (transient: 503,
        may be queued), ``policy`` (privacy, tier, budget: 503, never queued).
        """
        before = len(self.candidates)
        self.candidates = [c for c in self.candidates if c.backend.id != backend_id]
        if self.ranked:  # a stage after scheduling narrows the ranking too
            self.ranked = [c for c in self.ranked if c.backend.id != backend_id]
        if len(self.candidates) != before:
            self.exclusions.append(
                Exclusion(
                    backend=backend_id,
                    reconciler=self._stage,
                    reason=reason,
                    suggested_action=suggested_action,
                    kind=kind,
                )
            )

    def annotate(self, key: str, value: Any) -> None:
        self.annotations[key] = value


@dataclass
class ReconcilerContext:
    """What a reconciler class receives when it is built (once, at start-up)."""

    config: Config
    registry: Registry
    settings: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Reconciler(Protocol):
    """A routing stage. ``reconcile`` is synchronous and must do no I/O."""

    name: str
    order: int

    def reconcile(self, intent: RoutingIntent) -> None: ...
