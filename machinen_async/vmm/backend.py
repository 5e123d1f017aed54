"""The VMM backend seam: what the supervisor and the SDK need from a virtual machine monitor.

QEMU (``vmm/qemu/``) is the one implementation today.  A second backend
(Firecracker or cloud-hypervisor where KVM is real) would be a sibling folder
implementing these two protocols, chosen by ``$MACHINEN_VMM``; nothing above
this layer names QEMU.
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import BootError
from ..protocol.netpolicy import NetworkPolicy, ResolvedName
from ..protocol.secret import SecretRule

# A disk chain: [path, format] per layer, top (writable) first, the base image last.
DiskChain = list[list[str]]


@dataclass(frozen=True)
class Hardware:
    """Everything that shapes the virtual hardware; a restore must match it (a bundle records it as
    ``store/manifest.py`` ``SavedMachine``, made by ``SavedMachine.of``)."""

    memory_mib: int
    cpus: int
    accel: str
    kernel: Path
    initrd: Path
    hostname: str
    tsc_khz: int | None = None
    network: bool = True  # outbound only, user-mode NAT (addresses: protocol/guest_abi.py)


@dataclass(frozen=True)
class VmmLaunch:
    """One VMM process: the machine, where its RAM and disk are, how it is reached and confined."""

    hardware: Hardware
    ram_file: Path
    ram_shared: bool  # the VM's own RAM file (forkable); else a template's, mapped copy-on-write
    disk_chain: DiskChain
    agent_socket: Path
    control_socket: Path
    incoming: bool = False  # wait for load_state instead of booting
    never_run: bool = False  # only load and save state (a helper): the guest never runs
    # What a confined VMM may see besides its system files and the files above (kernel, initrd,
    # disk chain, RAM file), which a backend shows it itself.  Never a directory another VM's
    # files or this supervisor's files are created in: a VMM taken over by its guest would plant
    # symlinks there.
    read_only: Sequence[Path] = ()
    writable: Sequence[Path] = ()
    network_policy: NetworkPolicy = NetworkPolicy()  # noqa: RUF009 (frozen)  what the guest may reach
    resolved_names: Sequence[ResolvedName] = ()  # what the guest's resolver answered before (a fork's source)
    logs: tuple[Path, Path] | None = None  # (console, VMM messages), capped; None: discarded


class Machine(Protocol):
    """A running VMM process (from ``Backend.start``)."""

    pid: int  # the VMM's own process

    async def connect(self) -> None:
        """Until its control channel answers."""

    async def exited(self) -> int:
        """Wait until the VMM process is gone (and its last output logged); its status."""

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def is_running(self) -> bool: ...

    async def freeze_disk(self, new_top: Path) -> None:
        """Put ``new_top`` (an empty layer over the current top, from ``Backend.create_overlay``)
        on top of the disk: what was the top is immutable from now on.  Call while paused for a
        consistent instant."""

    async def save_state(self, into: Path | socket.socket, *, ram: bool) -> float:
        """Write device state (and with ``ram``, the RAM: live where ``saves_live``, the guest
        runs meanwhile and is stopped for the last pages) to a file or a stream socket (handed
        over to the VMM); returns the ms the guest was stopped for.  The caller resumes the guest."""

    async def saves_live(self) -> bool:
        """Whether ``save_state(ram=True)`` keeps the guest running while RAM streams (else it
        stops the guest for the whole stream: a consistent instant comes first)."""

    async def load_state(self, source: Path | socket.socket, *, ram: bool) -> None:
        """Load what ``save_state`` wrote (``ram`` must match) into an ``incoming`` machine, from
        a file or while it is written into a socket (handed over to the VMM)."""

    async def version(self) -> str: ...

    async def set_network(self, policy: NetworkPolicy) -> None:
        """What the guest may reach from now on (new connections and DNS queries)."""

    def resolved_names(self) -> list[ResolvedName]:
        """The allowed names the guest resolved whose answers still hold (for its fork siblings)."""

    async def set_secrets(self, secrets: Sequence[SecretRule]) -> bytes:
        """Put ``secrets`` into the guest's requests to their hosts from now on; the PEM of the CA
        the guest must trust for those hosts (its TLS is terminated on the host)."""


class Backend(Protocol):
    name: str
    machine_type: str  # part of what a saved state needs to load

    def check_installed(self) -> None: ...

    def installed_version(self) -> str:
        """Device state only loads into the same version."""

    def launch_recipe(self) -> str:
        """A digest of how this build lays out a machine (devices, their options): device state
        saved by one recipe may not load into another (boot templates are keyed by it)."""

    def choose_accelerator(self, requested: str | None) -> str: ...

    def host_tsc_khz(self) -> int | None: ...

    def start(self, launch: VmmLaunch) -> AbstractAsyncContextManager[Machine]:
        """The VMM running for the duration of the context; stopped (gracefully, then by force,
        with every process it started) on exit, error or cancellation."""

    async def create_overlay(self, path: Path, backing: list[str], size: int) -> None:
        """A new empty layer file on top of ``backing`` ([path, format]); whatever is at ``path``
        already is replaced, never followed."""

    async def flatten_disk(self, chain: DiskChain, target: Path) -> None:
        """Everything above the base image (``chain[-1]``) as one layer file ``target``."""


def available() -> list[str]:
    """The backends of this build: each is a folder here with a ``backend.py`` defining ``BACKEND``."""
    return sorted(module.parent.name for module in Path(__file__).parent.glob("*/backend.py"))


def default() -> Backend:
    """The backend of this host: ``$MACHINEN_VMM``, ``qemu`` by default (the only one today).

    Found by folder name, so this seam names no implementation and a new one
    needs nothing but its folder."""
    name = os.environ.get("MACHINEN_VMM", "qemu")
    if name not in available():
        raise BootError(
            f"unknown VMM backend {name!r} (this build has: {', '.join(available())})", code="BOOT_VMM_UNKNOWN"
        )
    return importlib.import_module(f"{__package__}.{name}.backend").BACKEND
