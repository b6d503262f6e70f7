"""Order 400: the monthly budget (reference §5.9).

At the soft limit, cloud candidates' smart scores are halved (local is preferred; cloud
still serves when it is the only choice). At the hard limit, ``block_cloud`` excludes
cloud candidates and ``block_all`` every candidate. Before the hard limit, a cloud
candidate whose worst-case cost would not fit in what is left is excluded too (the
reservation at admission is the exact check; this one only avoids choosing a backend
that the reservation would refuse). Budget exclusions are of kind ``policy``: the
request gets a 503 at once, it is never queued.
"""

from __future__ import annotations

from nexus.budget import HARD, SOFT, usd
from nexus.routing.intent import ReconcilerContext, RoutingIntent


class BudgetStage:
    name = "budget"
    order = 400

    def __init__(self, context: ReconcilerContext) -> None:
        self.budget = context.budget

    def reconcile(self, intent: RoutingIntent) -> None:
        budget = self.budget
        if budget is None or budget.limit is None:
            return
        status = budget.status()
        if status == SOFT:
            intent.annotate("cloud_score_factor", 0.5)
        action = budget.config.hard_limit_action
        if action == "warn":
            return
        intent.annotate("budget_status", status)
        req = intent.requirements
        for candidate in intent.candidates:
            if status == HARD and action == "block_all":
                reason = f"Monthly budget exhausted ({budget.utilization():.0f}% of {usd(budget.limit)}); all backends blocked"
            elif not candidate.backend.cloud:
                continue
            elif status == HARD:
                reason = f"Monthly budget exhausted ({budget.utilization():.0f}% of {usd(budget.limit)}); cloud blocked"
            else:
                estimate = budget.estimate(intent.model, int(req.estimated_tokens * 1.15) or 1, req.max_tokens)
                if estimate is None or not budget.would_exceed(estimate):
                    continue
                reason = f"This request (up to {usd(estimate)}) would exceed the monthly budget of {usd(budget.limit)}"
            intent.exclude(candidate.id, reason, "Raise routing.budget.monthly_limit_usd or wait for next month",
                           kind="policy")
