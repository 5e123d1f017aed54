"""What every host driver offers, and the ``Connection`` it hands the SDK for each VM.

A driver starts, finds and stops VMs on one machine -- this one
(``local.LocalDriver``) or one reached over SSH (``ssh.SSHDriver``) -- and
returns open ``Connection``s to their supervisors; the SDK wraps each in a
``VM``.  Spread and handoff see only this interface.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import anyio

from ..protocol.messages import BootRequest, ForkRequest, ForkTemplate, HostFacts, RestoreRequest, VMInfo, VMRow
from ..protocol.mux import Channel

DEFAULT_BOOT_TIMEOUT_S = 60.0
PEER_PROTOCOL = 3  # the request set of hosts/peer.py; both ends of a link must agree

Progress = Callable[[str], None]
HostT = TypeVar("HostT")


@dataclass
class Reservation(Generic[HostT]):
    """The host of each sibling, and what to call once they are all gone (``None``: nothing)."""

    hosts: list[HostT]
    release: Callable[[], Awaitable[None]] | None = None


class HostPool(Protocol[HostT]):
    """Hosts that place siblings themselves (a scheduler: ``RayHosts``); the SDK's ``HostPool[Host]``.

    ``vm.fork(n, hosts=pool)`` asks the pool for room for ``count`` siblings of ``memory_mib`` and
    starts them on the hosts it names, one per sibling; ``release`` runs once they are all closed."""

    async def reserve(self, count: int, memory_mib: int, accel: str) -> Reservation[HostT]: ...


class Owner(Protocol):
    """What ends a VM when the handle that started it closes."""

    async def shutdown(self) -> None: ...


@dataclass
class Connection:
    """An open channel to one VM's supervisor; ``owner`` is set when closing it must stop the VM."""

    channel: Channel
    info: VMInfo
    owner: Owner | None = None

    @property
    def name(self) -> str:
        return self.info["name"]


async def open_connection(socket_path: Path, owner: Owner | None = None) -> Connection:
    stream = await anyio.connect_unix(str(socket_path))
    channel = Channel.over(stream)
    try:
        info = await channel.hello()
    except BaseException:
        await channel.aclose()
        raise
    return Connection(channel, info, owner)


async def close_connections(connections: Sequence[Connection | None]) -> None:
    """Close each (stopping the VMs they own), all at once, even when cancelled."""

    async def close(connection: Connection) -> None:
        await connection.channel.aclose()
        if connection.owner is not None:
            await connection.owner.shutdown()

    with anyio.CancelScope(shield=True):
        async with anyio.create_task_group() as tg:
            for connection in connections:
                if connection is not None:
                    tg.start_soon(close, connection)


@dataclass(frozen=True)
class TransferReport:
    """What a push moved: ``bytes_sent`` (compressed, on the wire) of the ``chunks_sent`` the
    host lacked, against ``bytes_total``, the data (holes excluded) of all ``chunks_total``
    distinct chunks the bundle and any missing kernel, initrd or image are made of."""

    remote_bundle: str
    bytes_total: int
    bytes_sent: int
    chunks_total: int
    chunks_sent: int
    seconds: float


class HostDriver(abc.ABC):
    """Where VMs run.  Every method that starts VMs returns them as open ``Connection``s."""

    name: str

    def address(self, vm_name: str) -> str:
        """How the CLI names VM ``vm_name`` of this host."""
        return vm_name

    async def open(self) -> None:
        """Make sure the host is reachable (drivers connect lazily)."""

    @abc.abstractmethod
    async def info(self) -> HostFacts:
        """Fresh facts: version, arch, QEMU, accelerator, CPUs, load, free memory, VMs."""

    @abc.abstractmethod
    async def push(self, bundle_dir: Path, *, progress: Progress | None = None, trust: bool = False) -> TransferReport:
        """Make a snapshot bundle available to ``restore`` here."""

    @abc.abstractmethod
    async def remove_bundle(self, bundle: str) -> None:
        """Drop a bundle ``push`` brought here (the user's own bundles are never touched)."""

    @abc.abstractmethod
    async def boot(self, request: BootRequest, *, progress: Progress | None = None) -> Connection:
        """A VM booted here (warm: from this host's boot template of its start key, if any)."""

    @abc.abstractmethod
    async def restore(self, request: RestoreRequest, *, progress: Progress | None = None) -> list[Connection]:
        """One VM per name from a bundle of this host; ``siblings`` share its RAM copy-on-write.  Its
        ``mounts`` re-bind the bundle's live mounts or add some."""

    @abc.abstractmethod
    async def fork(
        self, source: Connection, request: ForkRequest, *, bundle_dir: Path | None = None
    ) -> tuple[list[Connection], ForkTemplate]:
        """Siblings of ``source`` (a VM of this host) from one instant, and the template of that
        instant (its pause included); ``bundle_dir`` also gets a bundle of the same instant.  Its
        ``mounts`` re-bind the source's live mounts for the siblings, or add some."""

    @abc.abstractmethod
    async def connect(self, name: str) -> Connection:
        """An unowned connection to VM ``name`` of this host."""

    @abc.abstractmethod
    async def list(self) -> list[VMRow]:
        """The VMs of this host, as ``machinen ls`` shows them."""

    @abc.abstractmethod
    async def stop(self, name: str, *, force: bool = False) -> str:
        """Stop VM ``name``: "stopped", or "killed" (forced, or it did not stop cleanly in time)."""

    async def aclose(self) -> None:
        """Let go of the host; VMs this driver owns stop."""
