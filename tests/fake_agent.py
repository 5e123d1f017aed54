"""An in-process stand-in for the guest agent, speaking ``protocol/wire`` over a socketpair.

For fast tests of the host side of the protocol (``protocol/mux`` under ``VM``, directly
(``fake_vm``) or through a real supervisor relay (``relayed_vm``)):
interleavings, cancellation, a peer that dies.  Tests that claim a VM feature
works use the real agent in a real VM instead.

``exec`` runs a tiny script named by ``argv[0]``:

- ``short TAG``: prints ``TAG`` and exits.
- ``long TAG K``: prints K chunks naming TAG, then waits for ``gate`` before exiting.
- ``echo TAG``: copies stdin to stdout (returning CREDIT as it consumes), exits at EOF.
- ``flood TAG``: prints forever, within its credit (a process whose output nobody reads).
- ``chatty TAG K``: K chunks alternately on stdout and stderr, then exits.

The method ``raw`` (params ``{"frames": [...], "bytes": [...]}``) plays a
hostile agent: it writes each frame as given, the string ``"SID"`` standing
for the call's stream id, encoded without any of ``wire``'s checks, then the
raw byte strings, then (with ``"map_bomb"``) one frame of MAX_FRAME bytes of
empty maps, which decoded without limits builds ~300 MiB of dicts; it finishes
(RESULT) only with ``"then_result"``.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import anyio
import anyio.abc
import msgpack

from machinen_async import VM, Host
from machinen_async.hosts.base import Connection
from machinen_async.protocol import wire
from machinen_async.protocol.framing import FrameStream
from machinen_async.protocol.messages import MachineSpec
from machinen_async.protocol.mux import Channel
from machinen_async.supervisor.config import SupervisorConfig
from machinen_async.supervisor.server import Supervisor


def chunk(tag: str, index: int) -> bytes:
    return f"<{tag}:{index}>".encode()


@dataclass(eq=False)
class _Call:
    sid: int
    credit: dict[int, int] = field(default_factory=lambda: {wire.STDOUT: wire.INITIAL_WINDOW,
                                                            wire.STDERR: wire.INITIAL_WINDOW})  # fmt: skip
    credit_changed: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)

    def __post_init__(self) -> None:
        self.stdin_send, self.stdin = anyio.create_memory_object_stream[bytes](float("inf"))


class FakeAgent:
    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.frames = FrameStream(stream, send_stall_limit=30)  # whole frames, though calls are cancelled
        self.gate = anyio.Event()  # ``long`` calls finish once it is set
        self.live: dict[int, _Call] = {}  # calls started and neither finished nor cancelled
        self.cancelled: set[int] = set()
        self.finished: set[int] = set()
        self.die_after_frames: int | None = None  # close the connection after sending this many
        self.frames_sent = 0
        self.dead = anyio.Event()
        self._dying = False
        self._send_lock = anyio.Lock()  # raw writes must not interleave with frames

    async def serve(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                while True:
                    try:
                        frame = await self.frames.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        break
                    await self._dispatch(frame, tg)
                tg.cancel_scope.cancel()
        finally:
            self.dead.set()

    async def _dispatch(self, frame: list, tg: anyio.abc.TaskGroup) -> None:
        kind, sid = frame[0], frame[1]
        if kind == wire.HELLO:
            await self._send([wire.HELLO, 0, frame[2], wire.PROTOCOL_VERSION, {"fake": True}])
        elif kind == wire.OPEN:
            call = _Call(sid)
            self.live[sid] = call
            tg.start_soon(self._run, call, frame[2], frame[3])
        elif (call := self.live.get(sid)) is not None:
            if kind == wire.CREDIT:
                call.credit[frame[2]] += frame[3]
                call.credit_changed.set()
                call.credit_changed = anyio.Event()
            elif kind == wire.DATA:
                call.stdin_send.send_nowait(frame[3])
            elif kind == wire.EOF:
                call.stdin_send.close()
            elif kind == wire.CANCEL:
                self.cancelled.add(sid)
                del self.live[sid]
                call.scope.cancel()

    async def _send(self, frame: list) -> None:
        if self._dying:
            raise anyio.ClosedResourceError
        async with self._send_lock:
            await self.frames.send(frame)
        self.frames_sent += 1
        if self.die_after_frames is not None and self.frames_sent >= self.die_after_frames:
            self._dying = True
            await self.frames.aclose()

    async def _output(self, call: _Call, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            while call.credit[fd] <= 0:
                await call.credit_changed.wait()
            size = min(len(view), call.credit[fd], wire.CHUNK)
            call.credit[fd] -= size
            await self._send([wire.DATA, call.sid, fd, bytes(view[:size])])
            view = view[size:]

    async def _run(self, call: _Call, method: str, params: dict) -> None:
        with call.scope:
            try:
                if method == "raw":
                    await self._raw(call, params)
                    if not params.get("then_result"):
                        await anyio.sleep_forever()
                if method in ("ping", "raw"):
                    result = {"pong": True}
                elif method == "exec":
                    result = await self._exec(call, params["argv"])
                else:
                    await self._send([wire.ERROR, call.sid, "EXEC_PROTOCOL", f"unknown method {method!r}"])
                    return
                if self.live.pop(call.sid, None) is None:
                    return  # cancelled meanwhile; from now on a CANCEL is for a finished call
                self.finished.add(call.sid)
                await self._send([wire.RESULT, call.sid, result])
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return  # dying

    async def _raw(self, call: _Call, params: dict) -> None:
        blobs = [
            wire.HEADER.pack(wire.MAGIC, len(body)) + body
            for frame in params.get("frames", [])
            for body in [msgpack.packb([call.sid if item == "SID" else item for item in frame], use_bin_type=True)]
        ]
        if params.get("map_bomb"):
            body = b"\xdd" + (wire.MAX_FRAME - 8).to_bytes(4, "big") + b"\x80" * (wire.MAX_FRAME - 8)
            blobs.append(wire.HEADER.pack(wire.MAGIC, len(body)) + body)
        async with self._send_lock:
            for blob in [*blobs, *params.get("bytes", [])]:
                await self.frames._stream.send(blob)

    async def _exec(self, call: _Call, argv: list[str]) -> dict:
        program, tag, *rest = argv
        if program == "short":
            await self._output(call, wire.STDOUT, tag.encode())
        elif program == "long":
            for index in range(int(rest[0])):
                await self._output(call, wire.STDOUT, chunk(tag, index))
            await self.gate.wait()
        elif program == "chatty":
            for index in range(int(rest[0])):
                await self._output(call, wire.STDOUT if index % 2 == 0 else wire.STDERR, chunk(tag, index))
        elif program == "echo":
            async for data in call.stdin:
                await self._output(call, wire.STDOUT, data)
                await self._send([wire.CREDIT, call.sid, wire.STDIN, len(data)])
        elif program == "flood":
            while True:
                await self._output(call, wire.STDOUT, b"x" * wire.CHUNK)
        await self._send([wire.EOF, call.sid, wire.STDOUT])
        await self._send([wire.EOF, call.sid, wire.STDERR])
        return {"exit_code": 0, "signal": None, "timed_out": False}


@asynccontextmanager
async def fake_vm() -> AsyncIterator[tuple[VM, FakeAgent]]:
    """A ``VM`` handle whose channel talks to a ``FakeAgent`` (the SDK's own Channel and FrameStream)."""
    host_end, agent_end = socket.socketpair()
    host_stream = await anyio.abc.UNIXSocketStream.from_socket(host_end)
    agent = FakeAgent(await anyio.abc.UNIXSocketStream.from_socket(agent_end))
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.serve)
        channel = Channel.over(host_stream)
        await channel.hello()
        vm = Host.local().vm(Connection(channel, {"name": "fake"}))
        try:
            yield vm, agent
        finally:
            await vm.aclose()  # the agent reads EOF and ends its calls


@asynccontextmanager
async def relayed_vm(
    tmp_path: Path, make_agent: Callable[[anyio.abc.ByteStream], FakeAgent] = FakeAgent
) -> AsyncIterator[tuple[VM, list[FakeAgent]]]:
    """A ``VM`` whose frames go through a real supervisor relay to fake agents (``make_agent``).

    The fake agents listen where QEMU's agent socket would be; the supervisor
    connects (and after a channel reset, reconnects) as it does to a VM."""
    agent_socket = tmp_path / "agent.sock"
    agents: list[FakeAgent] = []

    async def serve_agent(stream: anyio.abc.ByteStream) -> None:
        agents.append(make_agent(stream))
        await agents[-1].serve()

    machine = MachineSpec(memory_mib=256, cpus=1, accel="tcg", kernel="", initrd="", image="")
    config = SupervisorConfig(name="relay", machine=machine, ram_dir="", boot_timeout=10, detached=False)
    supervisor = Supervisor(config, SimpleNamespace(agent_socket=agent_socket))
    async with await anyio.create_unix_listener(agent_socket) as listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve_agent)
        await supervisor.relay.connect()
        supervisor.capture.task_group = tg
        tg.start_soon(supervisor.relay.read_loop)
        tg.start_soon(supervisor.relay.write_loop)
        client_end, supervisor_end = socket.socketpair()
        tg.start_soon(supervisor.serve_client, await anyio.abc.UNIXSocketStream.from_socket(supervisor_end))
        channel = Channel.over(await anyio.abc.UNIXSocketStream.from_socket(client_end))
        await channel.hello()
        vm = Host.local().vm(Connection(channel, {"name": "relay"}))
        try:
            yield vm, agents
        finally:
            await vm.aclose()
            tg.cancel_scope.cancel()  # a supervisor task that had crashed would have raised before here
