"""What a guest may reach over its network (``NetworkPolicy``, defined with its wire form in
``protocol/netpolicy.py``); the VMM backend enforces it (``vmm/qemu/netguard.py``, ``egress.py``)."""

from __future__ import annotations

from ..errors import BootError
from ..protocol.netpolicy import NetworkPolicy

__all__ = ["NetworkPolicy", "network_settings"]


def network_settings(network: bool | NetworkPolicy) -> tuple[bool, NetworkPolicy]:
    """(whether the VM has a network device, its policy)."""
    if isinstance(network, NetworkPolicy):
        return True, network
    if isinstance(network, bool):
        return network, NetworkPolicy()
    raise BootError(
        f"network must be True, False or a NetworkPolicy, not {network!r}", code="BOOT_NETWORK_RULE_INVALID"
    )
