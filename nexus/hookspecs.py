"""The plugin hooks of Nexus (pluggy project ``nexus``).

Hooks are for registration: they run once at start-up, are synchronous, and return
classes or objects. The per-request path never calls ``pm.hook.*``; it calls methods on
what the hooks registered. Each hook is documented with its signature in
``docs/plugins.md``; ``tests/test_docs.py`` fails when one is missing there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click
    from aiohttp import web

    from nexus.adapters.base import BackendAdapter
    from nexus.dashboard import DashboardPanel
    from nexus.discovery import DiscoverySource
    from nexus.routing.intent import Reconciler

hookspec = pluggy.HookspecMarker("nexus")
hookimpl = pluggy.HookimplMarker("nexus")


@hookspec
def register_backend_types() -> list[type[BackendAdapter]]:
    """Return adapter classes, one per backend type.

    Each class has ``type_name`` (the config ``type``) and ``default_port``, and
    subclasses :class:`nexus.BackendAdapter`. A later plugin may not silently replace a
    type: two classes with the same ``type_name`` are reported and the second is skipped.
    """


@hookspec
def register_discovery_sources() -> list[type[DiscoverySource]]:
    """Return discovery source classes.

    Each class has ``name`` and is built as ``cls(config, plugin_settings)``; its
    long-running ``async def run(sink)`` reports endpoints with ``sink.found(...)``
    and ``sink.lost(key)``.
    """


@hookspec
def register_reconcilers() -> list[type[Reconciler] | Reconciler]:
    """Return routing reconcilers (classes or instances).

    A reconciler has ``name`` (str), ``order`` (int) and a synchronous, I/O-free
    ``reconcile(intent)`` that may only exclude candidates or annotate the decision.
    A class is instantiated as ``cls(context)`` with a :class:`nexus.ReconcilerContext`.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add click commands to the ``nexus`` command group."""


@hookspec
def register_routes() -> list[web.AbstractRouteDef]:
    """Return extra aiohttp route definitions (e.g. ``web.get("/x", handler)``)."""


@hookspec
def register_dashboard_panels() -> list[DashboardPanel | dict[str, Any]]:
    """Return extra dashboard panels (``nexus.dashboard.DashboardPanel`` or dicts of its fields).

    Each panel has a ``title`` and exactly one of ``template`` (a jinja2 template string,
    autoescaped) or ``render`` (a callable taking the page data and returning text, or
    ``markupsafe.Markup`` for HTML). Panels are rendered each time the page is served.
    """
