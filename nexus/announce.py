"""Announcing over mDNS: ``nexus advertise`` for a backend that does not announce itself
(stock Ollama does not: ollama#3802, #10283), and ``discovery.announce`` for the gateway.

A backend is announced as its type's service type (``_ollama._tcp.local.`` for Ollama,
``_llm._tcp.local.`` otherwise) with the TXT keys ``type``, ``api_path``, ``version``
(the backend's own, when its adapter reports one), ``zone`` and ``models``; the gateway
as ``_nexus._tcp.local.``. Records are withdrawn on exit, with awaited goodbyes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from zeroconf import Error as ZeroconfError

from nexus import __version__
from nexus.adapters.base import BackendAdapter
from nexus.adapters.detect import identify_type
from nexus.config import BackendConfig, Config
from nexus.mdns import (
    NEXUS_SERVICE_TYPE,
    Announcement,
    addresses_for,
    is_loopback,
    open_zeroconf,
    service_type_for,
    txt_record,
)

log = logging.getLogger("nexus.announce")
PROBE_TIMEOUT = 5.0


class AdvertiseError(Exception):
    """``nexus advertise`` cannot start (one line for the CLI)."""


@dataclass(frozen=True)
class AdvertiseRequest:
    url: str
    type_name: str | None
    zone: str | None
    name: str | None
    interfaces: Sequence[str]
    interval: float


async def _models(adapter: BackendAdapter) -> list[str] | None:
    """The backend's model ids, or ``None`` when its probe fails."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            models = await adapter.probe()
    except Exception as exc:
        log.debug("Probe of %s failed: %r", adapter.base_url, exc)
        return None
    return sorted(m.id for m in models or [])


async def _version(adapter: BackendAdapter) -> str | None:
    """The backend's version, when its adapter reports one in ``resource_usage()``."""
    try:
        version = (await adapter.resource_usage()).get("version")
    except Exception:
        return None
    return version if isinstance(version, str) else None


async def _reachable_at(address: str, port: int, adapter_cls: type[BackendAdapter],
                        session: aiohttp.ClientSession) -> bool:
    host = f"[{address}]" if ":" in address else address
    spec = BackendConfig(name="reachability", url=f"http://{host}:{port}", type=adapter_cls.type_name)
    return await _models(adapter_cls(spec, session, probe_timeout=PROBE_TIMEOUT)) is not None


async def _probed(request: AdvertiseRequest, types: Mapping[str, type[BackendAdapter]],
                  session: aiohttp.ClientSession) -> tuple[BackendAdapter, list[str]]:
    """The backend's adapter (its type detected unless given) and its models."""
    type_name = request.type_name or await identify_type(request.url, types, session, PROBE_TIMEOUT)
    if type_name is None:
        raise AdvertiseError(f"no backend of an installed type answers at {request.url}")
    spec = BackendConfig(name="advertised", url=request.url, type=type_name)
    adapter = types[type_name](spec, session, probe_timeout=PROBE_TIMEOUT)
    models = await _models(adapter)
    if models is None:
        raise AdvertiseError(f"the {type_name} backend at {request.url} does not answer its probe")
    return adapter, models


async def _announced_addresses(adapter: BackendAdapter, port: int, request: AdvertiseRequest,
                               session: aiohttp.ClientSession, say: Callable[[str], None]) -> list[str]:
    """Where the record points: see :func:`nexus.mdns.addresses_for`. Warns when a
    backend on loopback does not answer there."""
    host = urlsplit(adapter.base_url).hostname or ""
    try:
        addresses = await addresses_for(host, request.interfaces)
    except OSError as exc:
        raise AdvertiseError(f"cannot resolve {host}: {exc}") from None
    if not addresses:
        raise AdvertiseError("this machine has no network address to announce; pass --interface ADDRESS")
    if is_loopback(host) and not is_loopback(addresses[0]) and \
            not await _reachable_at(addresses[0], port, type(adapter), session):
        say(f"Warning: the backend does not answer on {addresses[0]}:{port}, so other machines cannot reach it; "
            "make it listen on all interfaces (for Ollama: OLLAMA_HOST=0.0.0.0)")
    return addresses


async def advertise_backend(request: AdvertiseRequest, types: Mapping[str, type[BackendAdapter]],
                            stop: asyncio.Event, say: Callable[[str], None]) -> None:
    """Probe the backend, announce it until ``stop`` is set, then withdraw the record."""
    async with aiohttp.ClientSession() as session:
        adapter, models = await _probed(request, types, session)
        parts = urlsplit(adapter.base_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = await _announced_addresses(adapter, port, request, session, say)
        try:
            mdns = open_zeroconf(request.interfaces)
        except (OSError, ZeroconfError) as exc:
            raise AdvertiseError(f"mDNS is unavailable: {exc}") from None
        values = {"type": adapter.type_name, "api_path": f"{parts.path}/v1", "version": await _version(adapter),
                  "zone": request.zone}
        name = request.name or f"{adapter.type_name} on {socket.gethostname()}"
        announcement = Announcement(mdns, service_type_for(type(adapter)), name, port, addresses,
                                    txt_record(values, models))
        try:
            try:
                await announcement.publish()
            except ZeroconfError as exc:
                raise AdvertiseError(f"cannot publish the mDNS record: {exc!r}") from None
            say(f"Advertising {announcement.info.name} ({adapter.type_name}, {_count(models)}) for "
                f"{adapter.base_url} at {', '.join(addresses)}; Ctrl-C to stop")
            await _keep_current(announcement, adapter, values, models, request.interval, stop, say)
        finally:
            await announcement.withdraw()
            await mdns.async_close()
        say(f"Withdrawn: {announcement.info.name}")


def _count(models: list[str]) -> str:
    return "1 model" if len(models) == 1 else f"{len(models)} models"


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Whether ``stop`` is set within ``seconds``."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def _keep_current(announcement: Announcement, adapter: BackendAdapter, values: Mapping[str, str | None],
                        models: list[str], interval: float, stop: asyncio.Event, say: Callable[[str], None]) -> None:
    """Re-probe every ``interval``: update the record when the models change, withdraw it
    while the backend does not answer, publish it again when it does."""
    while not await _stopped(stop, interval):
        current = await _models(adapter)
        if current is None:
            if announcement.published:
                await announcement.withdraw()
                say("The backend does not answer; record withdrawn until it does")
        elif not announcement.published:
            models = current
            await announcement.publish(txt_record(values, models))
            say(f"The backend answers again; record published ({_count(models)})")
        elif current != models:
            models = current
            await announcement.update(txt_record(values, models))
            say(f"Models changed; record updated ({_count(models)})")


async def announce_gateway(config: Config) -> None:
    """Announce this gateway as ``_nexus._tcp.local.`` until cancelled; a warning if mDNS
    cannot start."""
    discovery, server = config.discovery, config.server
    try:
        addresses = await addresses_for(server.host, discovery.interfaces)
        if not addresses:
            raise OSError("this machine has no network address to announce")
        mdns = open_zeroconf(discovery.interfaces)
    except (OSError, ZeroconfError) as exc:
        log.warning("Cannot announce the gateway over mDNS: %s", exc)
        return
    if is_loopback(server.host) and not all(is_loopback(a) for a in addresses):
        log.warning("The gateway listens on %s only: other machines cannot reach the addresses it announces "
                    "(listen with --host 0.0.0.0)", server.host)
    announcement = Announcement(mdns, NEXUS_SERVICE_TYPE, f"Nexus on {socket.gethostname()}", server.port, addresses,
                                txt_record({"api_path": "/v1", "version": __version__}))
    try:
        await announcement.publish()
        log.info("Announced the gateway as %s at %s", announcement.info.name, ", ".join(addresses))
        await asyncio.Event().wait()  # until the gateway stops
    finally:
        await announcement.withdraw()
        await mdns.async_close()
