"""Caller side of the multiplexed call protocol (see ``wire``).

``Channel`` runs no background task: one of the callers waiting for a frame
holds the *read role*, reads frames and dispatches each to the call it
belongs to; every other waiter sleeps on a broadcast that the reader fires
after each frame it dispatched and when it gives the role up.  So an answer
reaches its caller as soon as it is read, whoever read it, and the role
passes on as soon as its holder has what it waited for.  That keeps a channel
usable from any task, from Jupyter cells and from objects closed with
``aclose()`` rather than a ``with`` block, under asyncio and trio alike.
Memory stays bounded because the peer never sends more than the credit window
per stream and direction.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from ..errors import AgentUnavailableError, ExecError, MachinenError, error_from_code
from . import wire
from .framing import FrameStream

# A supervisor reads its clients all the time; one that takes this long to
# take a frame is wedged, and the connection is dropped.
SEND_STALL_S = 30.0
_CONNECTION_LOST = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class Call:
    """One logical stream: a request, optional data in both directions, one outcome."""

    def __init__(self, channel: Channel, sid: int, method: str) -> None:
        self._channel = channel
        self.sid = sid
        self.method = method
        self._inbox: dict[int, deque[bytes]] = {wire.STDOUT: deque(), wire.STDERR: deque()}
        self._rules = wire.ReplyRules()  # what the peer may still send: it may be a hostile guest
        self._eof = self._rules.closed
        self._unacknowledged = {wire.STDOUT: 0, wire.STDERR: 0}  # consumed, credit not yet returned
        self._send_credit = wire.INITIAL_WINDOW
        self._outcome: tuple[bool, Any] | None = None

    @property
    def done(self) -> bool:
        return self._outcome is not None

    def _on_frame(self, frame: wire.Frame) -> None:
        """Take one (validated) frame; ``ProtocolError`` if the peer broke the protocol."""
        problem = self._rules.refuse(frame)
        if problem is not None:
            raise wire.ProtocolError(f"stream {self.sid}: {problem}")
        kind = wire.kind(frame)
        if kind == wire.DATA:
            fd, payload = wire.data(frame)
            self._inbox[fd].append(payload)
        elif kind == wire.CREDIT:
            self._send_credit += wire.credit(frame)[1]
        elif kind == wire.RESULT:
            self._outcome = (True, wire.result(frame))
        elif kind == wire.ERROR:
            # A call's peer is a guest agent, or a supervisor relaying one: a code we do not know
            # is a failed guest call.
            code, message = wire.error(frame)
            self._outcome = (False, error_from_code(code, message[: wire.MAX_MESSAGE_LEN], unknown=ExecError))
        # An EOF needs nothing more: the rules closed its fd.

    def _fail(self, error: MachinenError) -> None:
        if self._outcome is None:
            self._outcome = (False, error)

    def _raise_if_failed(self) -> None:
        if self._outcome is not None and not self._outcome[0]:
            raise self._outcome[1]

    async def send(self, data: bytes) -> None:
        """Send bytes on the call's input (a process's stdin, a file upload)."""
        view = memoryview(data)
        while view:
            await self._channel.wait_for(lambda: self._send_credit > 0 or self.done)
            self._raise_if_failed()
            if self.done:
                raise ExecError("the call finished; it takes no more input", code="EXEC_STDIN_CLOSED")
            size = min(len(view), self._send_credit, wire.CHUNK)
            self._send_credit -= size
            self._rules.sent(size)
            await self._channel.send([wire.DATA, self.sid, wire.STDIN, bytes(view[:size])])
            view = view[size:]

    async def send_eof(self) -> None:
        if not self.done:
            await self._channel.send([wire.EOF, self.sid, wire.STDIN])

    async def receive(self, fd: int) -> bytes:
        """Next chunk on ``fd``; raises ``anyio.EndOfStream`` after its EOF."""
        inbox = self._inbox[fd]
        await self._channel.wait_for(lambda: bool(inbox) or fd in self._eof or self.done)
        if not inbox:
            self._raise_if_failed()
            raise anyio.EndOfStream
        data = inbox.popleft()
        self._unacknowledged[fd] += len(data)
        if self._unacknowledged[fd] >= wire.INITIAL_WINDOW // 2 and not self.done:
            credit, self._unacknowledged[fd] = self._unacknowledged[fd], 0
            self._rules.grant(fd, credit)
            with anyio.CancelScope(shield=True):  # a cancellation here would lose ``data``
                await self._channel.send([wire.CREDIT, self.sid, fd, credit])
        return data

    async def result(self) -> Any:
        await self._channel.wait_for(lambda: self.done)
        ok, value = self._outcome  # type: ignore[misc]
        if not ok:
            raise value
        return value

    async def control(self, payload: wire.Params) -> None:
        if not self.done:
            await self._channel.send([wire.CONTROL, self.sid, payload])

    async def cancel(self) -> None:
        """Abandon the call; the peer stops its work (kills a process)."""
        if self.done:
            return
        self._fail(ExecError("call cancelled", code="EXEC_CANCELLED"))
        self._channel.forget(self.sid)
        self._channel.state_changed()
        try:
            await self._channel.send([wire.CANCEL, self.sid])
        except MachinenError:
            pass  # the peer is gone, so is the call


class Channel:
    """Multiplexes concurrent calls over one ``FrameStream``."""

    def __init__(self, frames: FrameStream) -> None:
        """Use ``Channel.over(stream)``: it sets the frame stream up as a caller needs it."""
        self._frames = frames
        self._calls: dict[int, Call] = {}
        self._next_sid = 1
        self._reader: anyio.CancelScope | None = None  # the read role's receive, while someone holds it
        self._reader_ready: Callable[[], bool] = lambda: False  # what the role's holder waits for
        self._progress = anyio.Event()  # fired (then replaced) whenever a waiter's condition may have changed
        self._lost: MachinenError | None = None
        self._hello_nonce: bytes | None = None
        self._hello_reply: wire.Params | None = None

    @classmethod
    def over(cls, stream: anyio.abc.ByteStream) -> Channel:
        """A channel on ``stream``: frames written whole, every received frame vetted."""
        return cls(FrameStream(stream, send_stall_limit=SEND_STALL_S, check=wire.validate))

    async def hello(self, info: wire.Params | None = None) -> wire.Params:
        """Start a session; frames from any earlier session are discarded."""
        self._hello_nonce = os.urandom(8)
        self._hello_reply = None
        self._frames.resync = True
        await self.send([wire.HELLO, 0, self._hello_nonce, wire.PROTOCOL_VERSION, info or {}])
        await self.wait_for(lambda: self._hello_reply is not None)
        return self._hello_reply  # type: ignore[return-value]

    async def open(self, method: str, params: wire.Params) -> Call:
        sid = self._next_sid
        self._next_sid += 1
        call = Call(self, sid, method)
        self._calls[sid] = call
        try:
            await self.send([wire.OPEN, sid, method, params])
        except BaseException:
            self._calls.pop(sid, None)
            raise
        return call

    async def call(self, method: str, params: wire.Params | None = None) -> Any:
        call = await self.open(method, params or {})
        try:
            return await call.result()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await call.cancel()
            raise

    def forget(self, sid: int) -> None:
        self._calls.pop(sid, None)

    async def send(self, frame: wire.Frame) -> None:
        if self._lost is not None:
            raise self._lost
        try:
            await self._frames.send(frame)
        except _CONNECTION_LOST as exc:
            self._mark_lost(f"connection lost while sending: {exc!r}")
            raise self._lost from None  # type: ignore[misc]

    async def wait_for(self, ready: Callable[[], bool]) -> None:
        """Return once ``ready()`` holds: read and dispatch frames meanwhile,
        or, while another waiter holds the read role, sleep until it reports progress."""
        while not ready():
            if self._lost is not None:
                raise self._lost
            if self._reader is not None:
                await self._progress.wait()
                continue
            self._reader_ready = ready
            try:
                while not ready() and self._lost is None:
                    frame = None  # stays None when state_changed() interrupts the read
                    with anyio.CancelScope() as self._reader:
                        frame = await self._receive()
                    if frame is not None:
                        self._dispatch(frame)
                        self._wake_waiters()
            finally:
                self._reader = None
                self._wake_waiters()  # one of them takes the role over

    async def _receive(self) -> wire.Frame | None:
        """The next frame; None when the connection is lost or the read was interrupted."""
        try:
            return await self._frames.receive()
        except _CONNECTION_LOST:
            self._mark_lost("the VM closed the connection")
        except wire.ProtocolError as exc:
            self._mark_lost(f"protocol error: {exc}", code="EXEC_PROTOCOL")
        return None

    def state_changed(self) -> None:
        """Something other than a frame (a call was cancelled, the channel closed)
        may have made a waiter ready: if that is the reader, interrupt its receive.
        Only for callers other than the reader itself."""
        if self._reader is not None and (self._lost is not None or self._reader_ready()):
            self._reader.cancel()
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        self._progress.set()
        self._progress = anyio.Event()

    def _dispatch(self, frame: wire.Frame) -> None:
        kind = wire.kind(frame)
        if kind == wire.HELLO:
            nonce, _, info = wire.hello(frame)
            if nonce == self._hello_nonce:
                self._frames.resync = False
                self._hello_reply = info
            return
        if self._hello_reply is None and self._hello_nonce is not None:
            return  # left over from an earlier session
        call = self._calls.get(wire.stream_id(frame))
        if call is None:
            return  # late frame of a cancelled call
        try:
            call._on_frame(frame)
        except wire.ProtocolError as exc:
            self._mark_lost(f"protocol error: {exc}", code="EXEC_PROTOCOL")
            return
        if kind in wire.FINAL_KINDS:
            self._calls.pop(call.sid, None)

    def _mark_lost(self, reason: str, code: str = "EXEC_AGENT_UNAVAILABLE") -> None:
        if self._lost is None:
            self._lost = (
                AgentUnavailableError(reason) if code == "EXEC_AGENT_UNAVAILABLE" else ExecError(reason, code=code)
            )
        for call in self._calls.values():
            call._fail(self._lost)
        self._calls.clear()

    async def aclose(self) -> None:
        self._mark_lost("channel closed")
        self.state_changed()
        with anyio.CancelScope(shield=True):
            await self._frames.aclose()
