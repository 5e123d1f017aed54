"""Resynchronising on a hostile byte stream (issue 24, item 8).

Before its HELLO is answered, and after each channel reset a guest can provoke, a host
decodes the agent's bytes with ``FrameDecoder(resync=True)``: whatever the guest sends
there must cost time linear in its size (msgpack is handed each byte at most once) and
bounded memory, and the HELLO reply must still be found after the garbage a channel
reset legitimately leaves (the tail of a frame cut off). No VM here: decoders only.
"""

from __future__ import annotations

import random
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from machinen_async.protocol import wire

MIB = 1024 * 1024
FEED = 256 * 1024  # what a host reads from the agent socket at once
HELLO = [wire.HELLO, 0, b"our-nonce", wire.PROTOCOL_VERSION, {"agent_version": "0.2.0", "pid": 1}]


def _guest_decoder() -> wire.FrameDecoder:
    """As the supervisor's relay decodes the agent's bytes until its HELLO is answered."""
    return wire.FrameDecoder(resync=True, max_frame=wire.MAX_GUEST_FRAME, check=wire.validate)


def _header(length: int) -> bytes:
    return wire.HEADER.pack(wire.MAGIC, length)


def _repeat(unit: bytes, size: int = MIB) -> bytes:
    """Whole copies of ``unit``, at least ``size`` bytes of them."""
    return unit * -(-size // len(unit))


def _bin32_frame(length: int) -> bytes:
    """A header, a HELLO's first bytes, and a bin32 spanning the rest of the claimed frame,
    which then lacks the HELLO's last two items."""
    return _header(length) + b"\x95\x00\x00\xc6" + struct.pack(">I", length - 8) + bytes(length - 8)


def _busy_frame(length: int) -> bytes:
    """A HELLO candidate whose body keeps msgpack busy to its last byte (an array of that many
    fixints) before failing for want of the HELLO's last two items."""
    return _header(length) + b"\x95\x00\x00\xdc" + struct.pack(">H", length - 6) + bytes(length - 6)


ATTACKS = {
    "bare headers claiming the most": _repeat(_header(wire.MAX_GUEST_FRAME)),
    "HELLO starts and a bin32 spanning the rest": _repeat(_bin32_frame(wire.MAX_GUEST_FRAME)),
    "the same, short enough to be HELLO candidates": _repeat(_bin32_frame(wire.MAX_RESYNC_FRAME)),
    "busy HELLO candidates": _repeat(_busy_frame(wire.MAX_RESYNC_FRAME)),
    "HELLO candidates every 9 bytes": _repeat(_header(wire.MAX_RESYNC_FRAME) + b"\x95\x00\x00"),
    "HELLO candidates every 9 bytes, claiming 3": _repeat(_header(3) + b"\x95\x00\x00"),
    "bare headers every 6 bytes, claiming 0": _repeat(_header(0)),
}


def _farthest_claim(data: bytes, before: int) -> int:
    """How far into ``data`` a header starting before ``before`` claims bytes (0 if none does):
    a reader cannot tell a header's claim is false before it has the bytes claimed, and
    then skips them, so a frame in them is not found; only claims a guest decoder would
    honour count (``MAX_GUEST_FRAME`` at most)."""
    farthest, at = 0, data.find(wire.MAGIC)
    while 0 <= at < before and at + wire.HEADER.size <= len(data):
        length = wire.HEADER.unpack_from(data, at)[1]
        if length <= wire.MAX_GUEST_FRAME:
            farthest = max(farthest, at + wire.HEADER.size + length)
        at = data.find(wire.MAGIC, at + 1)
    return farthest


def _feed(decoder: wire.FrameDecoder, stream: bytes, sizes=(FEED,)) -> list[list]:
    frames, at, turn = [], 0, 0
    while at < len(stream):
        size = sizes[turn % len(sizes)]
        frames += decoder.feed(stream[at : at + size])
        at, turn = at + size, turn + 1
    return frames


@pytest.fixture
def msgpack_input(monkeypatch) -> list[int]:
    """Counts the bytes the decoder hands to msgpack (one entry per call)."""
    handed: list[int] = []
    unpackb = msgpack.unpackb

    def counting(data, **kwargs):
        handed.append(memoryview(data).nbytes)
        return unpackb(data, **kwargs)

    monkeypatch.setattr(wire.msgpack, "unpackb", counting)
    return handed


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_mib_of_crafted_headers_costs_linear_work_and_the_hello_is_still_found(attack, msgpack_input):
    garbage = ATTACKS[attack]
    # The garbage's last headers may claim bytes past its end: the HELLO comes after them.
    reach = bytes(max(0, _farthest_claim(garbage, len(garbage)) - len(garbage)))
    stream = garbage + reach + wire.encode(HELLO)
    decoder = _guest_decoder()
    frames = []
    for at in range(0, len(stream), FEED):
        frames += decoder.feed(stream[at : at + FEED])
        assert len(decoder._buffer) < wire.HEADER.size + wire.MAX_GUEST_FRAME  # part of one frame, at most
    assert frames == [HELLO]
    assert sum(msgpack_input) <= len(stream)  # each byte at most once
    assert len(msgpack_input) <= len(stream) // wire.HEADER.size  # and each call consumes a header at least


def test_garbage_that_cannot_start_a_hello_is_not_kept(msgpack_input):
    decoder = _guest_decoder()
    decoder.feed(b"\x00")  # a bad header: the boundaries are lost
    for _ in range(4):
        assert decoder.feed(ATTACKS["bare headers claiming the most"][:FEED]) == []
        assert len(decoder._buffer) < wire.HEADER.size + 3  # a HELLO's start, at most
    assert msgpack_input == []
    assert decoder.feed(wire.encode(HELLO)) == [HELLO]


def _old_session_bytes() -> bytes:
    """A long DATA frame an earlier session left half-sent, and the frames queued behind it:
    output that holds magics, headers and whole frames of the protocol, HELLOs included."""
    rng = random.Random(24)
    output = b"".join(
        rng.randbytes(rng.randrange(200, 2000))
        + rng.choice(
            [
                wire.MAGIC,
                _header(wire.MAX_FRAME),
                wire.encode([wire.OPEN, 3, "exec", {"argv": ["true"]}]),
                wire.encode([wire.HELLO, 0, b"another", 1, {}]),
            ]
        )
        for _ in range(60)
    )[: wire.CHUNK]
    return wire.encode([wire.DATA, 7, wire.STDOUT, output]) + wire.encode([wire.RESULT, 7, {"exit_code": 0}])


@pytest.mark.parametrize("cut", [1, 2, 5, 6, 7, 9, 1000, 30_000, -30, -1])
def test_the_hello_is_found_after_the_tail_of_a_long_frame(cut):
    stream = _old_session_bytes()[cut:] + wire.encode(HELLO)
    for sizes in [(FEED,), (1, 7, 300, 4096)]:
        frames = _feed(_guest_decoder(), stream, sizes)
        assert HELLO in frames
        assert frames[-1] == HELLO  # the frames queued after the cut one (and its HELLOs) come first


def test_the_largest_hello_is_found_once_the_boundaries_are_lost():
    """What an agent's HELLO may grow to (its workload's argv) and still be found while resyncing."""
    argv = ["sh", "-c", "x" * 1000]  # a script, as long as it takes to fill the HELLO
    hello = [wire.HELLO, 0, b"our-nonce", wire.PROTOCOL_VERSION, {"workload": {"argv": argv}}]
    argv[2] += "x" * (wire.HEADER.size + wire.MAX_RESYNC_FRAME - len(wire.encode(hello)))
    assert len(wire.encode(hello)) == wire.HEADER.size + wire.MAX_RESYNC_FRAME
    assert _guest_decoder().feed(b"\x00" + wire.encode(hello)) == [hello]
    argv[2] += "x"
    assert _guest_decoder().feed(b"\x00" + wire.encode(hello)) == []  # not looked for
    assert _guest_decoder().feed(wire.encode(hello)) == [hello]  # where a frame is known to start, it is decoded


def test_without_resync_a_bad_frame_still_raises():
    strict = wire.FrameDecoder(max_frame=wire.MAX_GUEST_FRAME, check=wire.validate)
    assert strict.feed(wire.encode(HELLO)[:10]) == []
    assert strict.feed(wire.encode(HELLO)[10:] + wire.encode([wire.EOF, 1, 1])) == [HELLO, [wire.EOF, 1, 1]]
    with pytest.raises(wire.ProtocolError, match="undecodable"):
        strict.feed(_header(3) + b"\x95\x00\x00")
    with pytest.raises(wire.ProtocolError, match="bad frame header"):
        wire.FrameDecoder().feed(b"\x00" + wire.encode(HELLO))


# --- property: any junk, then the HELLO ---------------------------------------------------

_FRAMES = [
    wire.encode([wire.DATA, 1, wire.STDOUT, b"\xa7\x4d" * 40]),
    wire.encode([wire.HELLO, 0, b"stale", 1, {"hostname": "old"}]),
    wire.encode([wire.RESULT, 9, None]),
    _header(3) + b"\x95\x00\x00",  # a HELLO's start that does not decode
    _header(12) + b"\x95\x00\x00" + bytes(9),  # decodes, but fails validate
    _bin32_frame(100),
    _busy_frame(200),
]
_JUNK = st.lists(
    st.one_of(
        st.binary(max_size=80),
        st.sampled_from(_FRAMES),
        st.tuples(st.sampled_from(_FRAMES), st.integers(1, 300)).map(lambda t: t[0][t[1] % len(t[0]) :]),  # a tail
        st.integers(0, 2**32 - 1).map(_header),  # a bare header
        st.just(wire.MAGIC),
    ),
    max_size=12,
).map(b"".join)
_HELLOS = st.builds(
    lambda nonce, info: [wire.HELLO, 0, nonce, wire.PROTOCOL_VERSION, info],
    st.binary(max_size=64),
    st.dictionaries(
        st.text(max_size=10), st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=20), st.binary(max_size=20))
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(
    before=_JUNK,
    hello=_HELLOS,
    after=_JUNK,
    sizes=st.lists(st.integers(1, 512), min_size=1, max_size=8),
    lost=st.booleans(),
)
def test_any_junk_then_a_hello_yields_the_hello(before, hello, after, sizes, lost):
    """Whatever surrounds it, and however it arrives, the HELLO is found, unless a header
    before it claims its bytes (see ``_farthest_claim``); nothing invalid is yielded."""
    encoded = wire.encode(hello)
    if lost:  # starting mid-frame, as the tail of a write cut off does
        before = b"\x00" + before
    assume(_farthest_claim(before + encoded, len(before)) <= len(before))
    frames = _feed(_guest_decoder(), before + encoded + after, tuple(sizes))
    assert hello in frames
    for frame in frames:
        wire.validate(frame)
