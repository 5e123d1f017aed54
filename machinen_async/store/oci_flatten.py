"""An OCI / Docker image's layers, applied as a container runtime applies them, written as ONE
uncompressed tar of the final root filesystem (what ``assets.image_for`` turns into ext4).

``flatten(layers, out)`` takes the layers bottom first, each ``(blob path, media type)``.

Reading.  A layer is decompressed by what its first bytes say (a valid tar header first, then
the gzip, zstd, xz and bzip2 magics), whatever its media type claims: ``docker save`` archives
hold plain tars under gzip names.  The media type must still be a layer type we know (OCI
``tar``, ``tar+gzip``, ``tar+zstd``, their ``nondistributable`` forms, Docker's
``rootfs.diff.tar.gzip``).  zstd needs, in this order, ``compression.zstd`` (Python 3.14), the
``zstd`` command or the ``zstandard`` module, else the layer is refused.  Compressed layers are decompressed, in parallel threads, into temporary
files beside ``out`` (removed at the end), so the second pass can read any member by offset; plain
tar blobs are read in place.  The tar reader is our own (headers only, linear time): ustar,
GNU long names, pax records; global pax headers are ignored (as Docker and containerd do);
sparse members, and types other than file, hard link, symlink, char/block device, directory and
FIFO, are refused.

Applying (pass 1: metadata only, one tree in memory).  Per layer, as the image spec says:
first its whiteouts against the layers below (``.wh.NAME`` removes NAME, a whole tree if a
directory; ``DIR/.wh..wh..opq`` empties DIR), wherever they appear in the layer, so entries of
the same layer always stay; then its entries in order.  An entry over an existing path replaces
it (removing a directory's contents), except a directory over a directory, which only takes
the new attributes (mode, owner, mtime, xattrs).  Parent directories a layer does not list are
created (0755, root, the entry's mtime), as runtimes do, also for whiteouts; a parent that is a
symlink is followed, inside the root (an absolute target starts at the root, ``..`` stops at
it, at most 40 links), as containerd and a chrooted Docker do, so nothing lands outside it;
a parent that is a file is an error.  ``.wh..wh.*`` aufs metadata is skipped.

Hard links are inodes: a link entry makes its path share the node its target names at that
moment (and takes the link entry's mode, owner, mtime and xattrs, as runtimes apply them).
Removing or replacing the target path later only unbinds that path: the other paths keep the
content.  In the output each surviving group is written as its first path in output order
(a regular entry with the content) plus type-1 links to that path, i.e. links are re-pointed
at a surviving member of the group (no copies).  A link whose target is missing or a
directory is an error, as it is for runtimes.

Writing (pass 2).  Entries in depth-first order of byte-sorted names, so parents come before
their contents and a hard link after its target (what ``mke2fs -d tarball`` needs), every
directory explicit, the root as ``./`` and every name as ``./path``: the same layers always give
the same bytes.  Every path is where the entry ended up, so no output path goes through a
symlink or ``..``, and a hard link names a path written before it: extracting the tar as root
cannot write outside the target directory.  The root, when no layer lists it, is 0755 root
with mtime 0.  POSIX ustar headers (names up to 256 bytes use the prefix field and stay raw
bytes) with pax records only where needed: longer names and link targets, sizes >= 8 GiB,
large ids, sub-second or negative mtimes, and xattrs as ``SCHILY.xattr.NAME`` (raw bytes; ACLs
and other pax records are dropped).  Owner and group names are left empty, so extraction uses
the numeric ids.  Contents are copied from the layers by offset (``copy_file_range``), never
held in memory whole.  The tar goes to a temporary file beside ``out``, renamed at the end: on
any error no ``out`` (nor temporary file) remains.

Errors: ``ImageError`` ``IMAGE_LAYER_INVALID`` (undecodable or truncated layer, malformed
header, a member path with ``..`` or longer than PATH_MAX, a hard link target with ``..``,
missing hard link target, symlink loop, a media type we cannot read), ``IMAGE_TOO_LARGE``
(regular files over ``max_bytes``, more than ``max_entries`` members and created directories,
or decompressed layers over 2 x ``max_bytes`` + 1 GiB).  Blocking: run it in a worker thread.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import gzip
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import ImageError

MAX_ENTRIES = 2_000_000  # members read over all layers, plus directories created for them
MAX_SYMLINK_HOPS = 40  # Linux's MAXSYMLINKS
PATH_MAX = 4096
NAME_MAX = 255

MEDIA_TYPES = {  # layer media type -> the compression it declares (the bytes decide, see _sniff)
    "application/vnd.oci.image.layer.v1.tar": "tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "tar",  # not registered; docker-archive loaders use it
}

_CHUNK = 1 << 20
_SMALL_FILE = 1 << 20  # contents up to this size go through our write buffer, larger ones copy_file_range
_META_MAX = 16 << 20  # one pax or GNU long-name header's data
_BLOCK = 512
_RECORD = 10240
_ZERO_BLOCK = bytes(_BLOCK)
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
_OCTAL = re.compile(rb"[0-7]*")
_DECIMAL = re.compile(rb"[0-9]{1,20}")
_PAX_TIME = re.compile(rb"(-?)([0-9]{1,20})(?:\.([0-9]{1,9})[0-9]*)?")

# Node kinds are tar type flags.
REG, LINK, SYMLINK, CHR, BLK, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
_REGULAR_FLAGS = {b"0", b"\0", b"7"}
_KINDS = {LINK, SYMLINK, CHR, BLK, DIR, FIFO}
WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
AUFS_META = b".wh..wh."


@dataclass(frozen=True)
class FlattenReport:
    entries: int  # members written, the root "./" and hard links included
    bytes: int  # sum of regular file sizes, each hard-linked file once
    layers: int


def flatten(
    layers: Sequence[tuple[Path, str]],
    out: Path,
    *,
    max_bytes: int | None = None,
    max_entries: int = MAX_ENTRIES,
) -> FlattenReport:
    """Apply ``layers`` (bottom first: blob path, media type) and write the final root
    filesystem to ``out`` as one uncompressed tar.  See the module docstring."""
    out = Path(out)
    labels = [_label(index, Path(path)) for index, (path, _) in enumerate(layers)]
    for (path, media_type), label in zip(layers, labels, strict=True):
        if media_type not in MEDIA_TYPES:
            raise _invalid(f"{label}: unsupported layer media type {media_type!r}")
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.layers-", dir=out.parent))
    stop = threading.Event()
    budget = _Budget(None if max_bytes is None else 2 * max_bytes + (1 << 30))
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1, len(layers))))
    futures: list[Future[Path]] = []
    try:
        futures += [
            pool.submit(_uncompressed, Path(path), media_type, work / f"{index}.tar", label, budget, stop)
            for index, ((path, media_type), label) in enumerate(zip(layers, labels, strict=True))
        ]
        tree = _Tree(max_entries)
        sources: list[Path] = []
        for index, future in enumerate(futures):
            source = future.result()
            sources.append(source)
            tree.apply(labels[index], _read_layer(source, index, labels[index], tree))
        entries, total = tree.totals()
        if max_bytes is not None and total > max_bytes:
            raise _too_large(f"the image's files take {total} bytes, more than the {max_bytes} allowed")
        _write(tree, sources, labels, out)
        return FlattenReport(entries=entries, bytes=total, layers=len(layers))
    finally:
        stop.set()
        for future in futures:
            future.cancel()
        pool.shutdown(wait=True)
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------- errors and labels


def _label(index: int, path: Path) -> str:
    return f"layer {index} ({path.name})"


def _invalid(message: str) -> ImageError:
    return ImageError(message, code="IMAGE_LAYER_INVALID")


def _too_large(message: str) -> ImageError:
    return ImageError(message, code="IMAGE_TOO_LARGE")


def _show(name: bytes) -> str:
    text = name.decode("utf-8", "backslashreplace")
    return repr(text if len(text) <= 200 else text[:200] + "...")


# ---------------------------------------------------------------------------- decompression


class _Stopped(Exception):
    """Another layer failed: a decompression thread gives up."""


class _Budget:
    """Decompressed bytes over all layers (against compression bombs filling the disk)."""

    def __init__(self, limit: int | None):
        self.limit, self.used, self.lock = limit, 0, threading.Lock()

    def take(self, count: int, label: str) -> None:
        with self.lock:
            self.used += count
            if self.limit is not None and self.used > self.limit:
                raise _too_large(f"{label}: the decompressed layers exceed {self.limit} bytes")


def _is_tar_header(block: bytes) -> bool:
    return len(block) >= _BLOCK and block[:_BLOCK] != _ZERO_BLOCK and _checksum_ok(block[:_BLOCK])


def _sniff(head: bytes) -> str:
    if _is_tar_header(head):
        return "tar"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if re.match(rb"BZh[1-9]\x31\x41\x59\x26\x53\x59", head):
        return "bzip2"
    return "tar"  # an empty archive (zero blocks), or not a tar: the reader says which


def _zstd_backend() -> str | None:
    try:
        import compression.zstd  # noqa: F401  (Python 3.14)

        return "stdlib"
    except ImportError:
        pass
    if shutil.which("zstd"):
        return "cli"
    try:
        import zstandard  # noqa: F401

        return "zstandard"
    except ImportError:
        return None


def _uncompressed(
    blob: Path, media_type: str, target: Path, label: str, budget: _Budget, stop: threading.Event
) -> Path:
    """``blob`` itself if it is a plain tar, else its content decompressed into ``target``."""
    with open(blob, "rb") as src:
        head = src.read(_BLOCK)
        if not head:
            raise _invalid(f"{label}: the layer blob is empty")
        kind = _sniff(head)
        if kind == "tar":
            return blob
        src.seek(0)
        with open(target, "xb") as dst:
            if kind == "gzip":
                with gzip.GzipFile(fileobj=src, mode="rb") as stream:
                    _copy(stream.read, dst, label, budget, stop)
            elif kind == "xz":
                with lzma.LZMAFile(src) as stream:
                    _copy(stream.read, dst, label, budget, stop)
            elif kind == "bzip2":
                with bz2.BZ2File(src) as stream:
                    _copy(stream.read, dst, label, budget, stop)
            else:
                _unzstd(blob, dst, media_type, label, budget, stop)
    return target


def _copy(read: Callable[[int], bytes], dst: BinaryIO, label: str, budget: _Budget, stop: threading.Event) -> None:
    """Decompressed bytes from ``read`` into ``dst``; a decoding error is the layer's."""
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            chunk = read(_CHUNK)
        except (EOFError, OSError, zlib.error, lzma.LZMAError, ValueError) as exc:
            raise _invalid(f"{label}: cannot decompress the layer: {exc}") from None
        if not chunk:
            return
        budget.take(len(chunk), label)
        dst.write(chunk)


def _unzstd(blob: Path, dst: BinaryIO, media_type: str, label: str, budget: _Budget, stop: threading.Event) -> None:
    backend = _zstd_backend()
    if backend is None:
        raise _invalid(
            f"{label}: a zstd-compressed layer ({media_type}) needs the zstandard Python module or the zstd command"
        )
    if backend == "stdlib":
        from compression import zstd  # type: ignore[import-not-found]

        with zstd.ZstdFile(blob) as stream:
            _copy(stream.read, dst, label, budget, stop)
    elif backend == "zstandard":
        _unzstd_module(blob, dst, label, budget, stop)
    else:
        with open(blob, "rb") as src, tempfile.TemporaryFile() as errors:
            proc = subprocess.Popen(["zstd", "-d", "-c", "-q"], stdin=src, stdout=subprocess.PIPE, stderr=errors)
            assert proc.stdout is not None
            try:
                _copy(proc.stdout.read, dst, label, budget, stop)
            except BaseException:
                proc.kill()
                raise
            finally:
                proc.stdout.close()
                code = proc.wait()
            if code != 0:
                errors.seek(0)
                tail = errors.read()[-500:].decode("utf-8", "replace").strip()
                raise _invalid(f"{label}: cannot decompress the layer: zstd: {tail or f'exit {code}'}")


def _unzstd_module(blob: Path, dst: BinaryIO, label: str, budget: _Budget, stop: threading.Event) -> None:
    """With the zstandard module: frame by frame, so a truncated last frame is an error (its
    stream reader ends quietly), fed 2 KiB at a time, so one call cannot inflate to more than
    64 MiB (128 KiB per 4-byte RLE block)."""
    import zstandard  # type: ignore[import-not-found]

    context = zstandard.ZstdDecompressor()
    frame, inside = context.decompressobj(), False
    with open(blob, "rb") as src:
        while chunk := src.read(_CHUNK):
            if stop.is_set():
                raise _Stopped
            for start in range(0, len(chunk), 2048):
                piece = chunk[start : start + 2048]
                while piece:
                    try:
                        data = frame.decompress(piece)
                    except zstandard.ZstdError as exc:
                        raise _invalid(f"{label}: cannot decompress the layer: {exc}") from None
                    budget.take(len(data), label)
                    dst.write(data)
                    if frame.eof:
                        piece, frame, inside = frame.unused_data, context.decompressobj(), False
                    else:
                        piece, inside = b"", True
    if inside:
        raise _invalid(f"{label}: cannot decompress the layer: the last zstd frame is truncated")


# ---------------------------------------------------------------------------- reading a layer


class _Member:
    """What pass 1 keeps of one tar member (never its content)."""

    __slots__ = ("dev", "gid", "kind", "layer", "linkname", "mode", "mtime", "mtime_pax", "name", "offset", "parts",
                 "size", "uid", "whiteout", "xattrs")  # fmt: skip

    def __init__(self):
        self.xattrs: dict[bytes, bytes] | None = None
        self.whiteout: bytes | None = None  # b"opq" for an opaque marker, else the name removed


def _octal(field: bytes, what: str, label: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        if field[0] == 0xFF:
            return int.from_bytes(field, "big", signed=True)
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not _OCTAL.fullmatch(digits):
        raise _invalid(f"{label}: malformed tar header ({what} {field!r})")
    return int(digits, 8) if digits else 0


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _octal(block[148:156], "checksum", "")
    except ImageError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)
    return stored == signed


def _nts(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _parse_pax(data: bytes, label: str) -> dict[bytes, bytes]:
    """pax extended header records, in linear time."""
    records: dict[bytes, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] == 0:  # NUL padding some writers leave
            break
        space = data.find(b" ", pos, min(end, pos + 21))
        if space < 0 or not _DECIMAL.fullmatch(data[pos:space]):
            raise _invalid(f"{label}: malformed pax header")
        length = int(data[pos:space])
        stop = pos + length
        if length <= space - pos + 1 or stop > end or data[stop - 1] != 0x0A:
            raise _invalid(f"{label}: malformed pax header")
        key, eq, value = data[space + 1 : stop - 1].partition(b"=")
        if not eq or not key:
            raise _invalid(f"{label}: malformed pax header")
        records[key] = value
        pos = stop
    return records


def _split(name: bytes, label: str, what: str = "path") -> tuple[bytes, ...]:
    """``./x``, ``x`` and ``/x`` alike; ``..`` refused (even when it would stay inside)."""
    parts = tuple(part for part in name.split(b"/") if part and part != b".")
    if b".." in parts:
        raise _invalid(f"{label}: member {_show(name)}: {what} has '..' components")
    if any(len(part) > NAME_MAX for part in parts) or sum(len(p) + 1 for p in parts) >= PATH_MAX:
        raise _invalid(f"{label}: member {_show(name)}: {what} too long")
    return parts


def _read_layer(path: Path, layer: int, label: str, tree: _Tree) -> list[_Member]:
    """The members of one uncompressed layer tar, checked (headers only)."""
    members: list[_Member] = []
    with open(path, "rb", buffering=_CHUNK) as f:
        file_size = os.fstat(f.fileno()).st_size
        pos = 0
        pax: dict[bytes, bytes] = {}
        long_name = long_link = None
        while True:
            f.seek(pos)
            block = f.read(_BLOCK)
            if not block or block == _ZERO_BLOCK:
                if long_name is not None or long_link is not None or pax:
                    raise _invalid(f"{label}: the layer ends after an extended header")
                break  # end of archive (a missing end marker is accepted, as Go's reader does)
            if len(block) < _BLOCK:
                raise _invalid(f"{label}: the layer is truncated (a partial tar header at byte {pos})")
            if not _checksum_ok(block):
                raise _invalid(f"{label}: not a tar, or corrupt (bad header checksum at byte {pos})")
            flag = block[156:157]
            size = _octal(block[124:136], "size", label)
            pos += _BLOCK
            if flag in (b"x", b"g", b"L", b"K"):
                if not 0 <= size <= _META_MAX or pos + size > file_size:
                    raise _invalid(f"{label}: extended header of {size} bytes at byte {pos - _BLOCK}")
                data = f.read(size)
                pos += -(-size // _BLOCK) * _BLOCK
                if flag == b"x":
                    pax = _parse_pax(data, label)
                elif flag == b"L":
                    long_name = _nts(data)
                elif flag == b"K":
                    long_link = _nts(data)
                continue  # "g": global headers are ignored, as Docker and containerd do
            member, pos = _member(block, flag, size, pos, pax, long_name, long_link, label, file_size)
            pax, long_name, long_link = {}, None, None
            tree.count(label)
            if member is not None:
                member.layer = layer
                members.append(member)
    return members


def _member(block, flag, size, pos, pax, long_name, long_link, label, file_size) -> tuple[_Member | None, int]:
    magic = block[257:263]
    name = _nts(block[0:100])
    if magic == b"ustar\0":  # POSIX: a prefix field (STAR's is shorter)
        prefix = _nts(block[345:476] if block[508:512] == b"tar\0" else block[345:500])
        if prefix:
            name = prefix + b"/" + name
    linkname = _nts(block[157:257])
    m = _Member()
    m.mode = _octal(block[100:108], "mode", label) & 0o7777
    m.uid = _octal(block[108:116], "uid", label)
    m.gid = _octal(block[116:124], "gid", label)
    m.mtime = _octal(block[136:148], "mtime", label)
    m.mtime_pax = None
    for key, value in pax.items():
        if not value and not key.startswith(b"SCHILY.xattr."):
            continue  # an empty value unsets a record
        if key == b"path":
            name = value
        elif key == b"linkpath":
            linkname = value
        elif key in (b"size", b"uid", b"gid"):
            if not _DECIMAL.fullmatch(value):
                raise _invalid(f"{label}: member {_show(name)}: malformed pax {key.decode()} {value!r}")
            if key == b"size":
                size = int(value)
            else:
                setattr(m, key.decode(), int(value))
        elif key == b"mtime":
            m.mtime, m.mtime_pax = _pax_time(value, name, label)
        elif key.startswith(b"SCHILY.xattr."):
            xattr = key[len(b"SCHILY.xattr.") :]
            if xattr and b"=" not in xattr and b"\n" not in xattr:
                m.xattrs = m.xattrs or {}
                m.xattrs[xattr] = value
        elif key.startswith(b"GNU.sparse."):
            flag = b"S"
    if long_name is not None:
        name = long_name
    if long_link is not None:
        linkname = long_link
    m.name = name
    if flag == b"S":
        raise _invalid(f"{label}: member {_show(name)}: sparse files are not supported")
    if flag in _REGULAR_FLAGS:
        flag = DIR if flag == b"\0" and name.endswith(b"/") else REG
    if flag not in _KINDS and flag != REG:
        raise _invalid(f"{label}: member {_show(name)}: unsupported tar entry type {flag!r}")
    m.kind = flag
    m.size = size if flag == REG else 0  # other types have no data (as Go's reader)
    m.offset = pos
    if flag == REG:
        if size < 0 or pos + size > file_size:
            raise _invalid(f"{label}: member {_show(name)}: the layer is truncated (its data is cut)")
        pos += -(-size // _BLOCK) * _BLOCK
    m.linkname = linkname
    m.dev = (0, 0)
    if flag in (CHR, BLK):
        m.dev = (_octal(block[329:337], "devmajor", label), _octal(block[337:345], "devminor", label))
        if not all(0 <= number < 8**7 for number in m.dev):  # Linux: 12-bit major, 20-bit minor
            raise _invalid(f"{label}: member {_show(name)}: device number {m.dev} out of range")
    if m.uid < 0 or m.gid < 0:
        raise _invalid(f"{label}: member {_show(name)}: negative owner {m.uid}:{m.gid}")

    parts = _split(name, label)
    if any(part.startswith(WHITEOUT) for part in parts[:-1]):
        if parts[0].startswith(AUFS_META):
            return None, pos  # aufs metadata (.wh..wh.plnk/...), skipped as Docker does
        raise _invalid(f"{label}: member {_show(name)}: a whiteout name used as a directory")
    if parts and parts[-1].startswith(WHITEOUT):
        base = parts[-1]
        if base == OPAQUE:
            m.whiteout = b"opq"
        elif base.startswith(AUFS_META):
            return None, pos
        else:
            target = base[len(WHITEOUT) :]
            if target in (b"", b".", b".."):
                raise _invalid(f"{label}: member {_show(name)}: a whiteout of {_show(target)}")
            m.whiteout = target
        m.parts = parts[:-1]
        return m, pos
    m.parts = parts
    if flag == SYMLINK and (not linkname or len(linkname) >= PATH_MAX):
        raise _invalid(f"{label}: member {_show(name)}: symlink target empty or too long")
    if flag == LINK:
        m.linkname = _split(linkname, label, "hard link target")  # type: ignore[assignment]
        if not m.linkname:
            raise _invalid(f"{label}: member {_show(name)}: hard link to the root")
    if flag == REG:
        m.linkname = b""
    return m, pos


def _pax_time(value: bytes, name: bytes, label: str) -> tuple[int, bytes | None]:
    """(whole seconds, rounded down; the exact text when it has a fraction)."""
    match = _PAX_TIME.fullmatch(value)
    if not match:
        raise _invalid(f"{label}: member {_show(name)}: malformed pax mtime {value!r}")
    sign, whole, fraction = match.groups()
    seconds = int(whole)
    fraction = (fraction or b"").rstrip(b"0")
    if sign:
        seconds = -seconds - (1 if fraction else 0)
    return seconds, (sign + whole + b"." + fraction if fraction else None)


# ---------------------------------------------------------------------------- the tree


class _Node:
    """A directory or an inode (several paths share a non-directory node: hard links)."""

    __slots__ = ("children", "dev", "gid", "kind", "layer", "mode", "mtime", "mtime_pax", "offset", "size", "target",
                 "uid", "xattrs")  # fmt: skip

    def __init__(self, kind: bytes, member: _Member | None = None, layer: int = -1):
        self.kind = kind
        self.children: dict[bytes, _Node] | None = {} if kind == DIR else None
        self.layer, self.offset, self.size, self.target, self.dev = layer, 0, 0, b"", (0, 0)
        if member is None:
            self.mode, self.uid, self.gid, self.mtime, self.mtime_pax, self.xattrs = 0o755, 0, 0, 0, None, None
        else:
            self.take(member)
            if kind == REG:
                self.offset, self.size = member.offset, member.size
            elif kind == SYMLINK:
                self.target = member.linkname
            elif kind in (CHR, BLK):
                self.dev = member.dev

    def take(self, member: _Member, *, link: bool = False) -> None:
        """``member``'s attributes; a hard link's are applied to its inode as runtimes do
        (no chmod of a symlink, xattrs added to the ones it has)."""
        if not (link and self.kind == SYMLINK):
            self.mode = member.mode
        self.uid, self.gid, self.mtime, self.mtime_pax = member.uid, member.gid, member.mtime, member.mtime_pax
        if link:
            if member.xattrs:
                self.xattrs = {**(self.xattrs or {}), **member.xattrs}
        else:
            self.xattrs = member.xattrs


class _Tree:
    def __init__(self, max_entries: int):
        self.root = _Node(DIR)
        self.max_entries = max_entries
        self.created = 0
        self.steps = 0

    def count(self, label: str) -> None:
        self.created += 1
        if self.created > self.max_entries:
            raise _too_large(f"{label}: the image has more than {self.max_entries} entries")

    def apply(self, label: str, members: list[_Member]) -> None:
        # Whiteouts first: they only ever apply to the layers below.
        for m in members:
            if m.whiteout is None:
                continue
            directory = self._walk(m.parts, m, label, create=True)
            assert directory is not None and directory.children is not None
            if m.whiteout == b"opq":
                directory.children.clear()
            else:
                directory.children.pop(m.whiteout, None)
        for m in members:
            if m.whiteout is not None:
                continue
            if not m.parts:
                if m.kind != DIR:
                    raise _invalid(f"{label}: member {_show(m.name)}: the root is not a directory")
                self.root.take(m)
                continue
            parent = self._walk(m.parts[:-1], m, label, create=True)
            assert parent is not None and parent.children is not None
            name = m.parts[-1]
            old = parent.children.get(name)
            if old is not None and old.kind == DIR and m.kind == DIR:
                old.take(m)  # a directory over a directory: new attributes, contents kept
                continue
            if old is not None:
                del parent.children[name]
            if m.kind == LINK:
                target = self._lookup(m.linkname, m, label)  # type: ignore[arg-type]
                target.take(m, link=True)
                parent.children[name] = target
            else:
                parent.children[name] = _Node(m.kind, m, m.layer)

    def _lookup(self, parts: tuple[bytes, ...], m: _Member, label: str) -> _Node:
        directory = self._walk(parts[:-1], m, label, create=False)
        node = directory.children.get(parts[-1]) if directory is not None and directory.children is not None else None
        shown = _show(b"/".join(parts))
        if node is None:
            raise _invalid(f"{label}: member {_show(m.name)}: hard link target {shown} does not exist")
        if node.kind == DIR:
            raise _invalid(f"{label}: member {_show(m.name)}: hard link to the directory {shown}")
        return node

    def _walk(self, parts: tuple[bytes, ...], m: _Member, label: str, *, create: bool) -> _Node | None:
        """The directory ``parts`` names, symlinks followed inside the root; missing ones created
        (``create``) or None."""
        pending = list(reversed(parts))
        trail = [self.root]
        hops = 0
        while pending:
            self.steps += 1
            if self.steps > 64 * self.max_entries:
                raise _too_large(f"{label}: resolving paths takes too long")
            name = pending.pop()
            if name in (b"", b"."):
                continue
            if name == b"..":
                if len(trail) > 1:
                    trail.pop()
                continue
            children = trail[-1].children
            assert children is not None
            node = children.get(name)
            if node is None:
                if not create:
                    return None
                self.count(label)
                node = children[name] = _Node(DIR)
                node.mtime = m.mtime
            elif node.kind == SYMLINK:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise _invalid(f"{label}: member {_show(m.name)}: too many levels of symbolic links")
                if node.target.startswith(b"/"):
                    del trail[1:]
                pending.extend(reversed(node.target.split(b"/")))
                continue
            elif node.kind != DIR:
                if not create:
                    return None
                raise _invalid(f"{label}: member {_show(m.name)}: {_show(name)} on its path is not a directory")
            trail.append(node)
        return trail[-1]

    def walk(self) -> Iterator[tuple[bytes, _Node]]:
        """(path, node) depth first, names byte-sorted, parents first; the root's path is b"."."""
        stack: list[tuple[bytes, _Node]] = [(b".", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children:
                for name in sorted(node.children, reverse=True):
                    stack.append((path + b"/" + name, node.children[name]))

    def totals(self) -> tuple[int, int]:
        entries, total, seen = 0, 0, set()
        for _, node in self.walk():
            entries += 1
            if node.kind == REG and id(node) not in seen:
                seen.add(id(node))
                total += node.size
        return entries, total


# ---------------------------------------------------------------------------- writing


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    digits = len(str(len(body)))
    while len(str(len(body) + digits)) != digits:
        digits += 1
    return str(len(body) + digits).encode() + body


def _field(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _ustar_split(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) for the ustar fields, or None if ``name`` needs a pax path."""
    if len(name) <= 100:
        return b"", name
    if len(name) > 256:
        return None
    cut = name.rfind(b"/", 0, min(156, len(name) - 1))
    if cut <= 0 or len(name) - cut - 1 > 100:
        return None
    return name[:cut], name[cut + 1 :]


def _header(
    name: bytes,
    kind: bytes,
    node: _Node,
    *,
    size: int = 0,
    linkname: bytes = b"",
    xattrs: dict[bytes, bytes] | None = None,
) -> bytes:
    records: list[tuple[bytes, bytes]] = []
    split = _ustar_split(name)
    if split is None:
        records.append((b"path", name))
        split = (b"", name[:100])
    if len(linkname) > 100:
        records.append((b"linkpath", linkname))
        linkname = linkname[:100]
    if size >= 8**11:
        records.append((b"size", str(size).encode()))
        size = 0
    uid, gid, mtime = node.uid, node.gid, node.mtime
    for key, value in ((b"uid", uid), (b"gid", gid)):
        if not 0 <= value < 8**7:
            records.append((key, str(value).encode()))
    uid, gid = (uid if 0 <= uid < 8**7 else 0), (gid if 0 <= gid < 8**7 else 0)
    if node.mtime_pax is not None or not 0 <= mtime < 8**11:
        records.append((b"mtime", node.mtime_pax or str(mtime).encode()))
        mtime = min(max(mtime, 0), 8**11 - 1)
    for key in sorted(xattrs or ()):
        records.append((b"SCHILY.xattr." + key, xattrs[key]))  # type: ignore[index]
    if any(key in (b"path", b"linkpath") for key, _ in records) and not all(
        _utf8(value) for key, value in records if key in (b"path", b"linkpath")
    ):
        records.insert(0, (b"hdrcharset", b"BINARY"))
    major, minor = node.dev if kind in (CHR, BLK) else (0, 0)
    block = _ustar(split, node.mode, uid, gid, size, mtime, kind, linkname, major, minor)
    if not records:
        return block
    data = b"".join(_pax_record(key, value) for key, value in records)
    pax = _ustar((b"", b"././@PaxHeader"), 0o644, 0, 0, len(data), 0, b"x", b"", 0, 0)
    return pax + data + bytes(-len(data) % _BLOCK) + block


def _utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _ustar(split, mode, uid, gid, size, mtime, kind, linkname, major, minor) -> bytes:
    prefix, name = split
    block = bytearray(_BLOCK)
    block[0 : len(name)] = name
    block[100:108] = _field(mode, 8)
    block[108:116] = _field(uid, 8)
    block[116:124] = _field(gid, 8)
    block[124:136] = _field(size, 12)
    block[136:148] = _field(mtime, 12)
    block[148:156] = b" " * 8
    block[156:157] = kind
    block[157 : 157 + len(linkname)] = linkname
    block[257:265] = b"ustar\x0000"
    block[329:337] = _field(major, 8)
    block[337:345] = _field(minor, 8)
    block[345 : 345 + len(prefix)] = prefix
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


class _Output:
    def __init__(self, fd: int):
        self.fd, self.buffer, self.written, self.in_kernel = fd, bytearray(), 0, True

    def put(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= 4 * _CHUNK:
            self.flush()

    def flush(self) -> None:
        view = memoryview(self.buffer)
        while view:
            view = view[os.write(self.fd, view) :]
        self.written += len(self.buffer)
        self.buffer = bytearray()

    def copy(self, source: int, offset: int, size: int, what: str) -> None:
        if size <= _SMALL_FILE:
            data = os.pread(source, size, offset)
            if len(data) != size:
                raise _invalid(f"{what}: the layer shrank while it was read")
            self.put(data)
        else:
            self.flush()
            end = offset + size
            while offset < end:
                count = min(end - offset, 1 << 30)
                if self.in_kernel:
                    try:
                        copied = os.copy_file_range(source, self.fd, count, offset)
                    except OSError as exc:
                        if exc.errno not in _NO_KERNEL_COPY:
                            raise
                        self.in_kernel = False
                        continue
                else:
                    data = os.pread(source, min(count, _CHUNK), offset)
                    self.put(data)
                    self.flush()
                    copied = len(data)
                if copied == 0:
                    raise _invalid(f"{what}: the layer shrank while it was read")
                offset += copied
                if self.in_kernel:
                    self.written += copied
        self.put(bytes(-size % _BLOCK))


def _write(tree: _Tree, sources: list[Path], labels: list[str], out: Path) -> None:
    fd, partial = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    descriptors: dict[int, int] = {}
    try:
        output = _Output(fd)
        first_path: dict[int, bytes] = {}  # non-directory node -> the path it was written at
        for path, node in tree.walk():
            if node.kind == DIR:
                output.put(_header(path + b"/", DIR, node, xattrs=node.xattrs))
                continue
            primary = first_path.get(id(node))
            if primary is not None:
                output.put(_header(path, LINK, node, linkname=primary))
                continue
            first_path[id(node)] = path
            if node.kind == REG:
                output.put(_header(path, REG, node, size=node.size, xattrs=node.xattrs))
                if node.layer not in descriptors:
                    descriptors[node.layer] = os.open(sources[node.layer], os.O_RDONLY | os.O_CLOEXEC)
                what = f"{labels[node.layer]}: member {_show(path)}"
                output.copy(descriptors[node.layer], node.offset, node.size, what)
            else:
                output.put(_header(path, node.kind, node, linkname=node.target, xattrs=node.xattrs))
        output.put(_ZERO_BLOCK * 2)
        output.put(bytes(-(output.written + len(output.buffer)) % _RECORD))
        output.flush()
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(partial, out)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    finally:
        for descriptor in descriptors.values():
            os.close(descriptor)
