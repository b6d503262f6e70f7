"""Dashboard panels contributed by plugins (hook ``register_dashboard_panels``).

A panel is a title plus either a jinja2 template string or a callable. Both get the same
data the page is drawn from (``stats``, ``backends``, ``models``, ``history``, ``budget``).
Templates are rendered with autoescaping on; a callable's result is escaped too unless it
is :class:`markupsafe.Markup` -- so a plugin has to say explicitly that its string is HTML,
and a value it forgot to escape can never inject script into the page.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

PanelRender = Callable[[Mapping[str, Any]], str]


@dataclass(frozen=True)
class DashboardPanel:
    """One extra section of the dashboard, rendered when the page is served."""

    title: str
    template: str | None = None  # jinja2 source, autoescaped
    render: PanelRender | None = None  # returns text, or markupsafe.Markup for HTML

    def __post_init__(self) -> None:
        if not isinstance(self.title, str) or not self.title.strip():
            raise ValueError("a dashboard panel needs a non-empty 'title'")
        if (self.template is None) == (self.render is None):
            raise ValueError(f"dashboard panel {self.title!r} needs exactly one of 'template' or 'render'")
        if self.template is not None and not isinstance(self.template, str):
            raise ValueError(f"dashboard panel {self.title!r}: 'template' must be a string")
        if self.render is not None and not callable(self.render):
            raise ValueError(f"dashboard panel {self.title!r}: 'render' must be callable")


def as_panel(item: object) -> DashboardPanel:
    """A hook result item as a panel: a :class:`DashboardPanel`, or a dict of its fields."""
    if isinstance(item, DashboardPanel):
        return item
    if isinstance(item, Mapping):
        unknown = set(item) - {"title", "template", "render"}
        if unknown:
            raise ValueError(f"unknown dashboard panel keys: {', '.join(sorted(map(str, unknown)))}")
        return DashboardPanel(**item)
    raise ValueError(f"{item!r} is not a DashboardPanel or a dict")
