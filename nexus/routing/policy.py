"""Privacy zones and capability tiers (reference §5.10, §5.11; CONTRACT §4, §10).

``[[routing.policies]]`` are matched by glob in declaration order, first match wins.
The policy that binds a request is the strictest of the policies of the model the
client asked for (after aliases) and of the model being evaluated (a fallback), so a
private model never falls back onto an open backend. Client headers never relax privacy.
"""

from __future__ import annotations

import time

from nexus.config import PolicyConfig
from nexus.routing.glob import compile_glob
from nexus.routing.intent import ReconcilerContext, RoutingIntent

RESTRICTED = "restricted"


class Policies:
    """Compiled policies with a per-model cache (policies never change while running)."""

    def __init__(self, policies: list[PolicyConfig]) -> None:
        self._compiled = [(compile_glob(p.model_pattern), p) for p in policies]
        self._cache: dict[str, PolicyConfig | None] = {}
        self._binding: dict[tuple[str, str], tuple[bool, int | None]] = {}

    def __bool__(self) -> bool:
        return bool(self._compiled)

    def match(self, model: str) -> PolicyConfig | None:
        try:
            return self._cache[model]
        except KeyError:
            found = next((p for pattern, p in self._compiled if pattern.match(model)), None)
            if len(self._cache) < 100_000:  # only models some backend lists get here; a cap anyway
                self._cache[model] = found
            return found

    def binding(self, intent: RoutingIntent) -> tuple[bool, int | None]:
        """(privacy restricted?, minimum tier) for this evaluation, strictest of both models."""
        key = (intent.primary_model, intent.model)
        try:
            return self._binding[key]
        except KeyError:
            pass
        restricted, min_tier = False, None
        for model in {intent.primary_model, intent.model}:
            policy = self.match(model)
            if policy is None:
                continue
            restricted = restricted or policy.privacy == RESTRICTED
            if policy.min_tier is not None:
                min_tier = max(min_tier or 0, policy.min_tier)
        if len(self._binding) < 100_000:
            self._binding[key] = (restricted, min_tier)
        return restricted, min_tier


class Privacy:
    """Order 300: a restricted policy excludes every ``open`` backend, whatever their health."""

    name = "privacy"
    order = 300

    def __init__(self, context: ReconcilerContext) -> None:
        self.policies = Policies(context.config.routing.policies)

    def reconcile(self, intent: RoutingIntent) -> None:
        if not self.policies:
            return
        restricted, _ = self.policies.binding(intent)
        if not restricted:
            return
        intent.annotate("privacy_zone_required", RESTRICTED)
        intent.annotate("route_reason", "privacy-requirement")
        for candidate in intent.candidates[:]:
            if candidate.zone != RESTRICTED:
                intent.exclude(
                    candidate.id,
                    f"Backend privacy zone {candidate.zone} violates the restricted policy for model '{intent.model}'",
                    f"Serve '{intent.model}' from a backend in the restricted zone, or change the policy",
                    kind="policy",
                )


def flexible(intent: RoutingIntent) -> bool:
    """Tier mode from the request (upstream §2.11): ``X-Nexus-Strict`` (any value) wins;
    otherwise exactly ``X-Nexus-Flexible: true`` is flexible; anything else is strict."""
    headers = intent.headers
    if "X-Nexus-Strict" in headers:
        return False
    return headers.get("X-Nexus-Flexible") == "true"


class Tiers:
    """Order 500: ``min_tier`` of the binding policy.

    Strict (default): never below ``min_tier``. Flexible: backends at or above
    ``min_tier`` are preferred; only when none of them can serve now (healthy, below its
    concurrency cap, not asking to wait) may a lower tier serve, and the route reason
    is then ``capacity-overflow``.
    """

    name = "tier"
    order = 500

    def __init__(self, context: ReconcilerContext) -> None:
        self.policies = Policies(context.config.routing.policies)

    def reconcile(self, intent: RoutingIntent) -> None:
        if not self.policies:
            return
        _, min_tier = self.policies.binding(intent)
        if min_tier is None:
            return
        intent.annotate("required_tier", min_tier)
        below = [c for c in intent.candidates if c.tier < min_tier]
        if not below:
            return
        if flexible(intent):
            now = time.monotonic()
            if not any(c.backend.can_serve_now(now) for c in intent.candidates if c.tier >= min_tier):
                intent.annotate("route_reason", "capacity-overflow")
                return
        for candidate in below:
            intent.exclude(
                candidate.id,
                f"Backend tier {candidate.tier} is below the minimum tier {min_tier} for model '{intent.model}'",
                "Use a backend of a higher tier, or send X-Nexus-Flexible: true to allow overflow",
                kind="policy",
            )

