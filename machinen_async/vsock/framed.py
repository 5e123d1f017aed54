"""Frames over an anyio byte stream (any transport: unix socket, vsock, ...)."""

from __future__ import annotations

from collections import deque

import anyio
import anyio.abc

from . import wire


class FrameStream:
    """Whole-frame send/receive over a byte stream; safe for concurrent senders."""

    def __init__(self, stream: anyio.abc.ByteStream, *, resync: bool = False) -> None:
        self._stream = stream
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
            await self._stream.send(data)

    async def receive(self) -> list:
        """Next frame; raises ``anyio.EndOfStream`` when the peer closed."""
        while not self._pending:
            chunk = await self._stream.receive(256 * 1024)
            self._pending.extend(self._decoder.feed(chunk))
        return self._pending.popleft()

    async def aclose(self) -> None:
        await self._stream.aclose()
