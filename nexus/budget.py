"""Spend accounting and the monthly budget (reference §5.9, fixed so that it holds).

* **Accounting.** Every request served by a cloud backend is priced: from the response's
  ``usage`` when it has one (for streams, the final usage chunk), else from counting
  the prompt and the streamed text with the backend's tokenizer. A cloud model with no
  price is counted as *unpriced* (``/v1/stats`` lists them), never as free. Local
  backends cost ``local_usd_per_gpu_second`` per second (0 by default) and do not count
  against the limit.
* **Reservation.** Before a request is sent to a cloud backend, its worst case (prompt
  tokens x input price + ``max_tokens`` -- or ``default_reserved_output_tokens`` -- x output price)
  is held in the state store, atomically against the limit; the real cost replaces the
  hold when the request ends. So concurrent requests, even from several gateways
  sharing a Redis store, cannot pass the limit by more than the holds that were granted
  -- which are, by construction, within it.
* **Status.** ``Normal`` below ``soft_limit_percent``, ``SoftLimit`` from there (cloud
  scores are halved), ``HardLimit`` at 100 %, where ``hard_limit_action`` applies:
  ``warn`` (log only), ``block_cloud`` (cloud excluded, local keeps serving) or
  ``block_all``. A stream that crosses the limit finishes; the next request is refused.
* **Month.** The UTC calendar month; the store keeps one ledger per ``YYYY-MM``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from nexus.adapters.base import heuristic_tokens
from nexus.config import BudgetConfig
from nexus.errors import ServiceUnavailable
from nexus.pricing import PriceTable
from nexus.record import RequestRecord
from nexus.routing.analysis import MessagePeek
from nexus.routing.router import Attempt
from nexus.state.base import StateStore

log = logging.getLogger("nexus.budget")
NORMAL, SOFT, HARD = "Normal", "SoftLimit", "HardLimit"
_ACTIONS = {"warn": "Warn", "block_cloud": "BlockCloud", "block_all": "BlockAll"}
_ids = itertools.count(1)
_ID_PREFIX = secrets.token_hex(6)


def usd(amount: float) -> str:
    """Dollars for messages: cents for large amounts, enough digits for small ones."""
    if amount >= 1 or amount == 0:
        return f"${amount:,.2f}"
    whole, _, decimals = f"{amount:.6f}".partition(".")
    return f"${whole}.{decimals.rstrip('0').ljust(2, '0')}"


def month_of(timestamp: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(timestamp))


def next_month(month: str) -> str:
    year, mon = (int(part) for part in month.split("-"))
    return f"{year + mon // 12:04d}-{mon % 12 + 1:02d}"


def _heuristic(model: str, text: str) -> int:
    return heuristic_tokens(text)


# -- prompt text, for exact counts (decoded only for priced cloud requests) -------------------

class _PromptPeek(msgspec.Struct):
    messages: list[MessagePeek] = []
    prompt: msgspec.Raw = msgspec.Raw(b"")
    input: msgspec.Raw = msgspec.Raw(b"")


_peek_prompt = msgspec.json.Decoder(_PromptPeek).decode
_strings = msgspec.json.Decoder(str | list[str]).decode


def prompt_text(body: bytes) -> str:
    """The text a request sends: message contents, or ``prompt``/``input`` strings."""
    try:
        peek = _peek_prompt(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""
    parts: list[str] = []
    for message in peek.messages:
        content = message.content
        if isinstance(content, str):
            parts.append(content)
        elif content:
            parts.extend(p.text for p in content if p.text)
    for raw in (peek.prompt, peek.input):
        if raw:
            try:
                value = _strings(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):  # token arrays: about one token per int
                parts.append("x" * (4 * bytes(raw).count(b",") + 4))
                continue
            parts.extend([value] if isinstance(value, str) else value)
    return "\n".join(parts)


@dataclass(slots=True)
class Reservation:
    id: str
    month: str
    amount: float
    prompt_tokens: int  # counted at admission; used when the response reports no usage
    model: str  # what the hold was priced for


class BudgetRefused(ServiceUnavailable):
    """The budget forbids this request (never queued: waiting does not lower spend)."""


class Budget:
    """One per gateway; shared by the budget stage, the proxy, stats, metrics and the loop."""

    def __init__(self, config: BudgetConfig, store: StateStore, prices: PriceTable,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.limit = config.monthly_limit_usd
        self.store = store
        self.prices = prices
        self.clock = clock
        self.month = month_of(clock())
        self.spent = 0.0  # this month, every gateway sharing the store (refreshed by the loop)
        self.reserved = 0.0
        self.last_reconciliation = clock()
        self.rollovers = 0
        self.unpriced: Counter[str] = Counter()  # cloud model -> requests served with no price
        self.local_cost_usd = 0.0  # energy cost of local requests since start
        self.refused = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._live: dict[str, Reservation] = {}  # holds of requests still running, kept young
        self._reads: list[list[float]] = []  # [spent, reserved] changes per refresh() in flight

    # -- status -------------------------------------------------------------------------------

    def utilization(self) -> float:
        if not self.limit:
            return 0.0 if self.limit is None or self.spent <= 0 else 100.0
        return self.spent / self.limit * 100

    def status(self) -> str:
        if self.limit is None:
            return NORMAL
        used = self.utilization()
        if used >= 100:
            return HARD
        return SOFT if used >= self.config.soft_limit_percent else NORMAL

    def headers(self) -> dict[str, str]:
        """``X-Nexus-Budget-*`` (CONTRACT §3): only when the status is not Normal."""
        status = self.status()
        if status == NORMAL or self.limit is None:
            return {}
        return {
            "X-Nexus-Budget-Status": status,
            "X-Nexus-Budget-Utilization": f"{self.utilization():.1f}",
            "X-Nexus-Budget-Remaining": f"{max(self.limit - self.spent, 0.0):.4f}",
        }

    # -- estimates ----------------------------------------------------------------------------

    def estimate(self, model: str, prompt_tokens: int, max_tokens: int | None) -> float | None:
        """Worst-case cost of a request to a cloud backend serving ``model``; None if unpriced."""
        price = self.prices.price(model)
        if price is None:
            return None
        output = self.config.default_reserved_output_tokens if max_tokens is None else max_tokens
        return price.cost(prompt_tokens, output)

    def would_exceed(self, estimate: float) -> bool:
        return self.limit is not None and self.spent + self.reserved + estimate > self.limit

    # -- admission ----------------------------------------------------------------------------

    async def hold(self, attempt: Attempt, record: RequestRecord, body: bytes) -> bool:
        """Called before each attempt is sent. For a priced cloud backend, hold the request's
        worst case in the store, atomically against the limit (a hold already taken for the
        same model is reused; one for another model is released first). Returns False when
        the store refused the hold: the proxy then skips this attempt.

        Also resets ``record.cost_usd`` to this attempt's own figure (the hold, or nothing)."""
        record.cost_usd = record.cost_source = None
        backend = attempt.candidate.backend
        if not backend.cloud:
            return True
        held = record.reservation
        if isinstance(held, Reservation) and held.model == attempt.model:
            record.cost_usd, record.cost_source = held.amount, "estimate"
            return True
        text = prompt_text(body)
        count = backend.adapter.count_tokens
        # tiktoken runs at a few MB/s: a very long prompt is counted off the event loop.
        tokens = count(attempt.model, text) if len(text) < 50_000 else await asyncio.to_thread(count, attempt.model, text)
        amount = self.estimate(attempt.model, tokens, attempt.intent.requirements.max_tokens)
        if amount is None:
            return True  # unpriced: served, counted as unpriced when it ends
        self.release(record)
        self._roll_month()
        reservation = Reservation(f"{_ID_PREFIX}-{next(_ids)}", self.month, amount, tokens, attempt.model)
        enforce = self.limit if self.config.hard_limit_action != "warn" else None
        try:
            granted = await self.store.reserve(reservation.month, reservation.id, amount, enforce)
        except Exception as exc:  # the store is down: enforce by refusing, or (warn) serve unrecorded
            log.error("Budget state store unavailable (%s): %r", self.store.kind, exc)
            if enforce is None:
                return True
            raise ServiceUnavailable(
                f"The budget cannot be checked: its {self.store.kind} state store is unavailable",
                code="budget_store_unavailable", headers={"Retry-After": "5"}) from None
        if not granted:
            await self.refresh()
            return False
        if reservation.month == self.month:
            self._change(0.0, amount)
        self._live[reservation.id] = reservation
        record.reservation = reservation
        record.cost_usd, record.cost_source = amount, "estimate"  # until the response says better
        return True

    def release(self, record: RequestRecord, actual: float = 0.0) -> None:
        """Drop the request's hold (if any), adding ``actual`` to the spend of its month."""
        held = record.reservation
        if not isinstance(held, Reservation):
            return
        record.reservation = None
        self._live.pop(held.id, None)
        if held.month == self.month:
            self._change(actual, -held.amount)
        self._spawn(self.store.settle(held.month, held.id, actual))

    def refuse(self, model: str) -> BudgetRefused:
        """The answer when every attempt was a cloud backend whose hold the store refused."""
        self.refused += 1
        return BudgetRefused(
            f"Monthly budget of {usd(self.limit or 0.0)} would be exceeded by this request to "
            f"'{model}' (spent {usd(self.spent)}, held by requests in flight {usd(self.reserved)})",
            code="budget_exceeded",
            context={"available_backends": [], "budget_status": self.status(),
                     "budget_remaining_usd": round(max((self.limit or 0.0) - self.spent, 0.0), 4)},
        )

    # -- accounting ---------------------------------------------------------------------------

    def price_response(self, attempt: Attempt, record: RequestRecord, seconds: float,
                       streamed_text: str | None = None) -> None:
        """Set ``record.cost_usd`` for the response of ``attempt`` (called by the proxy)."""
        backend = attempt.candidate.backend
        if not backend.cloud:
            if self.prices.local_usd_per_second:
                record.cost_usd = round(seconds * self.prices.local_usd_per_second, 8)
                record.cost_source = "energy"
            return
        price = self.prices.price(attempt.model)
        if price is None:
            self.prices.warn_unpriced(attempt.model, backend.id)
            record.cost_usd, record.cost_source = None, "unpriced"
            return
        if record.completion_tokens is None and streamed_text is not None:
            # Counted on the event loop as the stream ends: exact up to 50,000 characters (a few
            # ms of tiktoken at most); beyond, upstream's heuristic, which errs high.
            count = backend.adapter.count_tokens if len(streamed_text) <= 50_000 else _heuristic
            record.completion_tokens = count(attempt.model, streamed_text)
            if record.prompt_tokens is None and isinstance(record.reservation, Reservation):
                record.prompt_tokens = record.reservation.prompt_tokens
            record.cost_source = "counted"
        elif record.completion_tokens is not None:
            record.cost_source = "usage"
        else:
            return  # no usage and nothing counted: keep the estimate
        record.cost_usd = price.cost(record.prompt_tokens or 0, record.completion_tokens or 0)

    def settle(self, record: RequestRecord) -> None:
        """Observer: the request ended; its hold (if any) becomes what it really cost.

        Charged: a cloud answer that was delivered, in full or in part (a cut or cancelled
        stream that produced text). Not charged: failures, a backend's 4xx, local backends
        (their energy cost is reported apart)."""
        cloud = record.backend_type == "cloud"
        served = cloud and (record.outcome in ("success", "interrupted") or bool(record.completion_tokens))
        if served and record.cost_source == "unpriced" and record.served_model:
            self.unpriced[record.served_model] += 1
        if not cloud:
            if record.cost_usd:
                self.local_cost_usd += record.cost_usd
            self.release(record)
            return
        actual = (record.cost_usd or 0.0) if served and record.cost_source != "unpriced" else 0.0
        if not served:
            record.cost_usd, record.cost_source = None, None  # nothing to pay, nothing to show
        if isinstance(record.reservation, Reservation):
            self.release(record, actual)
        elif actual > 0:  # priced but never held (the store was down under "warn")
            self._roll_month()
            self._change(actual, 0.0)
            self._spawn(self.store.settle(self.month, "", actual))

    def _change(self, spent: float, reserved: float) -> None:
        """This gateway's own change to the month's totals, applied to the cached view at once."""
        self.spent += spent
        self.reserved = max(self.reserved + reserved, 0.0)
        for changes in self._reads:
            changes[0] += spent
            changes[1] += reserved

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("Could not record spend in the state store: %r", task.exception())

    # -- the loop -----------------------------------------------------------------------------

    def _roll_month(self) -> None:
        month = month_of(self.clock())
        if month != self.month:
            log.info("Budget reset: new billing cycle started", extra={"billing_month": month,
                                                                       "previous_month": self.month})
            self.month, self.spent, self.reserved = month, 0.0, 0.0
            self.rollovers += 1

    async def refresh(self) -> None:
        """Totals from the store (every gateway's spend), month rollover, gauges' inputs."""
        self._roll_month()
        changes = [0.0, 0.0]  # this gateway's own changes while the read is in flight
        self._reads.append(changes)
        try:
            spent, reserved = await self.store.totals(self.month)
        finally:
            self._reads.remove(changes)
        # Holds and settlements made while the read was in flight may be missing from it: add
        # them back (counting one twice errs on the safe side; missing one would not).
        self.spent = spent + changes[0]
        self.reserved = max(reserved + changes[1], 0.0)
        self.last_reconciliation = self.clock()

    async def run(self, max_request_seconds: float) -> None:
        """Every ``reconciliation_interval_secs``: reclaim holds of dead gateways, refresh."""
        while True:
            try:
                await self.keep_holds_young()
                moved = await self.store.reclaim(max(2 * max_request_seconds, 600.0))
                if moved:
                    log.warning("Settled $%.4f held by requests of a gateway that stopped", moved)
                await self.refresh()
            except Exception as exc:  # a store hiccup must not end the loop
                log.error("Budget reconciliation failed: %r", exc)
            await asyncio.sleep(self.config.reconciliation_interval_secs)

    async def keep_holds_young(self) -> None:
        """Touch the holds of requests still running (a stream may outlive the reclaim age)."""
        by_month: dict[str, list[str]] = {}
        for reservation in self._live.values():
            by_month.setdefault(reservation.month, []).append(reservation.id)
        for month, ids in by_month.items():
            await self.store.touch(month, ids)

    async def drain(self) -> None:
        """Wait for queued settlements (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def spend_snapshot(self) -> dict[str, object]:
        """``/v1/stats.spend``: accounting, shown whether or not a limit is set."""
        return {
            "billing_month": self.month,
            "current_spending_usd": round(self.spent, 6),
            "reserved_usd": round(self.reserved, 6),
            "unpriced_requests": dict(self.unpriced),
            "local_energy_usd": round(self.local_cost_usd, 6),
        }

    def snapshot(self) -> dict[str, object] | None:
        """``/v1/stats.budget`` (reference §2.6), only when a monthly limit is set."""
        if self.limit is None:
            return None
        return {
            "current_spending_usd": round(self.spent, 6),
            "reserved_usd": round(self.reserved, 6),
            "monthly_limit_usd": self.limit,
            "utilization_percent": round(self.utilization(), 2),
            "status": self.status(),
            "billing_month": self.month,
            "last_reconciliation": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_reconciliation)),
            "soft_limit_threshold": self.config.soft_limit_percent,
            "hard_limit_action": _ACTIONS[self.config.hard_limit_action],
            "next_reset_date": f"{next_month(self.month)}-01",
            "refused_requests": self.refused,
        }
