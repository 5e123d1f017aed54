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
Frame = list[object]  # [kind, stream_id, ...]: the shapes above, read only through the accessors below
FINAL_KINDS = (RESULT, ERROR)

STDIN, STDOUT, STDERR = 0, 1, 2

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing into the guest's PID 1
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeAlias, TypeGuard

    # A msgpack map of a frame (OPEN's params, HELLO's info, CONTROL's payload): string keys,
    # values as the method defines them.
    Params: TypeAlias = dict[str, Any]


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


# --- accessors: the one place that knows where each item of a frame is ------------------------
#
# Each checks its frame's whole shape (kind, length, every item's type and bounds) before it
# answers, raising ``ProtocolError``: a frame from a guest may be anything msgpack can decode.


def kind(frame: Frame) -> int:
    """The frame's kind (HELLO ... CONTROL)."""
    value = frame[0] if isinstance(frame, list) and len(frame) >= 2 else None
    if type(value) is not int:
        raise ProtocolError("a frame is an array of at least two items, a kind first")
    return value


def stream_id(frame: Frame) -> int:
    """The call the frame belongs to (0 for HELLO)."""
    kind(frame)
    sid = frame[1]
    if type(sid) is not int or not 0 <= sid < 2**63:
        raise ProtocolError(f"bad stream id {sid!r}"[:200])
    return sid


def readdressed(frame: Frame, sid: int) -> Frame:
    """``frame`` for stream ``sid`` instead (a relay maps stream ids between its two sides)."""
    stream_id(frame)
    return [frame[0], sid, *frame[2:]]


def hello(frame: Frame) -> tuple[bytes, int, Params]:
    """A HELLO's nonce, protocol version and info."""
    nonce, version, info = _items(frame, HELLO)
    if type(nonce) is not bytes or len(nonce) > 64 or type(version) is not int or not _is_map(info):
        raise _malformed(HELLO)
    return nonce, version, info


def request(frame: Frame) -> tuple[str, Params]:
    """An OPEN's method and params."""
    method, params = _items(frame, OPEN)
    if not _is_short_str(method, MAX_METHOD_LEN) or not _is_map(params):
        raise _malformed(OPEN)
    return method, params


def data(frame: Frame) -> tuple[int, bytes]:
    """A DATA's fd and bytes (at most a CHUNK)."""
    fd, payload = _items(frame, DATA)
    if not _is_fd(fd) or type(payload) is not bytes or len(payload) > CHUNK:
        raise _malformed(DATA)
    return fd, payload


def eof(frame: Frame) -> int:
    """An EOF's fd."""
    (fd,) = _items(frame, EOF)
    if not _is_fd(fd):
        raise _malformed(EOF)
    return fd


def credit(frame: Frame) -> tuple[int, int]:
    """A CREDIT's fd and byte count (at most a window)."""
    fd, amount = _items(frame, CREDIT)
    if not _is_fd(fd) or type(amount) is not int or not 0 <= amount <= INITIAL_WINDOW:
        raise _malformed(CREDIT)
    return fd, amount


def output_fd(frame: Frame) -> int | None:
    """The fd a DATA or EOF is about; None for other kinds."""
    frame_kind = kind(frame)
    if frame_kind == DATA:
        return data(frame)[0]
    return eof(frame) if frame_kind == EOF else None


def result(frame: Frame) -> object:
    """A RESULT's value (anything the method returns)."""
    (value,) = _items(frame, RESULT)
    return value


def error(frame: Frame) -> tuple[str, str]:
    """An ERROR's code and message."""
    code, message = _items(frame, ERROR)
    if not _is_short_str(code, MAX_CODE_LEN) or type(message) is not str:
        raise _malformed(ERROR)
    return code, message


def cancel(frame: Frame) -> None:
    """A CANCEL carries nothing but its stream id."""
    _items(frame, CANCEL)


def control(frame: Frame) -> Params:
    """A CONTROL's payload."""
    (payload,) = _items(frame, CONTROL)
    if not _is_map(payload):
        raise _malformed(CONTROL)
    return payload


# --- joining queued frames: a relay's queue grows a waiting DATA or CREDIT instead of adding one


def join_key(frame: Frame) -> tuple[int, int, int] | None:
    """(stream id, kind, fd) of a DATA or CREDIT: later ones of the same key may ``join`` it
    while it waits in a queue.  None for the other kinds."""
    frame_kind = kind(frame)
    if frame_kind not in (DATA, CREDIT):
        return None
    fd = frame[2] if len(frame) == 4 else None
    if not _is_fd(fd):
        raise _malformed(frame_kind)
    return stream_id(frame), frame_kind, fd


def join(queued: Frame, later: Frame) -> bool:
    """Add ``later`` to ``queued``, a frame of its ``join_key`` not yet sent: a CREDIT's bytes
    add up; a DATA's output grows in place (no quadratic copying) while the two fit in a CHUNK.
    False (nothing joined) if they do not fit."""
    if kind(later) == CREDIT:
        total = queued[3]
        if type(total) is not int:
            raise _malformed(CREDIT)
        queued[3] = total + credit(later)[1]
        return True
    more = data(later)[1]
    output = queued[3]
    if not isinstance(output, bytes | bytearray):
        raise _malformed(DATA)
    if len(output) + len(more) > CHUNK:
        return False
    if type(output) is bytes:
        queued[3] = output = bytearray(output)
    output += more
    return True


def joined(frame: Frame) -> Frame:
    """``frame``, which may have been joined to, as it leaves the queue (its output bytes again)."""
    if kind(frame) == DATA and type(frame[3]) is bytearray:
        frame[3] = bytes(frame[3])
    return frame


def validate(frame: Frame) -> None:
    """Check a decoded frame's shape for its kind; raise ``ProtocolError`` if it is off.

    Whether a kind or fd makes sense in a direction is for the receiver to say.
    """
    stream_id(frame)
    reader = _READERS.get(kind(frame))
    if reader is None:
        raise ProtocolError(f"unknown frame kind {kind(frame)}")
    reader(frame)


_ITEMS = {HELLO: 3, OPEN: 2, DATA: 2, EOF: 1, CREDIT: 2, RESULT: 1, ERROR: 2, CANCEL: 0, CONTROL: 1}


def _items(frame: Frame, expected: int) -> list[object]:
    """The items after kind and stream id of a frame that must be of kind ``expected``."""
    stream_id(frame)
    if kind(frame) != expected:
        raise ProtocolError(f"a frame of kind {kind(frame)} where one of kind {expected} belongs")
    if len(frame) != _ITEMS[expected] + 2:
        raise _malformed(expected)
    return frame[2:]


def _malformed(frame_kind: int) -> ProtocolError:
    return ProtocolError(f"malformed frame of kind {frame_kind}")


def _is_fd(value: object) -> TypeGuard[int]:
    return type(value) is int and value in (STDIN, STDOUT, STDERR)


def _is_short_str(value: object, limit: int) -> TypeGuard[str]:
    return type(value) is str and 0 < len(value) <= limit


def _is_map(value: object) -> TypeGuard[Params]:
    return type(value) is dict and all(type(key) is str for key in value)


_READERS = {HELLO: hello, OPEN: request, DATA: data, EOF: eof, CREDIT: credit, RESULT: result, ERROR: error,
            CANCEL: cancel, CONTROL: control}  # fmt: skip


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
        self.window: dict[int, int] = {STDOUT: INITIAL_WINDOW, STDERR: INITIAL_WINDOW}
        self.closed: set[int] = set()
        self.stdin_unreturned: int = 0  # stdin bytes sent that the answering side has not credited back

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
        frame_kind = kind(frame)
        fd = output_fd(frame)
        if fd is not None:
            if fd not in self.window or fd in self.closed:
                return f"output on fd {fd}, which is not open"
            if frame_kind == EOF:
                self.closed.add(fd)
                return None
            self.window[fd] -= len(data(frame)[1])
            return f"more output on fd {fd} than its credit" if self.window[fd] < 0 else None
        if frame_kind == CREDIT:
            fd, amount = credit(frame)
            if fd != STDIN:
                return f"credit for fd {fd}"
            if not 0 < amount <= self.stdin_unreturned:
                return f"credit of {amount} bytes for {self.stdin_unreturned} bytes of stdin sent"
            self.stdin_unreturned -= amount
            return None
        return None if frame_kind in FINAL_KINDS else f"a frame of kind {frame_kind}"


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

    def __init__(
        self, resync: bool = False, *, max_frame: int = MAX_FRAME, check: Callable[[Frame], None] | None = None
    ) -> None:
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
        frames: list[Frame] = []
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
                kind(frame)  # an array of a kind, a stream id, ...
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
