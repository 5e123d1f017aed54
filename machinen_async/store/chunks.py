"""Content-addressed chunks: what moves between hosts, and the store that receives them.

A file is described by a *recipe*: its size and the sha256 of every
``CHUNK_SIZE`` piece, ``None`` for a piece that is a hole (RAM images and
disk images are mostly holes, found with SEEK_DATA without reading them).
A host keeps the chunks it received in a store, so a second transfer of a
similar file (the next snapshot of the same VM) sends only the pieces that
changed, and a transfer cut mid-way resumes from the pieces that landed.

These functions block (file I/O, hashing): call them from a worker thread.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import TransferError
from . import paths, sparse

CHUNK_SIZE = 256 * 1024
# Chunks and received bundles not used for this long are collected by `machinen gc`,
# leftovers of a transfer that was killed after this long.
CHUNK_KEEP_S = 7 * 24 * 3600
PARTIAL_KEEP_S = 3600

Recipe = dict[str, Any]  # {"size": int, "chunks": [bytes | None, ...]}, digests raw (32 bytes)


def recipe(path: Path) -> Recipe:
    """Size and chunk digests of ``path``; chunks without data are ``None``."""
    with open(path, "rb") as file:
        fd = file.fileno()
        size = os.fstat(fd).st_size
        count = -(-size // CHUNK_SIZE)
        with_data = set()
        for start, end in sparse.data_regions(fd, size):
            with_data.update(range(start // CHUNK_SIZE, -(-end // CHUNK_SIZE)))
        chunks: list[bytes | None] = [None] * count
        for index in sorted(with_data):
            data = os.pread(fd, CHUNK_SIZE, index * CHUNK_SIZE)
            if data.count(0) != len(data):
                chunks[index] = hashlib.sha256(data).digest()
    return {"size": size, "chunks": chunks}


def read_chunk(path: Path, index: int) -> bytes:
    with open(path, "rb") as file:
        return os.pread(file.fileno(), CHUNK_SIZE, index * CHUNK_SIZE)


def store_dir() -> Path:
    return paths.private_dir(paths.home() / "chunks")


def _chunk_path(digest: bytes) -> Path:
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise TransferError(f"malformed chunk digest {digest!r}", code="TRANSFER_CORRUPT", retryable=False)
    hexdigest = digest.hex()
    return store_dir() / hexdigest[:2] / hexdigest


def missing(digests: list[bytes]) -> list[bytes]:
    """The digests this host's store does not hold."""
    return [digest for digest in digests if not _chunk_path(digest).is_file()]


def put(digest: bytes, data: bytes) -> None:
    """Store one chunk after checking it is what its digest says."""
    if hashlib.sha256(data).digest() != digest:
        raise TransferError(f"chunk {digest.hex()[:12]} arrived damaged", code="TRANSFER_CORRUPT", retryable=True)
    target = _chunk_path(digest)
    paths.private_dir(target.parent)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    partial.rename(target)


def assemble(file_recipe: Recipe, target: Path) -> None:
    """Write a file from stored chunks, holes left as holes (0600)."""
    chunks = file_recipe["chunks"]
    if not isinstance(chunks, list) or len(chunks) != -(-file_recipe["size"] // CHUNK_SIZE):
        raise TransferError("malformed file recipe", code="TRANSFER_CORRUPT", retryable=False)
    now = time.time()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for index, digest in enumerate(chunks):
            if digest is None:
                continue
            source = _chunk_path(digest)
            try:
                data = source.read_bytes()
            except FileNotFoundError:
                raise TransferError(
                    f"chunk {digest.hex()[:12]} was never received", code="TRANSFER_INCOMPLETE"
                ) from None
            os.utime(source, (now, now))  # recently used: kept by gc
            os.pwrite(fd, data, index * CHUNK_SIZE)
        os.ftruncate(fd, file_recipe["size"])
    finally:
        os.close(fd)


def work_path(label: str) -> Path:
    """A new path (not created) for the local bundles of one transfer; `machinen gc`
    removes what a killed transfer left there."""
    return paths.private_dir(paths.home() / "handoff") / f"{label}-{os.urandom(4).hex()}"


def collect_unused(*, dry_run: bool = False) -> list[Path]:
    """What transfers left behind: chunks and received bundles unused for
    CHUNK_KEEP_S (they only speed up later transfers), and the partial files
    and work directories of transfers killed mid-way (after PARTIAL_KEEP_S)."""
    now = time.time()
    home = paths.home()
    received = [*(home / "chunks").glob("*/*"), *(home / "bundles").glob("*")]
    candidates = [
        *((path, PARTIAL_KEEP_S if path.name.startswith(".") else CHUNK_KEEP_S) for path in received),
        *((path, PARTIAL_KEEP_S) for path in (home / "handoff").glob("*")),
    ]
    removed = []
    for path, keep_s in candidates:
        try:
            if path.lstat().st_mtime < now - keep_s:
                if dry_run:
                    pass
                elif path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
        except FileNotFoundError:
            pass
    return removed
