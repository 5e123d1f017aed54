"""machinen_async: boot Linux microVMs, run commands in them, fork and snapshot them.

async with boot() as vm:
    result = await vm.exec(["uname", "-a"])
"""

import importlib
from typing import TYPE_CHECKING

from .errors import (
    AgentUnavailableError,
    ArgumentError,
    AssetsError,
    BootError,
    BootTimeoutError,
    ConnectionLostError,
    ExecError,
    ExecTimeoutError,
    ForkError,
    GuestFileError,
    HandoffError,
    HostError,
    ImageError,
    MachinenError,
    McpServerError,
    MountError,
    PathError,
    PoolError,
    ProvisionError,
    RegistryError,
    SnapshotError,
    StopError,
    TransferError,
)
from .version import __version__

if TYPE_CHECKING:  # what checkers and IDEs see; at run time __getattr__ imports each on first use
    from .hosts.base import HostPool, Reservation, TransferReport
    from .protocol.messages import HostFacts, VMDescription, VMInfo, VMRow
    from .sdk.boot import connect, restore, stop_vm
    from .sdk.forks import Forks, Launch
    from .sdk.handoff import HandoffReport
    from .sdk.host import BootOptions, Host, boot
    from .sdk.mounts import Mount
    from .sdk.network import NetworkPolicy, Secret
    from .sdk.pool import WarmPool, warm_pool
    from .sdk.process import ExecResult, Process
    from .sdk.provisioning import debian_rootfs, provision
    from .sdk.ray_pool import RayHosts
    from .sdk.vm import VM, SnapshotInfo

# Where each public name lives: imported on first use, because the per-VM
# supervisor imports this package's submodules and should not pay for the SDK
# (one supervisor starts per fork sibling).
_FROM_SDK = {
    "VM": "vm", "SnapshotInfo": "vm",
    "ExecResult": "process", "Process": "process",
    "Forks": "forks", "Launch": "forks",
    "boot": "host", "connect": "boot", "restore": "boot", "stop_vm": "boot",
    "Host": "host", "BootOptions": "host",
    "RayHosts": "ray_pool",
    "HandoffReport": "handoff",
    "NetworkPolicy": "network",
    "Secret": "network",
    "Mount": "mounts",
    "provision": "provisioning", "debian_rootfs": "provisioning",
    "warm_pool": "pool", "WarmPool": "pool",
}  # fmt: skip
_FROM_HOSTS = {"TransferReport", "HostPool", "Reservation"}  # hosts/base.py: the seams a host kind fills
# protocol/messages.py: what vm.info, vm.describe(), Host.list() and Host.info() are (typed dicts).
_FROM_MESSAGES = {"VMInfo", "VMDescription", "VMRow", "HostFacts"}


def __getattr__(name: str) -> object:
    if name in _FROM_HOSTS:
        return getattr(importlib.import_module(f"{__name__}.hosts.base"), name)
    if name in _FROM_MESSAGES:
        return getattr(importlib.import_module(f"{__name__}.protocol.messages"), name)
    if name in _FROM_SDK:
        return getattr(importlib.import_module(f"{__name__}.sdk.{_FROM_SDK[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "VM",
    "AgentUnavailableError",
    "ArgumentError",
    "AssetsError",
    "BootError",
    "BootOptions",
    "BootTimeoutError",
    "ConnectionLostError",
    "ExecError",
    "ExecResult",
    "ExecTimeoutError",
    "ForkError",
    "Forks",
    "GuestFileError",
    "HandoffError",
    "HandoffReport",
    "Host",
    "HostError",
    "HostFacts",
    "HostPool",
    "ImageError",
    "Launch",
    "MachinenError",
    "McpServerError",
    "Mount",
    "MountError",
    "NetworkPolicy",
    "PathError",
    "PoolError",
    "Process",
    "ProvisionError",
    "RayHosts",
    "RegistryError",
    "Reservation",
    "Secret",
    "SnapshotError",
    "SnapshotInfo",
    "StopError",
    "TransferError",
    "TransferReport",
    "VMDescription",
    "VMInfo",
    "VMRow",
    "WarmPool",
    "__version__",
    "boot",
    "connect",
    "debian_rootfs",
    "provision",
    "restore",
    "stop_vm",
    "warm_pool",
]
