"""CPU a resyncing decoder spends on a hostile guest's crafted headers, against valid traffic.

    python benchmarks/resync_cpu.py

Feeds 1 MiB, in 256 KiB reads as the supervisor's relay does, through the decoder the relay
uses until the agent answers its HELLO (``resync``, ``MAX_GUEST_FRAME``, ``validate``), and
prints one JSON object: CPU seconds (``time.process_time``) for each shape of crafted
headers, for valid DATA frames of a CHUNK each (the agent's output), for valid frames of
9 bytes (the smallest there are: the per-frame cost any peer can impose, resyncing or
not), and the costliest crafted shape over each: ``ratio`` (to the DATA frames) and
``ratio_to_9_byte_frames``.
"""

from __future__ import annotations

import json
import struct
import time

from machinen_async.protocol import wire

MIB = 1024 * 1024
FEED = 256 * 1024


def _header(length: int) -> bytes:
    return wire.HEADER.pack(wire.MAGIC, length)


def _mib_of(unit: bytes) -> bytes:
    return (unit * -(-MIB // len(unit)))[:MIB]


CRAFTED = {
    "bare_headers_claiming_the_most": _mib_of(_header(wire.MAX_GUEST_FRAME)),
    "hello_start_and_bin32_spanning_the_rest": _mib_of(
        _header(wire.MAX_GUEST_FRAME) + b"\x95\x00\x00\xc6" + struct.pack(">I", wire.MAX_GUEST_FRAME - 8)
    ),
    "hello_candidates_every_9_bytes": _mib_of(_header(wire.MAX_RESYNC_FRAME) + b"\x95\x00\x00"),
    "hello_candidates_busy_to_their_last_byte": _mib_of(  # an array of fixints, lacking the HELLO's last items
        _header(wire.MAX_RESYNC_FRAME)
        + b"\x95\x00\x00\xdc"
        + struct.pack(">H", wire.MAX_RESYNC_FRAME - 6)
        + bytes(wire.MAX_RESYNC_FRAME - 6)
    ),
    "headers_every_6_bytes_claiming_0": _mib_of(_header(0)),
}
VALID = {
    "valid_data_frames": _mib_of(wire.encode([wire.DATA, 1, wire.STDOUT, bytes(wire.CHUNK - 16)])),
    "valid_9_byte_frames": _mib_of(wire.encode([wire.CANCEL, 1])),
}


def cpu_seconds(stream: bytes) -> float:
    decoder = wire.FrameDecoder(resync=True, max_frame=wire.MAX_GUEST_FRAME, check=wire.validate)
    started = time.process_time()
    for at in range(0, len(stream), FEED):
        decoder.feed(stream[at : at + FEED])
    return time.process_time() - started


def main() -> None:
    crafted = {name: round(cpu_seconds(stream), 4) for name, stream in CRAFTED.items()}
    valid = {name: round(cpu_seconds(stream), 4) for name, stream in VALID.items()}
    worst = max(crafted.values())
    print(json.dumps({"crafted_cpu_s": crafted, **{f"{name}_cpu_s": s for name, s in valid.items()},
                      "ratio": round(worst / max(valid["valid_data_frames"], 1e-6), 1),
                      "ratio_to_9_byte_frames": round(worst / max(valid["valid_9_byte_frames"], 1e-6), 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
