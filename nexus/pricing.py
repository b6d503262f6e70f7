"""Per-model prices, in USD per million tokens, and the cost of one request.

The built-in table holds list prices of the major cloud APIs as published on their
pricing pages (checked 2026-12; providers change them, so ``[routing.budget.prices]``
overrides or extends any entry). A dated snapshot (``gpt-4o-2024-08-06``) or a
fine-tune (``ft:gpt-4o-mini:org::id``) is priced as its base model: the longest table key
that the id starts with, followed by ``-``, ``:`` or ``@``.

Local backends cost ``local_usd_per_gpu_second`` per second of backend time (0 by
default), an honest way to compare local energy with cloud prices. Nexus cannot see a
GPU's utilisation, so "GPU-seconds" is the request's wall time on the backend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nexus.config import BudgetConfig

log = logging.getLogger("nexus.budget")


@dataclass(frozen=True, slots=True)
class Price:
    input: float  # USD per million prompt tokens
    output: float  # USD per million completion tokens
    cached_input: float | None = None

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        cached = min(cached_tokens, prompt_tokens) if self.cached_input is not None else 0
        return ((prompt_tokens - cached) * self.input + cached * (self.cached_input or 0.0)
                + completion_tokens * self.output) / 1_000_000


_P = Price
BUILT_IN: dict[str, Price] = {
    # OpenAI
    "gpt-5": _P(1.25, 10.0, 0.125), "gpt-5-mini": _P(0.25, 2.0, 0.025), "gpt-5-nano": _P(0.05, 0.40, 0.005),
    "gpt-4.1": _P(2.0, 8.0, 0.50), "gpt-4.1-mini": _P(0.40, 1.60, 0.10), "gpt-4.1-nano": _P(0.10, 0.40, 0.025),
    "gpt-4o": _P(2.50, 10.0, 1.25), "gpt-4o-mini": _P(0.15, 0.60, 0.075),
    "o1": _P(15.0, 60.0, 7.50), "o1-mini": _P(1.10, 4.40, 0.55), "o3": _P(2.0, 8.0, 0.50),
    "o3-mini": _P(1.10, 4.40, 0.55), "o4-mini": _P(1.10, 4.40, 0.275),
    "gpt-4-turbo": _P(10.0, 30.0), "gpt-4": _P(30.0, 60.0), "gpt-3.5-turbo": _P(0.50, 1.50),
    "text-embedding-3-small": _P(0.02, 0.0), "text-embedding-3-large": _P(0.13, 0.0),
    "text-embedding-ada-002": _P(0.10, 0.0),
    # Anthropic
    "claude-opus-4": _P(15.0, 75.0, 1.50), "claude-sonnet-4": _P(3.0, 15.0, 0.30),
    "claude-3-7-sonnet": _P(3.0, 15.0, 0.30), "claude-3-5-sonnet": _P(3.0, 15.0, 0.30),
    "claude-3-5-haiku": _P(0.80, 4.0, 0.08), "claude-3-opus": _P(15.0, 75.0, 1.50),
    "claude-3-haiku": _P(0.25, 1.25, 0.03),
    # Google
    "gemini-2.5-pro": _P(1.25, 10.0, 0.31), "gemini-2.5-flash": _P(0.30, 2.50, 0.075),
    "gemini-2.0-flash": _P(0.10, 0.40, 0.025), "gemini-1.5-pro": _P(1.25, 5.0), "gemini-1.5-flash": _P(0.075, 0.30),
}
_SEPARATORS = ("-", ":", "@")


class PriceTable:
    """The built-in prices with the config's overrides; lookups are cached per model id."""

    def __init__(self, config: BudgetConfig) -> None:
        self.prices = dict(BUILT_IN)
        for model, p in config.prices.items():
            self.prices[model] = Price(p.input, p.output, p.cached_input)
        self.local_usd_per_second = config.local_usd_per_gpu_second
        self._cache: dict[str, Price | None] = {}
        self._warned: set[str] = set()

    def price(self, model: str) -> Price | None:
        """The price of ``model``; ``None`` when neither the table nor the config knows it."""
        try:
            return self._cache[model]
        except KeyError:
            pass
        found = self.prices.get(model)
        if found is None:
            base = model.removeprefix("ft:")
            for key in sorted(self.prices, key=len, reverse=True):
                if base.startswith(key) and (len(base) == len(key) or base[len(key)] in _SEPARATORS):
                    found = self.prices[key]
                    break
        if len(self._cache) < 10_000:  # model ids come from clients: bound the cache
            self._cache[model] = found
        return found

    def warn_unpriced(self, model: str, backend: str) -> None:
        """Once per model: a cloud model with no price is counted as unpriced, never as free."""
        if model not in self._warned and len(self._warned) < 1000:
            self._warned.add(model)
            log.warning("No price for cloud model %r (backend %s): its requests are counted as unpriced; "
                        "add it under [routing.budget.prices]", model, backend)
