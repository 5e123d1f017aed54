"""Hosts: where VMs run.  ``Host.local()`` is this machine, ``Host.ssh(...)`` another one.

An SSH host is reached with asyncssh, which is asyncio-only while callers
may run trio: the connection lives in a private asyncio loop on a thread
(an anyio blocking portal) and callers await it from any backend.  On the
far side runs the same ``machinen``, as ``machinen _peer`` (see peer.py),
one process per connection.

A remote VM is driven exactly like a local one: its supervisor socket is
forwarded to a local unix socket over the same SSH connection, so
``exec``/``process``/files speak the usual frames, flow control included.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import os
import platform
import shutil
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import asyncssh

from .. import __version__
from ..errors import HostError, MachinenError, SnapshotError, TransferError, error_from_code, plain_errors
from ..ports import PortSpec, parse_port_forwards
from ..protocol import wire
from ..protocol.framing import FrameStream
from ..store import assets, bundle, chunks
from ..vm import DEFAULT_BOOT_TIMEOUT_S, VM, Forks, _Boot, _close_all, _open_channel
from .peer import PEER_PROTOCOL, host_facts

PUTS_IN_FLIGHT = 8
KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 15.0, 4
# No peer request takes this long when the host works (the longest assemble and hash a bundle,
# or boot a VM); past it the call fails and its reply, if it ever comes, is dropped.
REMOTE_CALL_DEADLINE_S = 600.0
MISSING_BATCH = 4096


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


Progress = Callable[[str], None]


class Host:
    """Where VMs run: this machine, or one reached over SSH."""

    name = "local"
    is_local = True

    @staticmethod
    def local() -> LocalHost:
        return LocalHost()

    @staticmethod
    def ssh(
        host: str,
        *,
        port: int | None = None,
        username: str | None = None,
        client_keys: Sequence[str] | None = None,
        known_hosts: Any = (),
        config: Sequence[str] | None = None,
        machinen: str | None = None,
        connect_timeout: float = 15.0,
        **options: Any,
    ) -> SSHHost:
        """A host reached with asyncssh; the options are asyncssh's ``connect`` options.

        ``host`` may be an alias of your ssh config (``~/.ssh/config``, plus
        the file named by ``MACHINEN_SSH_CONFIG``).  ``machinen`` is the
        command that runs machinen there (default ``$MACHINEN_REMOTE_COMMAND``
        or ``machinen``).  Use it as ``async with Host.ssh(...) as hostb``.
        """
        extra_config = os.environ.get("MACHINEN_SSH_CONFIG")
        # Keepalives: a host that vanished (no FIN: power, network) fails calls within a minute
        # instead of leaving them waiting for TCP's own timeout, which is hours.
        settings: dict[str, Any] = {"known_hosts": known_hosts, "connect_timeout": connect_timeout,
                                    "keepalive_interval": KEEPALIVE_INTERVAL_S, "keepalive_count_max": KEEPALIVE_COUNT,
                                    **options}  # fmt: skip
        if port is not None:
            settings["port"] = port
        if username is not None:
            settings["username"] = username
        if client_keys is not None:
            settings["client_keys"] = list(client_keys)
        if config is not None or extra_config:
            settings["config"] = [*(config or ()), *([extra_config] if extra_config else [])]
        command = machinen or os.environ.get("MACHINEN_REMOTE_COMMAND") or "machinen"
        return SSHHost(host, settings, command)

    @staticmethod
    def from_spec(spec: str) -> SSHHost:
        """``[user@]host`` as ssh takes it (aliases from the ssh config included)."""
        username, _, host = spec.rpartition("@")
        if not host or ":" in host or "/" in host:
            raise HostError(f"not a host: {spec!r} (expected [user@]host)", code="HOST_SPEC_INVALID")
        return Host.ssh(host, username=username or None)

    async def info(self) -> dict[str, Any]:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class LocalHost(Host):
    def __repr__(self) -> str:
        return "<Host local>"

    async def info(self) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(host_facts)


class _ProcessStream(anyio.abc.ByteStream):
    """An asyncssh process's stdin/stdout as an anyio byte stream (runs in the portal loop)."""

    def __init__(self, process: asyncssh.SSHClientProcess) -> None:
        self._process = process

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self._process.stdout.read(max_bytes)
        if not data:
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        self._process.stdin.write(item)
        await self._process.stdin.drain()

    async def send_eof(self) -> None:
        self._process.stdin.write_eof()

    async def aclose(self) -> None:
        self._process.close()


class _Link:
    """One SSH connection and the peer process on it.  Lives in the portal's asyncio loop."""

    def __init__(self, destination: str, settings: dict[str, Any], command: str) -> None:
        self.destination = destination
        self.settings = settings
        self.command = command
        self.connection: asyncssh.SSHClientConnection | None = None
        self.process: asyncssh.SSHClientProcess | None = None
        self.frames: FrameStream | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.ids = itertools.count(1)
        self.lost: MachinenError | None = None
        self.reader: asyncio.Task | None = None
        self.forwards: dict[str, tuple[str, asyncssh.SSHListener]] = {}

    async def open(self) -> None:
        try:
            self.connection = await asyncssh.connect(self.destination, **self.settings)
        except (TimeoutError, OSError, asyncssh.Error) as exc:
            raise HostError(f"cannot reach {self.destination}: {exc}", code="HOST_UNREACHABLE") from None
        self.process = await self.connection.create_process(f"{self.command} _peer", encoding=None)
        self.frames = FrameStream(_ProcessStream(self.process))
        self.reader = asyncio.get_running_loop().create_task(self.read_replies())

    async def read_replies(self) -> None:
        try:
            while True:
                reply = await self.frames.receive()
                future = self.pending.pop(reply[0], None)
                if future is not None and not future.done():
                    future.set_result(reply)
        except (anyio.EndOfStream, wire.ProtocolError, OSError, asyncssh.Error):
            pass
        self.lost = await self._why_lost()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(self._lost_error())
        self.pending.clear()

    async def _why_lost(self) -> MachinenError:
        process = self.process
        stderr = b""
        with contextlib.suppress(Exception):
            with anyio.move_on_after(1):
                stderr = await process.stderr.read()
                await process.wait_closed()
        tail = stderr.decode(errors="replace").strip()[-500:]
        if process.exit_status == 127:
            return HostError(
                f"{self.command!r} is not installed on {self.destination}: {tail}", code="HOST_MACHINEN_NOT_FOUND"
            )
        return TransferError(
            f"the connection to {self.destination} was lost" + (f": {tail}" if tail else ""),
            code="HOST_CONNECTION_LOST",
        )

    def _lost_error(self) -> MachinenError:
        """A fresh copy each time: one exception object raised in many tasks tangles tracebacks."""
        if self.lost is None:
            return TransferError(f"the connection to {self.destination} was lost", code="HOST_CONNECTION_LOST")
        return type(self.lost)(self.lost.message, code=self.lost.code)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        if self.lost is not None:
            raise self._lost_error()
        request_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        try:
            await self.frames.send([request_id, method, params or {}])
            reply = await asyncio.wait_for(future, REMOTE_CALL_DEADLINE_S)
        except (OSError, asyncssh.Error, anyio.BrokenResourceError):
            raise self._lost_error() from None
        except TimeoutError:
            raise HostError(
                f"{self.destination} did not answer {method} within {REMOTE_CALL_DEADLINE_S:g} s",
                code="HOST_TIMEOUT",
                retryable=True,
            ) from None
        finally:
            self.pending.pop(request_id, None)
        if reply[1] is True:
            return reply[2]
        raise error_from_code(reply[2], f"{self.destination}: {reply[3]}")

    async def forward(self, remote_socket: str, local_dir: Path) -> str:
        """A local unix socket that reaches ``remote_socket`` on the host."""
        if remote_socket in self.forwards:
            return self.forwards[remote_socket][0]
        local = str(local_dir / f"{hashlib.sha256(remote_socket.encode()).hexdigest()[:16]}.sock")
        Path(local).unlink(missing_ok=True)  # left by an earlier connection
        listener = await self.connection.forward_local_path(local, remote_socket)
        os.chmod(local, 0o600)
        self.forwards[remote_socket] = (local, listener)
        return local

    async def close(self) -> None:
        for _, listener in self.forwards.values():
            listener.close()
        if self.process is not None:
            self.process.stdin.write_eof()
        if self.connection is not None:
            self.connection.close()
            with contextlib.suppress(Exception):
                await self.connection.wait_closed()
        if self.reader is not None:
            self.reader.cancel()

    async def push(self, bundle_dir: Path, report: Progress) -> TransferReport:
        started = time.monotonic()
        raw_manifest = (bundle_dir / bundle.MANIFEST).read_bytes()
        manifest = bundle.parse_manifest(raw_manifest, bundle_dir)
        lacking = await self.call(
            "lacking",
            {"kernel": manifest["kernel"]["sha256"], "initrd": manifest["initrd"]["sha256"],
             "image_key": manifest["image"]["key"], "image_sha256": manifest["image"].get("sha256")},
        )  # fmt: skip
        sources = {name: bundle_dir / name for name in manifest["files"]}
        extras = {key: _local_asset(key, manifest) for key in ("kernel", "initrd", "image") if lacking[key]}
        recipes: dict[str, chunks.Recipe] = {}
        where: dict[bytes, tuple[Path, int]] = {}
        for key, path in {**sources, **extras}.items():
            recipes[key] = await anyio.to_thread.run_sync(chunks.recipe, path)
            for index, digest in enumerate(recipes[key]["chunks"]):
                if digest is not None:
                    where.setdefault(digest, (path, index))
        unique = list(where)
        wanted: list[bytes] = []
        for start in range(0, len(unique), MISSING_BATCH):
            wanted += await self.call("missing", {"digests": unique[start : start + MISSING_BATCH]})
        total_bytes = len(unique) * chunks.CHUNK_SIZE
        sent = {"bytes": 0, "chunks": 0}
        report(f"sending {len(wanted)} of {len(unique)} chunks to {self.destination}")
        limiter = anyio.CapacityLimiter(PUTS_IN_FLIGHT)

        async def put(digest: bytes) -> None:
            async with limiter:
                path, index = where[digest]
                data, compressed = await anyio.to_thread.run_sync(_read_compressed, path, index)
                await self.call("put", {"digest": digest, "data": data, "compressed": compressed})
                sent["bytes"] += len(data)
                sent["chunks"] += 1
                if sent["chunks"] % 64 == 0 or sent["chunks"] == len(wanted):
                    report(f"sent {sent['chunks']}/{len(wanted)} chunks, {sent['bytes'] / 2**20:.1f} MiB")

        with plain_errors():
            async with anyio.create_task_group() as tg:
                for digest in wanted:
                    tg.start_soon(put, digest)
        remote_bundle = await self.call(
            "assemble",
            {"manifest": raw_manifest, "files": {name: recipes[name] for name in sources},
             **{key: recipes[key] for key in extras}},
        )  # fmt: skip
        return TransferReport(
            remote_bundle=remote_bundle,
            bytes_total=total_bytes,
            bytes_sent=sent["bytes"],
            chunks_total=len(unique),
            chunks_sent=sent["chunks"],
            seconds=round(time.monotonic() - started, 3),
        )


def _read_compressed(path: Path, index: int) -> tuple[bytes, bool]:
    data = chunks.read_chunk(path, index)
    packed = zlib.compress(data, 1)
    return (packed, True) if len(packed) < len(data) else (data, False)


def _local_asset(key: str, manifest: dict[str, Any]) -> Path:
    """This host's copy of a bundle's kernel, initrd or image, found by content."""
    if key == "image":
        digest = manifest["image"].get("sha256")
        found = assets.find_image(manifest["image"]["key"], digest) if digest else None
        if found is None:
            raise SnapshotError("this host does not have the bundle's image to send", code="BOOT_IMAGE_NOT_FOUND")
        return found
    found = assets.find_boot_file(manifest[key]["sha256"])
    if found is None:
        raise SnapshotError(f"this host does not have the bundle's {key} to send", code="SNAPSHOT_INCOMPATIBLE")
    return found


class _RemoteOwner:
    """A VM the peer process holds for us: stopping it is asking the peer."""

    def __init__(self, host: SSHHost, name: str) -> None:
        self.host = host
        self.name = name

    async def shutdown(self) -> None:
        if self.host.closed:
            return  # the peer, and with it the VM, went with the connection
        with anyio.CancelScope(shield=True), contextlib.suppress(MachinenError):
            await self.host.call("stop", {"name": self.name})


class SSHHost(Host):
    is_local = False

    def __init__(self, destination: str, settings: dict[str, Any], command: str) -> None:
        self.name = destination
        self._settings = settings
        self._command = command
        self._portal_cm: contextlib.AbstractContextManager | None = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._link: _Link | None = None
        self._sockets_dir: Path | None = None
        self._facts: dict[str, Any] | None = None
        self._open_lock = anyio.Lock()
        self.closed = False

    def __repr__(self) -> str:
        return f"<Host ssh {self.name}>"

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
                self._sockets_dir = Path(tempfile.mkdtemp(prefix="machinen-ssh-"))
            if self._link is None or self._link.lost is not None:
                if self._link is not None:
                    await self._in_loop(self._link.close)
                link = _Link(self.name, self._settings, self._command)
                await self._in_loop(link.open)
                self._link = link
                try:
                    facts = await self._in_loop(link.call, "hello", {"version": __version__})
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await self._in_loop(link.close)
                    self._link = None
                    raise
                if facts.get("version") != __version__ or facts.get("protocol") != PEER_PROTOCOL:
                    await self._in_loop(link.close)
                    self._link = None
                    raise HostError(
                        f"{self.name} runs machinen {facts.get('version')} (peer protocol {facts.get('protocol')}), "
                        f"this is {__version__} (protocol {PEER_PROTOCOL}); install the same version on both",
                        code="HOST_VERSION_MISMATCH",
                    )
                self._facts = facts
            return self._link

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        link = await self._ready_link()
        return await self._in_loop(link.call, method, params)

    async def open(self) -> SSHHost:
        await self._ready_link()
        return self

    async def __aenter__(self) -> SSHHost:
        try:
            return await self.open()
        except BaseException:
            await self.aclose()
            raise

    async def info(self) -> dict[str, Any]:
        """Fresh facts: version, arch, QEMU, accelerator, CPUs, load, free memory."""
        return await self.call("hello", {"version": __version__})

    async def check_compatible(self, manifest: dict[str, Any]) -> None:
        """Refuse, before moving anything, a host that could not run this bundle."""
        facts = await self.info()
        problems = []
        if facts["arch"] != platform.machine():
            problems.append(f"architecture {facts['arch']} (here {platform.machine()})")
        if facts["qemu_version"] != manifest.get("qemu_version"):
            problems.append(f"QEMU {facts['qemu_version']} (the bundle needs {manifest.get('qemu_version')})")
        if facts["accel"] != manifest["machine"]["accel"]:
            problems.append(f"accelerator {facts['accel']} (the bundle needs {manifest['machine']['accel']})")
        if problems:
            raise HostError(f"{self.name} cannot run this VM: " + "; ".join(problems), code="HOST_INCOMPATIBLE")

    async def push(
        self, bundle_dir: str | os.PathLike, *, progress: Progress | None = None, trust: bool = False
    ) -> TransferReport:
        """Copy a snapshot bundle to this host, sending only the chunks it lacks.

        The kernel, initrd and image go along if the host lacks them.  Chunks
        that arrived stay there, so a push cut by a dropped connection resumes
        where it stopped when called again.  Everything is verified by sha256
        on arrival, and the host then vouches for the bundle under its own key
        (so it restores without ``trust``): a bundle this user's machinen did
        not write is therefore pushed only with ``trust=True``.  ``progress`` is
        called from a worker thread.
        """
        path = Path(bundle_dir).expanduser().resolve()
        manifest = await anyio.to_thread.run_sync(functools.partial(bundle.verify, path, trust=trust))
        await self.check_compatible(manifest.data)
        link = await self._ready_link()
        return await self._in_loop(link.push, path, progress or (lambda message: None))

    def restore(
        self,
        remote_bundle: str,
        *,
        name: str | None = None,
        n: int | None = None,
        names: Sequence[str] | None = None,
        ports: Sequence[PortSpec] | None = None,
        detached: bool = False,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT_S,
    ) -> _Boot:
        """Start a VM on this host from a bundle pushed there (``push().remote_bundle``);
        with ``n`` or ``names``, siblings sharing its RAM copy-on-write, named as
        ``restore()`` names them (then ``Forks``).

        Without ``detached`` the VMs live until their handles are closed or this
        connection ends."""
        forwards = parse_port_forwards(ports)
        siblings = n is not None or names is not None
        params = {"bundle": remote_bundle, "name": name, "n": n, "names": list(names) if names is not None else None,
                  "ports": forwards, "detached": detached, "boot_timeout": boot_timeout}  # fmt: skip

        async def start() -> VM | Forks:
            started = (await self.call("restore", params))["vms"]
            vms: list[VM] = []
            try:
                for entry in started:
                    vms.append(await self._attach(entry["name"], entry["socket"], owned=not detached))
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await _close_all(vms)
                    for entry in started[len(vms) :]:
                        with contextlib.suppress(MachinenError):
                            await self.call("stop", {"name": entry["name"]})
                raise
            return Forks(vms) if siblings else vms[0]

        return _Boot(start)

    async def _attach(self, name: str, remote_socket: str, *, owned: bool) -> VM:
        link = await self._ready_link()
        local_socket = await self._in_loop(link.forward, remote_socket, self._sockets_dir)
        channel, info = await _open_channel(Path(local_socket))
        return VM(channel, info, owner=_RemoteOwner(self, name) if owned else None, host=self)

    @contextlib.asynccontextmanager
    async def connect(self, name: str) -> AsyncIterator[VM]:
        """Attach to VM ``name`` on this host; leaving the block only disconnects."""
        located = await self.call("locate", {"name": name})
        vm = await self._attach(name, located["socket"], owned=False)
        try:
            yield vm
        finally:
            await vm.aclose()

    async def list(self) -> list[dict[str, Any]]:
        return await self.call("list")

    async def stop(self, name: str, *, force: bool = False) -> str:
        """Stop VM ``name`` there: "stopped", or "killed" (forced, or it did not stop cleanly in time)."""
        return (await self.call("stop", {"name": name, "force": force}))["how"]

    async def remove_bundle(self, remote_bundle: str) -> None:
        await self.call("remove_bundle", {"bundle": remote_bundle})

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


def split_vm_address(address: str) -> tuple[SSHHost | None, str]:
    """``name`` or ``host:name`` (host as ssh takes it, ``[user@]host``)."""
    host, colon, name = address.rpartition(":")
    if not colon:
        return None, address
    return Host.from_spec(host), name
