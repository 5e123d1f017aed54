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
and the receiver returns CREDIT as its consumer drains the data.  Receivers
on the host enforce it: the guest may be hostile.

Every frame a host process decodes is bounded before it is built (frame
size, msgpack container sizes, no ext types) and checked by ``validate``
before anything looks inside it, so a malformed frame fails the connection
with a ``ProtocolError`` instead of an exception somewhere else.
"""

from __future__ import annotations

import re
import struct

import msgpack

PROTOCOL_VERSION = 1
MAGIC = b"\xa7\x4d"
HEADER = struct.Struct(">2sI")
MAX_FRAME = 4 * 1024 * 1024
# Frames from a guest carry at most a CHUNK of data or a small result: a
# tighter bound caps what one frame can make the host allocate while decoding.
MAX_GUEST_FRAME = 256 * 1024
CHUNK = 64 * 1024
INITIAL_WINDOW = 1024 * 1024
MAX_CONTAINER_ITEMS = 65536  # per msgpack array or map; the frame size bounds the total
MAX_METHOD_LEN = 64
MAX_CODE_LEN = 64
MAX_MESSAGE_LEN = 8192  # of an ERROR's text, as shown to a caller

HELLO, OPEN, DATA, EOF, CREDIT, RESULT, ERROR, CANCEL, CONTROL = range(9)
Frame = list[object]  # [kind, stream_id, ...]: the shapes above, checked by ``validate``
FINAL_KINDS = (RESULT, ERROR)

STDIN, STDOUT, STDERR = 0, 1, 2


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


def validate(frame: Frame) -> None:
    """Check a decoded frame's shape for its kind; raise ``ProtocolError`` if it is off.

    Whether a kind or fd makes sense in a direction is for the receiver to say.
    """
    if not isinstance(frame, list) or len(frame) < 2:
        raise ProtocolError("a frame is an array of at least two items")
    kind, sid = frame[0], frame[1]
    if type(kind) is not int or type(sid) is not int or not 0 <= sid < 2**63:
        raise ProtocolError(f"bad frame kind or stream id: {kind!r}, {sid!r}"[:200])
    expected = _SHAPES.get(kind)
    if expected is None:
        raise ProtocolError(f"unknown frame kind {kind}")
    if len(frame) != len(expected) + 2 or not all(check(item) for check, item in zip(expected, frame[2:])):
        raise ProtocolError(f"malformed frame of kind {kind}")


class ReplyRules:
    """What the side answering one call may still send on it: output only on an open fd
    (stdout, stderr) and within the credit its caller granted, CREDIT only for stdin, then
    an outcome.  Each caller of the protocol (the SDK's ``mux.Call``, the supervisor's
    routes to the agent) holds one per call, because the answering side may be a hostile
    guest: this is what keeps its output within the memory the caller agreed to hold.
    Stdin CREDIT returns bytes the caller sent: more than were sent (or none at all) would
    let a guest open the caller's window past one and queue frames without end."""

    __slots__ = ("closed", "stdin_unreturned", "window")

    def __init__(self) -> None:
        self.window = {STDOUT: INITIAL_WINDOW, STDERR: INITIAL_WINDOW}
        self.closed: set[int] = set()
        self.stdin_unreturned = 0  # stdin bytes sent that the answering side has not credited back

    def grant(self, fd: int, amount: int) -> None:
        """The caller returned ``amount`` bytes of credit on ``fd``."""
        if fd in self.window:
            self.window[fd] += amount

    def sent(self, size: int) -> None:
        """The caller sent ``size`` bytes of stdin DATA."""
        self.stdin_unreturned += size

    def refuse(self, frame: Frame) -> str | None:
        """Why the answering side may not send ``frame`` (validated) now; None if it may (and
        then the frame counts: its output against the window, its EOF closes the fd)."""
        kind = frame[0]
        if kind in (DATA, EOF):
            fd = frame[2]
            if fd not in self.window or fd in self.closed:
                return f"output on fd {fd}, which is not open"
            if kind == EOF:
                self.closed.add(fd)
                return None
            self.window[fd] -= len(frame[3])
            return f"more output on fd {fd} than its credit" if self.window[fd] < 0 else None
        if kind == CREDIT:
            if frame[2] != STDIN:
                return f"credit for fd {frame[2]}"
            if not 0 < frame[3] <= self.stdin_unreturned:
                return f"credit of {frame[3]} bytes for {self.stdin_unreturned} bytes of stdin sent"
            self.stdin_unreturned -= frame[3]
            return None
        return None if kind in FINAL_KINDS else f"a frame of kind {kind}"


def _fd(value) -> bool:
    return type(value) is int and value in (STDIN, STDOUT, STDERR)


def _short_str(limit: int):
    return lambda value: type(value) is str and 0 < len(value) <= limit


_SHAPES = {
    HELLO: (lambda v: type(v) is bytes and len(v) <= 64, lambda v: type(v) is int, lambda v: type(v) is dict),
    OPEN: (_short_str(MAX_METHOD_LEN), lambda v: type(v) is dict),
    DATA: (_fd, lambda v: type(v) is bytes and len(v) <= CHUNK),
    EOF: (_fd,),
    CREDIT: (_fd, lambda v: type(v) is int and 0 <= v <= INITIAL_WINDOW),
    RESULT: (lambda v: True,),
    ERROR: (_short_str(MAX_CODE_LEN), lambda v: type(v) is str),
    CANCEL: (),
    CONTROL: (lambda v: type(v) is dict,),
}


def encode(frame: Frame) -> bytes:
    body = msgpack.packb(frame, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(MAGIC, len(body)) + body


# A resyncing decoder that has lost the frame boundaries looks only for the frame it waits
# for, a HELLO, and only for one of at most MAX_RESYNC_FRAME bytes: an agent's HELLO is ~300
# bytes of facts plus its workload's argv, which nothing bounds (a few KiB would refuse a long
# inline script), so 64 KiB leaves that ample room while bounding what a candidate that is no
# frame can hold back (the bytes it claims are awaited) and then skip.
MAX_RESYNC_FRAME = 0xFFFF
# Where such a HELLO may start: MAGIC, a length whose two high bytes are zero (so at most
# MAX_RESYNC_FRAME), then msgpack's fixarray of 5, kind 0 and stream 0 (how any encoder writes
# ``[0, 0, ...]``).  Found by the regex engine, not by a Python loop over every MAGIC.
_HELLO_CANDIDATE = re.compile(re.escape(MAGIC) + rb"\x00\x00..\x95\x00\x00", re.DOTALL)
_CANDIDATE_TAIL = HEADER.size + 2  # the most bytes of a candidate's 9-byte start that can end the buffer


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes, get whole frames back.

    With ``resync`` set, garbage is skipped instead of raising; a host uses that
    until its HELLO is acknowledged.  A frame whose header is acceptable but
    whose body does not decode is skipped whole; a header that is not (wrong
    magic, too long) means the frame boundaries are lost, and then only a HELLO
    (see ``_HELLO_CANDIDATE``) is looked for, all before it skipped.  Either way
    msgpack sees each byte at most once, and garbage that cannot start a
    candidate is not kept: a hostile peer's garbage costs time linear in its
    size and bounded memory.  (A HELLO among the bytes a failed frame claimed
    goes with them: skipping only that frame's magic instead would hand msgpack
    those bytes again at every candidate inside them.)
    ``max_frame`` refuses longer frames before buffering them; ``check``
    (``validate``, for this module's frames) vets each decoded frame.
    """

    def __init__(self, resync: bool = False, *, max_frame: int = MAX_FRAME, check=None) -> None:
        self._buffer = bytearray()
        self.resync = resync
        self._max_frame = max_frame
        self._check = check
        self._lost = False  # resync lost the frame boundaries: only a HELLO can restore them

    def reset(self) -> None:
        self._buffer.clear()
        self._lost = False

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames = []
        while True:
            frame = self._next_frame()
            if frame is None:
                return frames
            frames.append(frame)

    def _next_frame(self) -> Frame | None:
        buffer = self._buffer
        while True:
            if self._lost and self.resync:
                candidate = _HELLO_CANDIDATE.search(buffer)
                if candidate is None:
                    del buffer[: max(0, len(buffer) - _CANDIDATE_TAIL)]
                    return None
                del buffer[: candidate.start()]
            if len(buffer) < HEADER.size:
                return None
            magic, length = HEADER.unpack_from(buffer)
            if magic != MAGIC or length > self._max_frame:
                if not self.resync:
                    raise ProtocolError(f"bad frame header {bytes(buffer[: HEADER.size])!r}")
                self._lost = True
                del buffer[:1]
                continue
            end = HEADER.size + length
            if len(buffer) < end:
                return None
            # An item takes a byte at least: no longer list is preallocated for a claimed count.
            items = min(length, MAX_CONTAINER_ITEMS)
            try:
                # No copy.  Released on the way out even if a traceback still holds the view,
                # as the buffer cannot shrink while it is exported.
                with memoryview(buffer)[HEADER.size : end] as body:
                    frame = msgpack.unpackb(
                        body,
                        raw=False,
                        max_bin_len=length,
                        max_str_len=length,
                        max_array_len=items,
                        max_map_len=items,
                        max_ext_len=0,
                    )
                if not isinstance(frame, list) or len(frame) < 2 or not isinstance(frame[0], int):
                    raise ValueError("not a frame array")
                if self._check is not None:
                    self._check(frame)
            except Exception as exc:  # msgpack raises several unrelated types
                if not self.resync:
                    raise ProtocolError(f"undecodable frame: {exc}"[:300]) from None
                del buffer[:end]  # not a frame after all: skipped whole, so no byte is decoded twice
                continue
            del buffer[:end]
            self._lost = False
            return frame
