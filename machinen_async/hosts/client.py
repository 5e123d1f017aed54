"""The caller's side of the peer protocol: requests ``[id, method, params]``, replies
``[id, True, result]`` or ``[id, False, code, message]``, any number in flight.

Runs in one asyncio loop (the remote driver's portal).  A reply that comes after
its call gave up is dropped; when the stream ends, every waiting call fails
with the reason the transport gives.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncssh

from ..errors import HostError, MachinenError, TransferError, error_from_code
from ..protocol import wire
from ..protocol.framing import FrameStream

# No peer request takes this long when the host works (the longest assemble and hash a bundle,
# or boot a VM); past it the call fails and its reply, if it ever comes, is dropped.
REMOTE_CALL_DEADLINE_S = 600.0


class PeerClient:
    def __init__(self, destination: str, frames: FrameStream, why_lost: Callable[[], Awaitable[MachinenError]]) -> None:
        self.destination = destination
        self.frames: FrameStream = frames
        self._why_lost = why_lost
        self.pending: dict[int, asyncio.Future[wire.Frame]] = {}
        self.ids: itertools.count[int] = itertools.count(1)
        self.lost: MachinenError | None = None
        self.reader: asyncio.Task[None] = asyncio.get_running_loop().create_task(self._read_replies())

    async def _read_replies(self) -> None:
        broken: MachinenError | None = None
        try:
            while True:
                reply = await self.frames.receive()
                if not isinstance(reply, list) or not reply or type(reply[0]) is not int:
                    # Not for any call: the peer is not speaking the protocol, so no reply can be trusted.
                    what = f"a {type(reply).__name__}" + (f" of {len(reply)} items" if isinstance(reply, list) else "")
                    broken = HostError(f"{self.destination} sent {what} as a reply", code="HOST_PROTOCOL")
                    break
                future = self.pending.pop(reply[0], None)
                if future is not None and not future.done():
                    future.set_result(reply)
        except (anyio.EndOfStream, anyio.BrokenResourceError, wire.ProtocolError, OSError, asyncssh.Error):
            pass
        self.lost = broken or await self._why_lost()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(self._lost_error())
        self.pending.clear()

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
        match reply:
            case [_, True, result, *_]:
                return result
            case [_, False, str() as code, str() as message, *_]:
                raise error_from_code(code, f"{self.destination}: {message}")
        raise HostError(f"{self.destination} sent a malformed reply to {method} ({len(reply)} items)",
                        code="HOST_PROTOCOL")  # fmt: skip

    def close(self) -> None:
        self.reader.cancel()
