"""Built-in features, registered through the same hooks as third-party plugins."""

from __future__ import annotations

from nexus.adapters.base import BackendAdapter
from nexus.adapters.generic import GenericAdapter
from nexus.discovery import DiscoverySource
from nexus.discovery_mdns import MdnsDiscovery
from nexus.discovery_probe import PortProbe
from nexus.hookspecs import hookimpl
from nexus.routing.analysis import RequestAnalysis
from nexus.routing.intent import Reconciler
from nexus.routing.policy import Privacy, Tiers
from nexus.routing.budget import BudgetStage
from nexus.routing.quality_gate import QualityGate
from nexus.routing.scheduling import Scheduling


@hookimpl
def register_backend_types() -> list[type[BackendAdapter]]:
    return [GenericAdapter]


@hookimpl
def register_discovery_sources() -> list[type[DiscoverySource]]:
    return [MdnsDiscovery, PortProbe]


@hookimpl
def register_reconcilers() -> list[type[Reconciler]]:
    return [RequestAnalysis, Privacy, BudgetStage, Tiers, QualityGate, Scheduling]
