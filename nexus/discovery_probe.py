"""Local port probing: finds backends on the well-known ports of the installed types.

With ``discovery.probe_localhost`` (the default) it probes 127.0.0.1, and it probes the
hosts of ``discovery.probe_hosts`` (an explicit allow-list; nothing else is scanned).
The ports are each installed local type's ``default_port`` (or ``discovery.probe_ports``),
except the gateway's own. Each adapter's ``identify()`` decides what answers; the types
whose default port it is are asked first. Every ``discovery.probe_interval_seconds`` the
probe runs again, so a backend started later appears and one that stopped is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

from nexus.adapters.base import BackendAdapter
from nexus.adapters.detect import identify_type
from nexus.config import Config
from nexus.discovery import DiscoveredEndpoint, DiscoverySink
from nexus.mdns import is_loopback

log = logging.getLogger("nexus.discovery.probe")
LOOPBACK = "127.0.0.1"


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _listening(host: str, port: int, timeout: float) -> bool:
    """Whether something accepts TCP connections there (before asking every adapter)."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class PortProbe:
    """The ``probe`` discovery source."""

    name = "probe"

    def __init__(self, config: Config, settings: Mapping[str, Any]) -> None:
        discovery = config.discovery
        self.hosts = [LOOPBACK] if discovery.probe_localhost else []
        self.hosts += [host for host in discovery.probe_hosts if host not in self.hosts]
        self.ports = discovery.probe_ports
        self.interval = discovery.probe_interval_seconds
        self.timeout = min(2.0, config.health_check.timeout_seconds)
        self.own_host, self.own_port = config.server.host, config.server.port

    def targets(self, types: Mapping[str, type[BackendAdapter]]) -> list[tuple[str, int]]:
        """``(host, port)`` pairs to probe: the default ports of local types, never the gateway."""
        ports = self.ports or sorted({cls.default_port for cls in types.values() if cls.default_port and not cls.cloud})
        return [(host, port) for host in self.hosts for port in ports
                if not (port == self.own_port and (host == self.own_host or is_loopback(host)))]

    async def run(self, sink: DiscoverySink) -> None:
        targets = self.targets(sink.backend_types)
        types = {name: cls for name, cls in sink.backend_types.items() if not cls.cloud}  # asked in identify()
        log.debug("Probing %s", ", ".join(f"{host}:{port}" for host, port in targets) or "nothing")
        if not targets:
            return
        reported: set[str] = set()  # keys of the endpoints the sink took
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            while True:
                answers = await asyncio.gather(*(self.identify(session, types, host, port) for host, port in targets))
                for (host, port), type_name in zip(targets, answers, strict=True):
                    key = f"probe:{host}:{port}"
                    if type_name is not None:
                        if sink.found(self.endpoint(key, host, port, type_name, types), self.name) is not None:
                            reported.add(key)
                    elif key in reported:
                        reported.discard(key)
                        sink.lost(key)
                await asyncio.sleep(self.interval)

    async def identify(self, session: aiohttp.ClientSession, types: Mapping[str, type[BackendAdapter]],
                       host: str, port: int) -> str | None:
        """The type of the backend at ``host:port``, or ``None`` when there is none."""
        if not await _listening(host, port, self.timeout):
            return None
        owners = [name for name, cls in types.items() if cls.default_port == port]
        return await identify_type(_url(host, port), types, session, self.timeout, first=owners)

    @staticmethod
    def endpoint(key: str, host: str, port: int, type_name: str,
                 types: Mapping[str, type[BackendAdapter]]) -> DiscoveredEndpoint:
        """Named "local ollama" (id ``local-ollama``), with the port when it is not the
        type's default, and the host instead of "local" for another machine."""
        name = f"local {type_name}" if is_loopback(host) else f"{type_name} {host}"
        if port != types[type_name].default_port:
            name += f" {port}"
        return DiscoveredEndpoint(key=key, name=name, url=_url(host, port), type=type_name)
