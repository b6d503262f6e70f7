"""Nexus: one OpenAI-compatible endpoint in front of many LLM backends.

The public plugin API is importable from here.
"""

from nexus.adapters.base import BackendAdapter, BackendLoading, ProbeFailed, UnsupportedOperation
from nexus.adapters.generic import GenericAdapter
from nexus.discovery import DiscoveredEndpoint, DiscoverySink, DiscoverySource
from nexus.hookspecs import hookimpl
from nexus.registry import ModelInfo
from nexus.routing.intent import Candidate, Reconciler, ReconcilerContext, Requirements, RoutingIntent

__version__ = "0.1.0"

__all__ = [
    "BackendAdapter",
    "BackendLoading",
    "Candidate",
    "DiscoveredEndpoint",
    "DiscoverySink",
    "DiscoverySource",
    "GenericAdapter",
    "ModelInfo",
    "ProbeFailed",
    "Reconciler",
    "ReconcilerContext",
    "Requirements",
    "RoutingIntent",
    "UnsupportedOperation",
    "__version__",
    "hookimpl",
]
