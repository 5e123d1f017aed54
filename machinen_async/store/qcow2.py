"""A qcow2 header check for disks that come from outside (bundles), run before QEMU or qemu-img sees them.

A qcow2 header can name other host files that QEMU then opens with our rights:
an *external data file* (the guest's disk contents are read from and written
to it) or a backing file.  ``qemu.chain_blockdev`` spells the backing chain
out, so backing names are ignored; a data file cannot be overridden the same
way without a path of our own, so such images are refused here.  The check is
an allow-list (docs/interop/qcow2.txt): anything this module does not know to
be harmless is refused, so a future QEMU feature that opens files is refused
too until someone looks at it.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ..errors import SnapshotError

MAGIC = b"QFI\xfb"
# Incompatible feature bits: 0 dirty (refcounts repaired on open), 3 compression type,
# 4 extended L2 entries.  Refused: 1 corrupt, 2 external data file, any unknown bit.
ALLOWED_INCOMPATIBLE = (1 << 0) | (1 << 3) | (1 << 4)
# Autoclear bit 0 (bitmaps consistent) only; bit 1 is "raw external data".
ALLOWED_AUTOCLEAR = 1 << 0
# Header extensions: end, backing file format name, feature name table, bitmaps.
# Refused: 0x44415441 external data file name, 0x0537be77 encryption header, unknown ones.
ALLOWED_EXTENSIONS = {0x00000000, 0xE2792ACA, 0x6803F857, 0x23852875}
V2_HEADER_LENGTH = 72
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21


def check_image(path: Path) -> None:
    """Refuse a qcow2 file that would make QEMU open any file but itself."""
    with open(path, "rb") as f:
        head = f.read(1 << MAX_CLUSTER_BITS)

    def refuse(why: str) -> SnapshotError:
        return SnapshotError(f"{path.name} is not a disk this machinen opens: {why}", code="SNAPSHOT_DISK_UNSAFE")

    if len(head) < V2_HEADER_LENGTH or head[:4] != MAGIC:
        raise refuse("not a qcow2 image")
    (version,) = struct.unpack_from(">I", head, 4)
    (cluster_bits,) = struct.unpack_from(">I", head, 20)
    (crypt_method,) = struct.unpack_from(">I", head, 32)
    if version not in (2, 3):
        raise refuse(f"qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise refuse(f"cluster size 2^{cluster_bits}")
    if crypt_method != 0:
        raise refuse("encrypted")
    header_length = V2_HEADER_LENGTH
    if version == 3:
        if len(head) < 104:
            raise refuse("truncated header")
        incompatible, _compatible, autoclear, _refcount_order, header_length = struct.unpack_from(">QQQII", head, 72)
        if incompatible & ~ALLOWED_INCOMPATIBLE:
            names = {1 << 1: "marked corrupt", 1 << 2: "uses an external data file"}
            raise refuse(names.get(incompatible & ~ALLOWED_INCOMPATIBLE, f"incompatible features {incompatible:#x}"))
        if autoclear & ~ALLOWED_AUTOCLEAR:
            raise refuse(f"autoclear features {autoclear:#x}")
        if header_length < 104 or header_length % 8:
            raise refuse(f"header length {header_length}")
    cluster = min(1 << cluster_bits, len(head))
    offset = header_length
    while True:  # extensions live in the first cluster, each 8-byte aligned
        if offset + 8 > cluster:
            raise refuse("header extensions run past the first cluster")
        kind, length = struct.unpack_from(">II", head, offset)
        if kind not in ALLOWED_EXTENSIONS:
            names = {0x44415441: "names an external data file", 0x0537BE77: "encrypted"}
            raise refuse(names.get(kind, f"unknown header extension {kind:#010x}"))
        if kind == 0:
            return
        offset += 8 + (length + 7) // 8 * 8
