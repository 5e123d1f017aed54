"""A host whose ``machinen _peer`` is reached over a byte-stream transport: SSH (hosts/ssh.py)
or a Ray actor (hosts/ray_node.py; the cluster as a pool of such hosts: sdk/ray_pool.py).

The transport's own library may be asyncio-only (asyncssh, Ray's awaitables) while
callers may run trio: the link lives in a private asyncio loop on a thread (an anyio
blocking portal) and callers await it from any backend.  On the far side runs the
same ``machinen``, as ``machinen _peer`` (hosts/peer.py: that machine's
``LocalDriver``, served), one process per link.

A remote VM is driven exactly like a local one: the transport forwards its
supervisor socket to a local unix socket, so ``exec``/``process``/files speak
the usual frames, flow control included.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import hashlib
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.from_thread

from ..errors import ForkError, HostError, MachinenError
from ..protocol.framing import FrameStream
from ..protocol.messages import BootRequest, ForkRequest, ForkTemplate, HostFacts, RestoreRequest, VMRow
from ..store import bundle
from ..store.manifest import Manifest
from ..version import __version__
from . import transfer
from .base import PEER_PROTOCOL, Connection, HostDriver, Progress, TransferReport, close_connections, open_connection
from .client import PeerClient


class Transport(Protocol):
    """One link to a host, used in the driver's asyncio loop."""

    async def open(self) -> anyio.abc.ByteStream:
        """Start ``machinen _peer`` there; its stdin/stdout as a stream."""

    async def why_lost(self) -> MachinenError:
        """The error for calls once the peer's stream ended."""

    async def forward(self, remote_socket: str, local_dir: Path) -> str:
        """A local unix socket (in ``local_dir``) that reaches ``remote_socket`` there."""

    async def close(self) -> None: ...


def forward_path(local_dir: Path, remote_socket: str) -> Path:
    """Where a transport's local end of ``remote_socket`` goes (cleared of one an earlier link left)."""
    local = local_dir / f"{hashlib.sha256(remote_socket.encode()).hexdigest()[:16]}.sock"
    local.unlink(missing_ok=True)
    return local


class _RemoteOwner:
    """A VM the peer process holds for us: stopping it is asking the peer."""

    def __init__(self, driver: RemoteDriver, name: str) -> None:
        self.driver = driver
        self.name = name

    async def shutdown(self) -> None:
        if self.driver.closed:
            return  # the peer, and with it the VM, went with the connection
        with anyio.CancelScope(shield=True), contextlib.suppress(MachinenError):
            await self.driver.call("stop", {"name": self.name})


class _Link:
    """A transport and the peer client over it."""

    def __init__(self, transport: Transport, client: PeerClient) -> None:
        self.transport = transport
        self.client = client

    @classmethod
    async def open(cls, destination: str, transport: Transport) -> _Link:
        stream = await transport.open()
        return cls(transport, PeerClient(destination, FrameStream(stream), transport.why_lost))

    async def close(self) -> None:
        await self.transport.close()
        self.client.close()


class RemoteDriver(HostDriver):
    """A host reached through a ``Transport`` that ``new_transport`` makes for each link."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._portal_cm: contextlib.AbstractContextManager | None = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._link: _Link | None = None
        self._sockets_dir: Path | None = None
        self._open_lock = anyio.Lock()
        self.closed: bool = False

    def address(self, vm_name: str) -> str:
        return f"{self.name}:{vm_name}"

    @abc.abstractmethod
    def new_transport(self) -> Transport:
        """A transport for a new link (made in the portal's loop)."""

    async def _in_loop(self, function, *args: Any) -> Any:
        """Run ``function(*args)`` in the portal loop and await it from any backend."""
        future = self._portal.start_task_soon(function, *args)
        try:
            return await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        except BaseException:
            future.cancel()
            raise

    async def _ready_link(self) -> _Link:
        if self.closed:
            raise HostError(f"the connection to {self.name} was closed", code="HOST_CLOSED")
        async with self._open_lock:
            if self._portal is None:
                self._portal_cm = anyio.from_thread.start_blocking_portal("asyncio")
                self._portal = await anyio.to_thread.run_sync(self._portal_cm.__enter__)
                self._sockets_dir = Path(tempfile.mkdtemp(prefix="machinen-link-"))
            if self._link is None or self._link.client.lost is not None:
                if self._link is not None:
                    await self._in_loop(self._link.close)
                    self._link = None
                link = await self._in_loop(_Link.open, self.name, self.new_transport())
                try:
                    facts = await self._in_loop(link.client.call, "hello", {"version": __version__})
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await self._in_loop(link.close)
                    raise
                if facts.get("version") != __version__ or facts.get("protocol") != PEER_PROTOCOL:
                    await self._in_loop(link.close)
                    raise HostError(
                        f"{self.name} runs machinen {facts.get('version')} (peer protocol {facts.get('protocol')}), "
                        f"this is {__version__} (protocol {PEER_PROTOCOL}); install the same version on both",
                        code="HOST_VERSION_MISMATCH",
                    )
                self._link = link
            return self._link

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        link = await self._ready_link()
        return await self._in_loop(link.client.call, method, params)

    async def open(self) -> None:
        await self._ready_link()

    async def info(self) -> HostFacts:
        return await self.call("hello", {"version": __version__})

    async def _check_compatible(self, manifest: Manifest) -> None:
        """Refuse, before moving anything, a host that could not run this bundle."""
        facts = await self.info()
        problems = []
        if facts["arch"] != platform.machine():
            problems.append(f"architecture {facts['arch']} (here {platform.machine()})")
        if facts["qemu_version"] != manifest.qemu_version:
            problems.append(f"QEMU {facts['qemu_version']} (the bundle needs {manifest.qemu_version})")
        if facts["accel"] != manifest.machine.accel:
            problems.append(f"accelerator {facts['accel']} (the bundle needs {manifest.machine.accel})")
        if problems:
            raise HostError(f"{self.name} cannot run this VM: " + "; ".join(problems), code="HOST_INCOMPATIBLE")

    async def push(self, bundle_dir: Path, *, progress: Progress | None = None, trust: bool = False) -> TransferReport:
        # The manifest is read once and its MAC checked on those bytes, each file opened once and
        # hashed: what is sent below is exactly that, whatever happens to the directory meanwhile.
        opened = await anyio.to_thread.run_sync(functools.partial(bundle.open_checked, bundle_dir, trust=trust))
        try:
            recipes = await anyio.to_thread.run_sync(transfer.checked_recipes, opened)
            await self._check_compatible(opened.checked.manifest)
            link = await self._ready_link()
        except BaseException:
            opened.close()
            raise
        # send_bundle owns ``opened`` from here (it closes it once its reads are over, also when cancelled).
        return await self._in_loop(
            transfer.send_bundle, link.client.call, self.name, opened, progress or (lambda message: None), recipes
        )

    async def remove_bundle(self, bundle: str) -> None:
        await self.call("remove_bundle", {"bundle": bundle})

    async def _attach(self, name: str, remote_socket: str, *, owned: bool) -> Connection:
        link = await self._ready_link()
        local_socket = await self._in_loop(link.transport.forward, remote_socket, self._sockets_dir)
        return await open_connection(Path(local_socket), _RemoteOwner(self, name) if owned else None)

    async def _attach_started(self, started: list[dict[str, Any]], *, detached: bool) -> list[Connection]:
        """Connections to VMs the peer just started; if one cannot be reached, none stay."""
        connections: list[Connection] = []
        try:
            for entry in started:
                connections.append(await self._attach(entry["name"], entry["socket"], owned=not detached))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await close_connections(connections)
                for entry in started[len(connections) :]:
                    await _RemoteOwner(self, entry["name"]).shutdown()
            raise
        return connections

    async def boot(self, request: BootRequest, *, progress: Progress | None = None) -> Connection:
        # ``progress`` stays here: what the host reports of a pull is its own log's.
        started = (await self.call("boot", {"request": request.to_wire()}))["vms"]
        (connection,) = await self._attach_started(started, detached=request.detached)
        return connection

    async def restore(self, request: RestoreRequest, *, progress: Progress | None = None) -> list[Connection]:
        started = (await self.call("restore", {"request": request.to_wire()}))["vms"]
        return await self._attach_started(started, detached=request.detached)

    async def fork(
        self, source: Connection, request: ForkRequest, *, bundle_dir: Path | None = None
    ) -> tuple[list[Connection], ForkTemplate]:
        if bundle_dir is not None:
            raise ForkError("spread the forks of a remote VM from the host it runs on", code="FORK_REMOTE_SOURCE")
        result = await self.call("fork", {"source": source.name, "request": request.to_wire()})
        template = ForkTemplate.from_wire(result["template"])
        return await self._attach_started(result["vms"], detached=request.detached), template

    async def connect(self, name: str) -> Connection:
        located = await self.call("locate", {"name": name})
        return await self._attach(name, located["socket"], owned=False)

    async def list(self) -> list[VMRow]:
        return await self.call("list")

    async def stop(self, name: str, *, force: bool = False) -> str:
        return (await self.call("stop", {"name": name, "force": force}))["how"]

    async def aclose(self) -> None:
        """Close the connection; VMs started through it without ``detached`` stop."""
        self.closed = True
        with anyio.CancelScope(shield=True):
            if self._portal is not None:
                if self._link is not None:
                    await self._in_loop(self._link.close)
                    self._link = None
                await anyio.to_thread.run_sync(self._portal_cm.__exit__, None, None, None)
                self._portal = self._portal_cm = None
            if self._sockets_dir is not None:
                shutil.rmtree(self._sockets_dir, ignore_errors=True)
                self._sockets_dir = None
