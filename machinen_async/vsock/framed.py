"""Frames over an anyio byte stream (any transport: unix socket, vsock, ...)."""

from __future__ import annotations

from collections import deque

import anyio
import anyio.abc
import anyio.lowlevel

from . import wire


class FrameStream:
    """Whole-frame send/receive over a byte stream; safe for concurrent senders."""

    def __init__(
        self, stream: anyio.abc.ByteStream, *, resync: bool = False, send_stall_limit: float | None = None
    ) -> None:
        """With ``send_stall_limit``, a frame is always written whole: a send
        cancelled half-way (trio writes in pieces) would leave the peer reading
        the next frame from the middle of this one, so cancellation waits for
        the write, for at most that many seconds; a peer that takes longer to
        read it gets the stream closed as broken.  Without it, sends are
        plainly cancellable: right for peers that may legitimately stop reading,
        on asyncio, whose transports take every write whole."""
        self._stream = stream
        self._send_stall_limit = send_stall_limit
        self._decoder = wire.FrameDecoder(resync=resync)
        self._pending: deque[list] = deque()
        self._send_lock = anyio.Lock()

    @property
    def resync(self) -> bool:
        return self._decoder.resync

    @resync.setter
    def resync(self, value: bool) -> None:
        self._decoder.resync = value

    async def send(self, frame: list) -> None:
        data = wire.encode(frame)
        async with self._send_lock:
            if self._send_stall_limit is None:
                await self._stream.send(data)
                return
            with anyio.move_on_after(self._send_stall_limit, shield=True) as stalled:
                await self._stream.send(data)
            if stalled.cancelled_caught:
                await anyio.aclose_forcefully(self._stream)
                raise anyio.BrokenResourceError(f"the peer read nothing for {self._send_stall_limit:g} s")
        await anyio.lowlevel.checkpoint_if_cancelled()

    async def receive(self) -> list:
        """Next frame; raises ``anyio.EndOfStream`` when the peer closed."""
        while not self._pending:
            chunk = await self._stream.receive(256 * 1024)
            self._pending.extend(self._decoder.feed(chunk))
        return self._pending.popleft()

    async def aclose(self) -> None:
        await self._stream.aclose()
