"""A Ray node as a host: one actor per node owns that node's ``machinen _peer``, and actor calls
carry its byte streams (the peer link, and each VM's supervisor socket).

``NodeAgent`` is the actor's body; it runs in a Ray worker on the node, in that node's
environment (``MACHINEN_HOME`` and the other directories of whoever ran ``ray start``
there).  ``RayNodeDriver`` is the caller's side: the usual remote driver (hosts/remote.py)
whose transport is ``RayTransport``.  Ray is an optional dependency: only a pool
(sdk/ray_pool.py) imports this module.

Lifetime: the peer serves as long as its stdin is open, and stops the VMs it started
(without ``detached``) when it closes; the actor holds that stdin, and Ray ends an actor
with the driver (job) that created it, or with its node.  The peer is not the worker's
child (``setsid --fork``), so Ray's clean-up of a worker's children cannot kill it before
it stopped its VMs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from ray.exceptions import RayError

from ..errors import HostError, MachinenError, TransferError
from .remote import RemoteDriver, forward_path

# What one actor call carries at most; a stream's reader asks for this much.
RELAY_CHUNK = 1024 * 1024
# Bytes a stream queues for its actor before a send waits.
SEND_WINDOW = 4 * RELAY_CHUNK
# How long closing a stream waits for its queued bytes to reach the actor.
CLOSE_DRAIN_S = 10.0
PEER_LOG_TAIL = 4000


class NodeAgent:
    """The actor: byte streams to a ``machinen _peer`` it starts and to unix sockets of its node."""

    def __init__(self) -> None:
        self._streams: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self._logs: dict[int, bytearray] = {}
        self._ids = itertools.count(1)

    async def start_peer(self) -> int:
        process = await asyncio.create_subprocess_exec(
            "setsid", "--fork", sys.executable, "-m", "machinen_async", "_peer",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stream_id = next(self._ids)
        self._streams[stream_id] = (process.stdout, process.stdin)
        self._logs[stream_id] = bytearray()
        asyncio.get_running_loop().create_task(self._keep_log(stream_id, process.stderr))
        return stream_id

    async def _keep_log(self, stream_id: int, stderr: asyncio.StreamReader) -> None:
        """The tail of the peer's stderr, which says why it ended."""
        while data := await stderr.read(65536):
            log = self._logs[stream_id]
            log += data
            del log[:-PEER_LOG_TAIL]

    async def peer_log(self, stream_id: int) -> bytes:
        return bytes(self._logs.get(stream_id, b""))

    async def open_socket(self, path: str) -> int:
        reader, writer = await asyncio.open_unix_connection(path, limit=RELAY_CHUNK)
        stream_id = next(self._ids)
        self._streams[stream_id] = (reader, writer)
        return stream_id

    async def receive(self, stream_id: int) -> bytes:
        """The next bytes of a stream; empty at its end."""
        return await self._streams[stream_id][0].read(RELAY_CHUNK)

    async def send(self, stream_id: int, data: bytes) -> None:
        writer = self._streams[stream_id][1]
        writer.write(data)
        await writer.drain()

    async def send_eof(self, stream_id: int) -> None:
        writer = self._streams[stream_id][1]
        if writer.can_write_eof():
            writer.write_eof()
        else:
            writer.close()  # a pipe: closing it is its EOF

    async def close(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream[1].close()


async def _result(call: Any) -> Any:
    """Await an actor call (a Ray ``ObjectRef``) without ever cancelling the call's own future: a
    cancelled caller only stops waiting.  Ray Client (``ray://``) sets that future when the answer
    comes, cancelled or not, and logs a traceback for each one it finds cancelled; awaiting the
    ref itself would cancel it, and so would the end of the loop of a task still awaiting it."""
    answered = call.future()  # a concurrent.futures.Future, settled from Ray's threads
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def settle(_: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_copy_outcome, answered, waiter)

    answered.add_done_callback(settle)
    return await waiter


def _copy_outcome(answered: Any, waiter: asyncio.Future[Any]) -> None:
    if waiter.done():
        return
    if answered.cancelled():
        waiter.cancel()
    elif (error := answered.exception()) is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(answered.result())


def _lost(node: str) -> anyio.BrokenResourceError:
    return anyio.BrokenResourceError(f"the Ray actor of node {node} is gone")


class _ActorStream(anyio.abc.ByteStream):
    """One stream of the actor as an anyio byte stream (in the driver's asyncio loop).

    Writes go behind: ``send`` queues the bytes and returns while the queue holds less
    than ``SEND_WINDOW``, and one flusher hands the actor everything queued in a single
    call.  One call at a time, because Ray does not keep an async actor's calls in
    order; everything at once, because a call costs ~3.5 ms here whatever it carries
    (256 KiB chunk frames one call each gave ~90 MB/s, coalesced ~1 GB/s).  A failed
    call breaks the stream: later sends raise, and the reader sees the actor gone.
    """

    def __init__(self, actor: Any, stream_id: int, node: str) -> None:
        self._actor = actor
        self._id = stream_id
        self._node = node
        self._outbox = bytearray()
        self._in_flight = False
        self._failure: anyio.BrokenResourceError | None = None
        self._changed = asyncio.Condition()
        self._flusher: asyncio.Task[None] | None = None

    async def _call(self, method: Any, *args: Any) -> Any:
        try:
            return await _result(method.remote(self._id, *args))
        except RayError:
            raise _lost(self._node) from None

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self._call(self._actor.receive)
        if not data:
            raise anyio.EndOfStream
        return data

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise anyio.BrokenResourceError(*self._failure.args)

    async def send(self, item: bytes) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._outbox) < SEND_WINDOW or self._failure)
            self._raise_failure()
            self._outbox += item
            self._changed.notify_all()
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: self._outbox)
                data = bytes(self._outbox)
                self._outbox.clear()
                self._in_flight = True
                self._changed.notify_all()  # room again for senders
            try:
                await self._call(self._actor.send, data)
            except anyio.BrokenResourceError as exc:
                self._failure = exc
                return
            finally:
                async with self._changed:
                    self._in_flight = False
                    self._changed.notify_all()

    async def _drained(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: not (self._outbox or self._in_flight) or self._failure)
        self._raise_failure()

    async def send_eof(self) -> None:
        await self._drained()
        await self._call(self._actor.send_eof)

    async def aclose(self) -> None:
        with anyio.move_on_after(CLOSE_DRAIN_S), contextlib.suppress(anyio.BrokenResourceError):
            await self._drained()
        if self._flusher is not None:
            self._flusher.cancel()
        with contextlib.suppress(anyio.BrokenResourceError):
            await self._call(self._actor.close)


async def _pump(source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream) -> None:
    """Copy until ``source`` ends, then pass the end on."""
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            await sink.send(await source.receive(RELAY_CHUNK))
    await sink.send_eof()


class RayTransport:
    """The link to one node's actor; lives in the driver's asyncio loop."""

    def __init__(self, actor: Any, node: str) -> None:
        self.actor = actor
        self.node = node
        self.peer: int | None = None
        self.peer_stream: _ActorStream | None = None
        self.forwards: dict[str, tuple[str, asyncio.Task[None]]] = {}

    async def open(self) -> anyio.abc.ByteStream:
        try:
            self.peer = await _result(self.actor.start_peer.remote())
        except RayError as exc:
            raise HostError(
                f"Ray node {self.node} cannot start machinen: {exc}", code="HOST_UNREACHABLE", retryable=True
            ) from None
        self.peer_stream = _ActorStream(self.actor, self.peer, self.node)
        return self.peer_stream

    async def why_lost(self) -> MachinenError:
        tail = ""
        with contextlib.suppress(RayError):
            tail = (await _result(self.actor.peer_log.remote(self.peer))).decode(errors="replace").strip()[-500:]
        return TransferError(
            f"the link to Ray node {self.node} was lost" + (f": {tail}" if tail else " (its actor or node is gone)"),
            code="HOST_CONNECTION_LOST",
        )

    async def forward(self, remote_socket: str, local_dir: Path) -> str:
        """A local unix socket whose every connection is relayed to ``remote_socket`` on the node."""
        if remote_socket in self.forwards:
            return self.forwards[remote_socket][0]
        local = forward_path(local_dir, remote_socket)
        listener = await anyio.create_unix_listener(local, mode=0o600)
        self.forwards[remote_socket] = (str(local), asyncio.create_task(listener.serve(self._relayer(remote_socket))))
        return str(local)

    def _relayer(self, remote_socket: str) -> Callable[[anyio.abc.ByteStream], Awaitable[None]]:
        async def relay(local: anyio.abc.ByteStream) -> None:
            async with local:
                try:
                    stream_id = await _result(self.actor.open_socket.remote(remote_socket))
                    remote = _ActorStream(self.actor, stream_id, self.node)
                except RayError:
                    return  # the caller sees the connection end, as when a VM is gone
                try:
                    async with anyio.create_task_group() as tg:

                        async def one_way(source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream) -> None:
                            try:
                                await _pump(source, sink)
                            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                                tg.cancel_scope.cancel()  # either end went: close both

                        tg.start_soon(one_way, remote, local)
                        await one_way(local, remote)
                finally:
                    with anyio.CancelScope(shield=True):
                        await remote.aclose()

        return relay

    async def close(self) -> None:
        for _, task in self.forwards.values():
            task.cancel()
        self.forwards.clear()
        if self.peer_stream is not None:
            await self.peer_stream.aclose()


class RayNodeDriver(RemoteDriver):
    """The VMs of one Ray node, reached through its ``NodeAgent`` actor."""

    def __init__(self, node_id: str, actor: Any) -> None:
        super().__init__(node_id)
        self.actor = actor

    def new_transport(self) -> RayTransport:
        return RayTransport(self.actor, self.name)
