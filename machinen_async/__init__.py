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
    MachinenError,
    RegistryError,
)
from .vm import VM, ExecResult, Process, boot, connect

__version__ = "0.1.0"

__all__ = [
    "VM",
    "AgentUnavailableError",
    "AssetsError",
    "BootError",
    "BootTimeoutError",
    "ExecError",
    "ExecResult",
    "ExecTimeoutError",
    "GuestFileError",
    "MachinenError",
    "Process",
    "RegistryError",
    "boot",
    "connect",
]
