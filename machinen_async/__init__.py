"""machinen_async: boot Linux microVMs, run commands in them, fork and snapshot them.

async with boot() as vm:
    result = await vm.exec(["uname", "-a"])
"""

from .errors import (
    AgentUnavailableError,
    AssetsError,
    BootError,
    BootTimeoutError,
    ExecError,
    ExecTimeoutError,
    GuestFileError,
    HandoffError,
    HostError,
    MachinenError,
    RegistryError,
    SnapshotError,
    TransferError,
)

__version__ = "0.1.0"

_FROM_VM = {"VM", "ExecResult", "Forks", "Process", "SnapshotInfo", "boot", "connect", "restore"}


def __getattr__(name: str):
    # Lazy: the per-VM supervisor imports this package's submodules and
    # should not pay for the SDK (one supervisor starts per fork sibling).
    if name in _FROM_VM:
        from . import vm

        return getattr(vm, name)
    if name in ("Host", "TransferReport"):
        from .remote import host

        return getattr(host, name)
    if name == "NetworkPolicy":
        from .network import NetworkPolicy

        return NetworkPolicy
    if name == "HandoffReport":
        from .remote import handoff

        return handoff.HandoffReport
    if name in ("provision", "ProvisionError", "debian_rootfs"):
        from . import provisioning

        return getattr(provisioning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "VM",
    "AgentUnavailableError",
    "AssetsError",
    "BootError",
    "BootTimeoutError",
    "ExecError",
    "ExecResult",
    "ExecTimeoutError",
    "Forks",
    "GuestFileError",
    "HandoffError",
    "HandoffReport",
    "Host",
    "HostError",
    "MachinenError",
    "NetworkPolicy",
    "Process",
    "ProvisionError",
    "RegistryError",
    "SnapshotError",
    "SnapshotInfo",
    "TransferError",
    "TransferReport",
    "boot",
    "connect",
    "debian_rootfs",
    "provision",
    "restore",
]
