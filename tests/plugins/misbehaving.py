"""A plugin whose hooks return the wrong things: each bad item is reported and skipped."""

from __future__ import annotations

from typing import Any

from nexus import GenericAdapter, RoutingIntent, hookimpl


class StealsGeneric(GenericAdapter):
    """Tries to replace the built-in ``generic`` type."""

    type_name = "generic"


class NoOrder:
    name = "no_order"

    def reconcile(self, intent: RoutingIntent) -> None:
        pass


class FailsToBuild:
    name = "fails_to_build"
    order = 500

    def __init__(self, context: Any) -> None:
        raise RuntimeError("cannot build")


@hookimpl
def register_backend_types() -> list[object]:
    return [dict, StealsGeneric]


@hookimpl
def register_reconcilers() -> list[object]:
    return [NoOrder(), FailsToBuild]


class LonelySource:
    name = "lonely"


@hookimpl
def register_discovery_sources() -> type[LonelySource]:  # a class, not a list of classes
    return LonelySource


@hookimpl
async def register_routes() -> list[object]:  # hooks are synchronous; this one never runs
    return []
