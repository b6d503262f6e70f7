"""mDNS plumbing shared by discovery, ``nexus advertise`` and the gateway's announcement.

python-zeroconf's asyncio API (CONTRACT §9), bound to the configured interfaces. The
task that ``async_register_service`` / ``async_update_service`` /
``async_unregister_service`` return is always awaited: only then have the
announcements or goodbye packets been sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Mapping, Sequence

import ifaddr
from zeroconf import InterfaceChoice
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from nexus.adapters.base import BackendAdapter

LLM_SERVICE_TYPE = "_llm._tcp.local."
NEXUS_SERVICE_TYPE = "_nexus._tcp.local."
_TXT_STRING_LIMIT = 255  # bytes of one "key=value" TXT string
_INSTANCE_LIMIT = 63  # bytes of an instance name (RFC 6763 §4.1.1)


def machine_addresses() -> set[str]:
    """Every address of this machine's interfaces, loopback included (canonical text)."""
    return {str(ipaddress.ip_address(ip.ip if ip.is_IPv4 else ip.ip[0]))
            for adapter in ifaddr.get_adapters() for ip in adapter.ips}


def open_zeroconf(interfaces: Sequence[str] | None) -> AsyncZeroconf:
    """Zeroconf on ``interfaces`` (addresses; ``None`` or empty: all). Raises ``OSError`` or
    ``zeroconf.Error`` when mDNS cannot start, e.g. for an address no interface has
    (checked first: zeroconf would leave a socket open)."""
    if interfaces:
        missing = [a for a in interfaces if str(ipaddress.ip_address(a)) not in machine_addresses()]
        if missing:
            raise OSError(f"no interface has the address {', '.join(missing)}")
    return AsyncZeroconf(interfaces=list(interfaces) if interfaces else InterfaceChoice.All)


def declared_service_types(types: Mapping[str, type[BackendAdapter]]) -> dict[str, str]:
    """Service type (lower case) -> the backend type that declares it (the first one wins)."""
    declared: dict[str, str] = {}
    for type_name, adapter_cls in types.items():
        for service_type in adapter_cls.mdns_service_types:
            declared.setdefault(service_type.lower(), type_name)
    return declared


def service_type_for(adapter_cls: type[BackendAdapter]) -> str:
    """The service type a backend of this type is announced as."""
    return adapter_cls.mdns_service_types[0] if adapter_cls.mdns_service_types else LLM_SERVICE_TYPE


def txt_record(values: Mapping[str, str | None], models: Sequence[str] = ()) -> dict[str, str]:
    """TXT properties: the values that are set, and ``models`` comma-separated, as many as
    fit in one TXT string (a probe of the backend lists them all anyway)."""
    record = {key: value for key, value in values.items() if value}
    listed = ""
    for model in models:
        candidate = f"{listed},{model}" if listed else model
        if len(f"models={candidate}".encode()) > _TXT_STRING_LIMIT:
            break
        listed = candidate
    if listed:
        record["models"] = listed
    return record


def instance_name(text: str) -> str:
    """``text`` cut to the 63 bytes an instance name may have, on a character boundary."""
    return text.encode()[:_INSTANCE_LIMIT].decode(errors="ignore").strip() or "nexus"


def local_host_name() -> str:
    """This machine's name as an mDNS host (``<name>.local.``)."""
    label = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname().split(".")[0]).strip("-") or "nexus"
    return f"{label[:_INSTANCE_LIMIT]}.local."


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (an IPv6 one with or without brackets)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_loopback_or_wildcard(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or ip.is_unspecified


def interface_addresses(interfaces: Sequence[str] | None) -> list[str]:
    """The addresses of the mDNS interfaces: those configured, or else every IPv4 address
    of this machine except loopback."""
    if interfaces:
        return list(interfaces)
    return sorted({ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
                   if ip.is_IPv4 and not ipaddress.ip_address(ip.ip).is_loopback})


async def addresses_for(host: str, interfaces: Sequence[str] | None) -> list[str]:
    """The addresses a record for a server at ``host`` points at: ``host`` itself (a name
    is resolved), unless it is loopback or a wildcard: then this machine's addresses on
    the mDNS interfaces, where other machines can reach it."""
    try:
        resolved = [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        resolved = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if all(_is_loopback_or_wildcard(address) for address in resolved):
        return interface_addresses(interfaces)
    return [address for address in resolved if not _is_loopback_or_wildcard(address)]


class Announcement:
    """One service this process announces: published, kept current, withdrawn."""

    def __init__(self, zeroconf: AsyncZeroconf, service_type: str, name: str, port: int,
                 addresses: Sequence[str], properties: Mapping[str, str]) -> None:
        self.zeroconf = zeroconf
        self.info = AsyncServiceInfo(service_type, f"{instance_name(name)}.{service_type}", port=port,
                                     properties=dict(properties), server=local_host_name(),
                                     parsed_addresses=list(addresses))
        self.published = False

    async def publish(self, properties: Mapping[str, str] | None = None) -> None:
        """Register the service (renamed ``name (2)`` if the name is taken on the network),
        with new TXT ``properties`` if given."""
        if properties is not None:
            self.info = self._with(properties)
        await (await self.zeroconf.async_register_service(self.info, allow_name_change=True))
        self.published = True

    async def update(self, properties: Mapping[str, str]) -> None:
        """Announce new TXT properties for the published service."""
        self.info = self._with(properties)
        await (await self.zeroconf.async_update_service(self.info))

    async def withdraw(self) -> None:
        """Send the goodbye packets, so browsers drop the service at once."""
        if self.published:
            self.published = False
            await (await self.zeroconf.async_unregister_service(self.info))

    def _with(self, properties: Mapping[str, str]) -> AsyncServiceInfo:
        return AsyncServiceInfo(self.info.type, self.info.name, port=self.info.port, properties=dict(properties),
                                server=self.info.server, parsed_addresses=self.info.parsed_addresses())
