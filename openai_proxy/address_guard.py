"""Which addresses the proxy may fetch media from: public ones only unless configured (SSRF protection).

A request's media URLs are chosen by the client; without this check they could reach services only
the proxy's host can see (cloud metadata at 169.254.169.254, admin ports on 127.0.0.1, the private
network). Every address a host name resolves to is checked, and the caller connects to a checked
address itself, so a second DNS answer (rebinding) cannot swap in another one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressRefused(Exception):
    """The host is unknown, or resolves to an address this proxy must not connect to."""


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs such as `10.1.0.0/16` or `127.0.0.1` (one address); ValueError names a bad one."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


@dataclass(frozen=True)
class AddressGuard:
    allow_private: bool = False  # allow every address
    allowed_networks: tuple[IPNetwork, ...] = ()  # allowed even when not public

    def allows(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        if self.allow_private or any(address in network for network in self.allowed_networks):
            return True
        # is_global leaves out loopback, private, link-local, shared (CGNAT), reserved and unspecified
        # ranges, but counts most multicast as global.
        return address.is_global and not address.is_multicast

    async def resolve(self, host: str, port: int) -> IPAddress:
        """An address of `host` to connect to, once every address it resolves to has been allowed."""
        try:
            addresses = [ipaddress.ip_address(host)]  # an address already: no lookup (the system's would echo it)
        except ValueError:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as exc:
                raise AddressRefused(f"cannot resolve host {host!r}: {exc}") from None
            addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        refused = [address for address in addresses if not self.allows(address)]
        if refused or not addresses:
            raise AddressRefused(f"host {host!r} resolves to {refused[0] if refused else 'nothing'}, which is not "
                                 f"a public address; this server does not fetch media from there")
        return addresses[0]
