"""Frames over an anyio byte stream (any transport: unix socket, vsock, ...)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import anyio
import anyio.abc

from . import wire


class FrameStream:
    """Whole-frame send/receive over a byte stream; safe for concurrent senders."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        *,
        resync: bool = False,
        send_stall_limit: float | None = None,
        max_frame: int = wire.MAX_FRAME,
        check: Callable[[wire.Frame], None] | None = None,
    ) -> None:
        """``max_frame`` and ``check`` bound and vet what is received (see
        ``wire.FrameDecoder``).  With ``send_stall_limit``, a frame is always written whole: a send
        cancelled half-way (trio writes in pieces) would leave the peer reading
        the next frame from the middle of this one, so cancellation waits for
        the write, for at most that many seconds; a peer that takes longer to
        read it gets the stream closed as broken.  A frame that was written is
        reported sent, even to a caller cancelled meanwhile (the caller's next
        checkpoint raises), so a caller never mistakes a sent frame for an
        unsent one.  Without a limit, sends are plainly cancellable: for peers
        that may legitimately stop reading, where a send is only ever cancelled
        when the connection is being dropped anyway."""
        self._stream = stream
        self._raw_socket = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        self._send_stall_limit = send_stall_limit
        self._decoder = wire.FrameDecoder(resync=resync, max_frame=max_frame, check=check)
        self._pending: deque[wire.Frame] = deque()
        self._send_lock = anyio.Lock()
        self._readable_wait: anyio.CancelScope | None = None

    @property
    def resync(self) -> bool:
        return self._decoder.resync

    @resync.setter
    def resync(self, value: bool) -> None:
        self._decoder.resync = value

    async def send(self, frame: wire.Frame) -> None:
        data = wire.encode(frame)
        async with self._send_lock:
            if self._send_stall_limit is None:
                await self._stream.send(data)
                return
            with anyio.move_on_after(self._send_stall_limit, shield=True) as stalled:
                await self._stream.send(data)
            if stalled.cancelled_caught:
                await self.aclose()
                raise anyio.BrokenResourceError(f"the peer read nothing for {self._send_stall_limit:g} s")

    async def receive(self) -> wire.Frame:
        """Next frame; raises ``anyio.EndOfStream`` when the peer closed."""
        while not self._pending:
            if self._raw_socket is not None:
                await self._wait_readable()
            chunk = await self._stream.receive(256 * 1024)
            self._pending.extend(self._decoder.feed(chunk))
        return self._pending.popleft()

    async def _wait_readable(self) -> None:
        """anyio's asyncio UNIX socket ``receive``, cancelled in the loop iteration
        in which data arrives, logs an InvalidStateError from its reader callback
        (readers here are cancelled routinely); ``wait_readable`` tolerates that,
        so the wait happens there and ``receive`` then finds the data at once.
        ``aclose`` ends the wait: a closed socket would not."""
        if self._raw_socket.fileno() < 0:
            raise anyio.ClosedResourceError
        try:
            with anyio.CancelScope() as self._readable_wait:
                await anyio.wait_readable(self._raw_socket)
        finally:
            self._readable_wait = None
        if self._raw_socket.fileno() < 0:
            raise anyio.ClosedResourceError

    async def aclose(self) -> None:
        if self._readable_wait is not None:
            self._readable_wait.cancel()
        await self._stream.aclose()
