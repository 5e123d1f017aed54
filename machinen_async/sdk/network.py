"""What a guest may reach over its network; the VMM backend enforces it (``vmm/qemu/netguard.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BootError
from ..protocol.netpolicy import parse_rule


@dataclass(frozen=True)
class NetworkPolicy:
    """Outbound NAT (DNS included, nothing inbound) with the host closed.

    Refused: loopback (which the guest reaches as 10.0.2.2), link-local
    addresses (cloud metadata at 169.254.169.254), multicast/broadcast and
    every address of the host's own interfaces.  ``allow`` reopens some:
    ``"ADDR"``, ``"ADDR/PREFIX"``, ``"ADDR:PORT"``, ``"[IPV6]:PORT"``; for a
    service on the host's loopback that the guest should use as
    ``10.0.2.2:PORT``, allow ``"127.0.0.1:PORT"`` (``NetworkPolicy.host_ports``).
    """

    allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.allow, str):
            raise BootError("NetworkPolicy(allow=...) takes a list of rules", code="BOOT_NETWORK_RULE_INVALID")
        for rule in self.allow:
            parse_rule(rule)  # a typed error now, not in the VM's supervisor
        object.__setattr__(self, "allow", tuple(self.allow))

    @classmethod
    def host_ports(cls, *ports: int, allow: tuple[str, ...] = ()) -> NetworkPolicy:
        """The host's loopback services on ``ports`` (guest: 10.0.2.2:PORT), plus ``allow``."""
        return cls(allow=(*(f"127.0.0.1:{port}" for port in ports), *allow))


def network_settings(network: bool | NetworkPolicy) -> tuple[bool, list[str]]:
    """(whether the VM has a network device, the destinations reopened for it)."""
    if isinstance(network, NetworkPolicy):
        return True, list(network.allow)
    if isinstance(network, bool):
        return network, []
    raise BootError(
        f"network must be True, False or a NetworkPolicy, not {network!r}", code="BOOT_NETWORK_RULE_INVALID"
    )
