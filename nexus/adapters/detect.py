"""Backend type detection: ask each installed adapter whether a server is of its type."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

import aiohttp

from nexus.adapters.base import BackendAdapter
from nexus.config import BackendConfig

log = logging.getLogger("nexus.adapters")


async def identify_type(
    url: str,
    types: Mapping[str, type[BackendAdapter]],
    session: aiohttp.ClientSession,
    timeout: float,
    *,
    first: Collection[str] = (),
) -> str | None:
    """The first type whose ``identify()`` accepts the server at ``url``, or ``None``.

    Plugin types are asked before ``generic``, and the types named in ``first`` before
    the others (e.g. the types whose default port this is); otherwise in registration
    order. Any failure of an adapter just means "not this type".
    """
    ordered = sorted(types.values(), key=lambda cls: (cls.type_name == "generic", cls.type_name not in first))
    for adapter_cls in ordered:
        spec = BackendConfig(name="probe", url=url, type=adapter_cls.type_name)
        try:
            if await adapter_cls(spec, session, probe_timeout=timeout).identify():
                return adapter_cls.type_name
        except Exception as exc:
            log.debug("%s is not a %s backend: %s", url, adapter_cls.type_name, exc)
    return None
