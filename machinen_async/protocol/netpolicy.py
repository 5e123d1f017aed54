"""The rules of a network policy: which destinations a guest may reach although the host is
closed to it (``NetworkPolicy(allow=...)`` in the SDK), in the form both the SDK (to refuse a bad
rule with a typed error at once) and the VMM backend's enforcement (``vmm/qemu/netguard.py``) read.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..errors import BootError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Rule:
    network: IPNetwork
    port: int | None  # None: every port

    def matches(self, address: IPAddress, port: int) -> bool:
        return address in self.network and self.port in (None, port)


_RULE = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<plain>[^:/]+|[0-9a-fA-F:]+))(?:/(?P<prefix>\d+))?(?::(?P<port>\d+))?$")


def parse_rule(text: str) -> Rule:
    """``ADDR``, ``ADDR/PREFIX``, either with ``:PORT``; an IPv6 address with a port in brackets."""
    spec = text.strip()
    match = _RULE.match(spec)
    try:
        if match is None:
            raise ValueError
        host = match["v6"] or match["plain"]
        if match["v6"] is None and host.count(":") > 1 and match["port"]:  # bare IPv6: no port suffix
            raise ValueError
        network = ipaddress.ip_network(f"{host}/{match['prefix']}" if match["prefix"] else host, strict=False)
        port = int(match["port"]) if match["port"] else None
        if port is not None and not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise BootError(
            f"bad network allow rule {text!r}: use ADDR, ADDR/PREFIX, ADDR:PORT or [IPV6]:PORT "
            "(the host itself, seen from the guest as 10.0.2.2, is 127.0.0.1)",
            code="BOOT_NETWORK_RULE_INVALID",
        ) from None
    return Rule(network, port)
