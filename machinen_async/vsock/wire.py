"""The host <-> guest wire format, shared verbatim by both ends.

This module must stay importable inside the guest, which has only the
standard library and msgpack: no package-relative imports, no anyio.

A frame on the byte channel is ``MAGIC (2 bytes) | length (4 bytes, big
endian) | msgpack array``.  The magic lets a reader resynchronise after a
channel reset: a guest write that was blocked while no host was connected is
delivered, possibly as a fragment, to the *next* host that connects.

Frames (first array element is the kind, second the stream id):

    HELLO   [0, 0, nonce, version, info]   session start / acknowledgement
    OPEN    [1, sid, method, params]       start a call (unary or streaming)
    DATA    [2, sid, fd, bytes]            fd 0 = stdin/upload, 1 = stdout, 2 = stderr
    EOF     [3, sid, fd]                   no more DATA on fd
    CREDIT  [4, sid, fd, nbytes]           receiver may take nbytes more on fd
    RESULT  [5, sid, value]                call finished; stream closed
    ERROR   [6, sid, code, message]        call failed; stream closed
    CANCEL  [7, sid]                       caller abandons the call (agent kills its process)
    CONTROL [8, sid, payload]              out-of-band request on a live call, e.g. {"signal": 15}

Flow control: every (stream, fd) direction starts with ``INITIAL_WINDOW``
bytes of credit; a sender never has more unacknowledged DATA bytes in flight,
and the receiver returns CREDIT as its consumer drains the data.
"""

from __future__ import annotations

import struct

import msgpack

PROTOCOL_VERSION = 1
MAGIC = b"\xa7\x4d"
HEADER = struct.Struct(">2sI")
MAX_FRAME = 4 * 1024 * 1024
CHUNK = 64 * 1024
INITIAL_WINDOW = 1024 * 1024

HELLO, OPEN, DATA, EOF, CREDIT, RESULT, ERROR, CANCEL, CONTROL = range(9)
FINAL_KINDS = (RESULT, ERROR)

STDIN, STDOUT, STDERR = 0, 1, 2


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


def encode(frame: list) -> bytes:
    body = msgpack.packb(frame, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(MAGIC, len(body)) + body


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes, get whole frames back.

    With ``resync`` set, bytes before the next valid frame header are skipped
    instead of raising; a host uses that until its HELLO is acknowledged.
    """

    def __init__(self, resync: bool = False) -> None:
        self._buffer = bytearray()
        self.resync = resync

    def reset(self) -> None:
        self._buffer.clear()

    def feed(self, data: bytes) -> list[list]:
        self._buffer += data
        frames = []
        while True:
            frame = self._next_frame()
            if frame is None:
                return frames
            frames.append(frame)

    def _next_frame(self) -> list | None:
        buffer = self._buffer
        while True:
            if len(buffer) < HEADER.size:
                return None
            magic, length = HEADER.unpack_from(buffer)
            if magic == MAGIC and length <= MAX_FRAME:
                break
            if not self.resync:
                raise ProtocolError(f"bad frame header {bytes(buffer[: HEADER.size])!r}")
            next_magic = buffer.find(MAGIC, 1)
            del buffer[: next_magic if next_magic > 0 else len(buffer) - 1]
        end = HEADER.size + length
        if len(buffer) < end:
            return None
        body = bytes(buffer[HEADER.size : end])
        try:
            frame = msgpack.unpackb(body, raw=False)
            if not isinstance(frame, list) or len(frame) < 2 or not isinstance(frame[0], int):
                raise ValueError("not a frame array")
        except Exception as exc:  # msgpack raises several unrelated types
            if not self.resync:
                raise ProtocolError(f"undecodable frame: {exc}") from None
            del buffer[:1]
            return self._next_frame()
        del buffer[:end]
        return frame
