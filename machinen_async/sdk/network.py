"""What a guest may reach over its network (``NetworkPolicy``, defined with its wire form in
``protocol/netpolicy.py``); the VMM backend enforces it (``vmm/qemu/netguard.py``, ``egress.py``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import BootError
from ..protocol.netpolicy import NetworkPolicy
from ..protocol.secret import DEFAULT_HEADERS, SecretRule

__all__ = ["NetworkPolicy", "Secret", "network_settings", "secret_rules"]


@dataclass(frozen=True)
class Secret:
    """A value the guest never holds: ``boot(secrets={"API_KEY": Secret(value, hosts=["api.example.com"])})``
    gives the guest a placeholder in ``$API_KEY``; the host's egress proxy puts the value in place
    of the placeholder in the ``headers`` (by default those API keys go in: Authorization,
    X-Api-Key, Api-Key, ...) of HTTPS requests to ``hosts`` (names, ``*.`` wildcards; port 443
    unless one says ``:PORT``), and only there.  The value stays in the memory of this process and
    of the VM's supervisor: never in the guest, a snapshot, ``describe()`` or a log."""

    value: str = field(repr=False)
    hosts: Sequence[str] = ()
    headers: Sequence[str] = DEFAULT_HEADERS


def secret_rules(secrets: Mapping[str, Secret] | None) -> list[SecretRule]:
    """Each secret checked (BOOT_SECRET_INVALID), with a new placeholder."""
    if secrets is None:
        return []
    if not isinstance(secrets, Mapping) or not all(isinstance(s, Secret) for s in secrets.values()):
        raise BootError("secrets maps environment variable names to Secret(value, hosts=[...])",
                        code="BOOT_SECRET_INVALID")  # fmt: skip
    return [SecretRule(name, secret.value, tuple(secret.hosts), headers=tuple(secret.headers))
            for name, secret in secrets.items()]  # fmt: skip


def network_settings(network: bool | NetworkPolicy) -> tuple[bool, NetworkPolicy]:
    """(whether the VM has a network device, its policy)."""
    if isinstance(network, NetworkPolicy):
        return True, network
    if isinstance(network, bool):
        return network, NetworkPolicy()
    raise BootError(
        f"network must be True, False or a NetworkPolicy, not {network!r}", code="BOOT_NETWORK_RULE_INVALID"
    )
