"""Built-in features, registered through the same hooks as third-party plugins."""

from __future__ import annotations

from nexus.adapters.base import BackendAdapter
from nexus.adapters.generic import GenericAdapter
from nexus.hookspecs import hookimpl
from nexus.routing.analysis import RequestAnalysis
from nexus.routing.intent import Reconciler
from nexus.routing.scheduling import Scheduling


@hookimpl
def register_backend_types() -> list[type[BackendAdapter]]:
    return [GenericAdapter]


@hookimpl
def register_reconcilers() -> list[type[Reconciler]]:
    return [RequestAnalysis, Scheduling]
