"""The agent session: one channel to the guest agent, and the client calls routed through it.

The guest may be hostile and may break its channel at any time: every frame
it sends is checked against the call it claims to belong to, and a broken
channel fails the calls in flight and is re-established.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..errors import error_from_code
from ..protocol import wire
from ..protocol.framing import FrameStream
from ..vmm import capped_log

log: structlog.typing.FilteringBoundLogger = structlog.get_logger("machinen.supervisor")

HELLO_RETRY_S = 0.2
AGENT_RECONNECT_TIMEOUT_S = 10.0
AGENT_SEND_STALL_S = 10.0
# A guest that breaks its channel over and over costs at most this many log lines and
# reconnects a minute; beyond them each reconnect waits RESET_BACKOFF_S, logged once.
RESETS_PER_WINDOW, RESET_BACKOFF_S = 5, 1.0
CHANNEL_DOWN = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class Outbox:
    """Frames waiting for one caller, never waiting to be queued (the agent relay must not wait
    for a caller that is not reading) and bounded in bytes, whatever the guest sends.

    The credit windows bound the *bytes* of output a guest may have queued per call; a
    frame costs far more than its bytes, though, and a guest may send output a byte per
    frame.  So output queued for a (call, fd) that is still waiting grows that frame (up to
    ``wire.CHUNK``) instead of adding one, and a CREDIT adds to one still waiting: what a
    call can hold here is its windows' bytes in about window / CHUNK frames.  Output may
    then arrive earlier relative to another fd's, never reordered within an fd."""

    def __init__(self) -> None:
        self._frames: deque[wire.Frame] = deque()
        self._growing: dict[tuple[int, int, int], wire.Frame] = {}  # (sid, kind, fd) -> frame still queued
        self._changed = anyio.Event()

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, frame: wire.Frame) -> None:
        kind, key = wire.kind(frame), wire.join_key(frame)
        if key is not None:
            waiting = self._growing.get(key)
            if waiting is not None and wire.join(waiting, frame):
                return
            self._growing[key] = frame
        elif kind in wire.FINAL_KINDS or kind == wire.EOF:
            # Nothing may join output queued before the call's end or an fd's EOF.
            sid = wire.stream_id(frame)
            for stale in [stale for stale in self._growing if stale[0] == sid]:
                del self._growing[stale]
        self._frames.append(frame)
        self._changed.set()

    async def get(self) -> wire.Frame:
        while not self._frames:
            self._changed = anyio.Event()
            await self._changed.wait()
        frame = self._frames.popleft()
        key = wire.join_key(frame)
        if key is not None and self._growing.get(key) is frame:
            del self._growing[key]
        return wire.joined(frame)

    def __aiter__(self) -> Outbox:
        return self

    async def __anext__(self) -> wire.Frame:
        return await self.get()


class ClientConnection:
    """One caller: a socket client, or (``frames`` None) a port-forward tunnel or live mount of our own.

    Frames for it wait in its ``Outbox``, so the agent relay never waits for a
    client that is not reading."""

    def __init__(self, frames: FrameStream | None) -> None:
        self.frames: FrameStream | None = frames
        self.agent_sids: dict[int, int] = {}  # client sid -> agent sid
        self.outbox: Outbox = Outbox()

    async def write_loop(self) -> None:
        with contextlib.suppress(*CHANNEL_DOWN):  # gone: its read side ends the connection
            async for frame in self.outbox:
                await self.frames.send(frame)


@dataclass(eq=False)
class Route:
    """An agent call, the client call it belongs to, and what the agent may still send on it.

    The guest may be hostile: it gets no more output window than the client
    granted, and only the frames an agent sends on a call."""

    client: ClientConnection
    client_sid: int
    rules: wire.ReplyRules = field(default_factory=wire.ReplyRules)

    def late(self, frame: wire.Frame) -> bool:
        """Output on an fd after its EOF: dropped, not relayed (agents before 0.2 could race
        a detached pump's last frames against its EOF; it costs nothing here)."""
        fd = wire.output_fd(frame)
        return fd is not None and fd in self.rules.closed


class AgentRelay:
    """The channel to the agent listening on ``agent_socket`` of the VM named ``hostname``."""

    def __init__(self, agent_socket: Path, hostname: str) -> None:
        self.agent_socket = agent_socket
        self.hostname = hostname
        self.machine_id: str = secrets.token_hex(16)  # /etc/machine-id: one per VM, as systemd makes one
        self.agent: FrameStream | None = None
        self.agent_up: bool = False
        self.agent_session: int = 0  # counts agent sessions; a frame queued for an earlier one is dropped
        to_agent = anyio.create_memory_object_stream[tuple[int, wire.Frame]](math.inf)
        self.to_agent_send: MemoryObjectSendStream[tuple[int, wire.Frame]] = to_agent[0]
        self.to_agent: MemoryObjectReceiveStream[tuple[int, wire.Frame]] = to_agent[1]
        self.agent_info: wire.Params = {}
        self.routes: dict[int, Route] = {}  # by agent sid
        self.next_agent_sid: int = 1

    async def connect(self, *, resume: anyio.Event | None = None, new_identity: bool = False) -> None:
        """Connect to the agent socket and complete a HELLO exchange.

        With ``resume`` (a restored or forked VM), the HELLO goes out once the
        state is loaded (``resume`` set), just before the guest continues,
        and carries the sibling's identity: hostname, machine-id, the host's
        time (fresh in every retry) and entropy.  The agent applies it on the
        new session before answering, so no separate call is needed.  A cold
        boot's first HELLO carries one too (``new_identity``), so a booted VM
        and a resumed one are alike; a reconnect's never does.
        """
        while True:
            try:
                stream = await anyio.connect_unix(str(self.agent_socket))
                break
            except OSError:
                await anyio.sleep(0.01)
        # A guest that stops reading its port must not hold our writer (and everything queued
        # behind it) forever: past the stall limit the channel counts as broken and is reset.
        self.agent = FrameStream(
            stream,
            resync=True,
            max_frame=wire.MAX_GUEST_FRAME,
            check=wire.validate,
            send_stall_limit=AGENT_SEND_STALL_S,
        )
        try:
            await self._hello(resume, new_identity or resume is not None)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.agent.aclose()
            raise

    async def _hello(self, resume: anyio.Event | None, new_identity: bool) -> None:
        nonce = secrets.token_bytes(8)

        async def send_hellos() -> None:
            if resume is not None:
                await resume.wait()
            with contextlib.suppress(*CHANNEL_DOWN):  # broken: the receive below says so
                while True:
                    params = {"resume": self._identity()} if new_identity else {}
                    await self.agent.send([wire.HELLO, 0, nonce, wire.PROTOCOL_VERSION, params])
                    await anyio.sleep(HELLO_RETRY_S)

        async with anyio.create_task_group() as tg:
            tg.start_soon(send_hellos)
            while True:
                frame = await self.agent.receive()
                if wire.kind(frame) != wire.HELLO:
                    continue
                reply_nonce, _, info = wire.hello(frame)
                if reply_nonce == nonce:
                    self.agent_info = info
                    self.agent.resync = False
                    self.agent_session += 1
                    self.agent_up = True
                    tg.cancel_scope.cancel()
                    break

    def _identity(self) -> wire.Params:
        """What a new guest takes on: its name, a machine-id, the host's time, fresh entropy."""
        return {"hostname": self.hostname, "machine_id": self.machine_id, "time_ns": time.time_ns(),
                "entropy": secrets.token_bytes(64)}  # fmt: skip

    async def send_identity(self) -> None:
        """For an agent from before identity travelled in HELLO (an older bundle's RAM)."""
        self.agent_info = await self.call("resumed", self._identity())

    async def call(self, method: str, params: wire.Params) -> Any:
        """A unary agent call of the supervisor's own; only before the read loop runs."""
        sid = self.next_agent_sid
        self.next_agent_sid += 1
        await self.agent.send([wire.OPEN, sid, method, params])
        while True:
            frame = await self.agent.receive()
            if wire.stream_id(frame) != sid:
                continue
            if wire.kind(frame) == wire.RESULT:
                return wire.result(frame)
            if wire.kind(frame) == wire.ERROR:
                raise error_from_code(*wire.error(frame))

    def send(self, frame: wire.Frame) -> bool:
        """Queue ``frame`` for the agent; False while the channel is down (being re-established).

        Never waits: a guest that is slow to read its port (or paused) must not
        stall the client loop that relays a frame, nor that client's other calls,
        nor other clients.  The queue is bounded by the credit windows."""
        if self.agent is None or not self.agent_up:
            return False
        if (route := self.routes.get(wire.stream_id(frame))) is not None:
            if wire.kind(frame) == wire.CREDIT:
                route.rules.grant(*wire.credit(frame))
            elif wire.kind(frame) == wire.DATA:
                fd, payload = wire.data(frame)
                if fd == wire.STDIN:
                    route.rules.sent(len(payload))
        self.to_agent_send.send_nowait((self.agent_session, frame))
        return True

    def open_call(self, client: ClientConnection, sid: int, method: str, params: wire.Params) -> int | None:
        """Route a new call of ``client`` to the agent; its frames will arrive in ``client.outbox``."""
        agent_sid = self.next_agent_sid
        self.next_agent_sid += 1
        self.routes[agent_sid] = Route(client, sid)
        client.agent_sids[sid] = agent_sid
        if self.send([wire.OPEN, agent_sid, method, params]):
            return agent_sid
        self.routes.pop(agent_sid, None)
        client.agent_sids.pop(sid, None)
        client.outbox.put(
            [wire.ERROR, sid, "EXEC_AGENT_UNAVAILABLE", "the guest agent channel is being re-established"]
        )
        return None

    def cancel(self, agent_sid: int) -> None:
        """Abandon a call: nothing more of it is relayed, and the agent stops its process."""
        self.routes.pop(agent_sid, None)
        self.send([wire.CANCEL, agent_sid])

    async def reset(self) -> wire.Params:
        """Drop and re-establish the channel (a new agent session), as a restore does; for
        recovering a wedged channel and for tests.  The read loop reconnects; returns the new
        session's agent info."""
        old = self.agent
        await old.aclose()
        while self.agent is old or not self.agent_up:
            await anyio.sleep(0.01)
        return self.agent_info

    async def write_loop(self) -> None:
        async for session, frame in self.to_agent:
            if session != self.agent_session:
                continue  # for a session that was reset: its calls have already failed
            with contextlib.suppress(*CHANNEL_DOWN):  # the read loop sees the reset and reconnects
                await self.agent.send(frame)

    async def _reconnect(self) -> None:
        """Until the agent answers a HELLO again.  A guest whose agent stays silent keeps
        running (and can be stopped, snapshotted, reset); its calls fail as unavailable."""
        attempts, connected = 0, False
        while not connected:
            attempts += 1
            try:
                with anyio.fail_after(AGENT_RECONNECT_TIMEOUT_S):
                    await self.connect()
                connected = True
            except* (TimeoutError, *CHANNEL_DOWN, anyio.EndOfStream, wire.ProtocolError):
                if attempts == 1:
                    log.error("guest agent does not answer after a channel reset; still trying")
        log.info("agent channel re-established", attempts=attempts)

    def fail_all_calls(self, message: str) -> None:
        for route in self.routes.values():
            route.client.agent_sids.pop(route.client_sid, None)
            route.client.outbox.put([wire.ERROR, route.client_sid, "EXEC_AGENT_UNAVAILABLE", message])
        self.routes.clear()

    async def read_loop(self) -> None:
        """Relay agent frames to clients; on a channel reset, reconnect.

        Calls in flight fail with EXEC_AGENT_UNAVAILABLE (retryable); their
        guest processes keep running, orphaned, as after a restore.
        """
        resets = capped_log.Budget(RESETS_PER_WINDOW, capped_log.BUDGET_WINDOW_S)
        while True:
            try:
                frame = await self.agent.receive()
            except (*CHANNEL_DOWN, anyio.EndOfStream, wire.ProtocolError) as exc:
                within_budget = resets.spend()
                if within_budget:
                    log.warning("agent channel reset", error=repr(exc))
                elif resets.just_exhausted:
                    log.warning("agent channel keeps resetting: reconnects slowed, not logged for a while")
                self.agent_up = False
                self.fail_all_calls("the guest agent channel was reset")
                with contextlib.suppress(*CHANNEL_DOWN):
                    await self.agent.aclose()
                if not within_budget:
                    await anyio.sleep(RESET_BACKOFF_S)
                await self._reconnect()
                continue
            agent_sid = wire.stream_id(frame)
            route = self.routes.get(agent_sid)
            if route is None:
                continue  # late output of a call whose client left (or a stray HELLO)
            if route.late(frame):
                continue
            problem = route.rules.refuse(frame)
            if problem is not None:
                log.warning("guest agent broke the protocol", call=agent_sid, problem=problem)
                frame = [wire.ERROR, agent_sid, "EXEC_PROTOCOL", f"the guest agent broke the protocol: {problem}"]
                self.send([wire.CANCEL, agent_sid])
            if wire.kind(frame) in wire.FINAL_KINDS:
                del self.routes[agent_sid]
                route.client.agent_sids.pop(route.client_sid, None)
            route.client.outbox.put(wire.readdressed(frame, route.client_sid))
