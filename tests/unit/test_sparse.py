"""store/sparse.py: copies keep holes as holes, within a filesystem and across two; hashes skip reading them."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest

from machinen_async.store import assets, sparse

MIB = 1 << 20


def _sparse_file(path: Path) -> bytes:
    """64 MiB with 1 MiB of data every 8 MiB; returns the whole content."""
    with open(path, "wb") as f:
        f.truncate(64 * MIB)
        for offset in range(0, 64 * MIB, 8 * MIB):
            f.seek(offset + 4096)
            f.write(os.urandom(MIB))
    return path.read_bytes()


@pytest.mark.parametrize("source_dir", ["/dev/shm", None], ids=["tmpfs-to-disk", "same-filesystem"])
def test_a_copy_is_exact_private_and_keeps_its_holes(tmp_path, source_dir):
    with tempfile.TemporaryDirectory(dir=source_dir or tmp_path) as where:
        source = Path(where) / "ram"
        content = _sparse_file(source)
        target = tmp_path / "copy"
        sparse.copy(source, target)
        assert target.read_bytes() == content
        assert target.stat().st_mode & 0o777 == 0o600
        assert target.stat().st_blocks * 512 <= 12 * MIB  # 8 MiB of data, not 64
        with open(target, "rb") as copied:
            assert len(list(sparse.data_regions(copied.fileno(), 64 * MIB))) == 8


def test_a_copy_never_overwrites(tmp_path):
    (tmp_path / "a").write_bytes(b"x")
    (tmp_path / "b").write_bytes(b"y")
    with pytest.raises(FileExistsError):
        sparse.copy(tmp_path / "a", tmp_path / "b")


def test_a_files_hash_skips_reading_its_holes_but_counts_them(tmp_path):
    files = {"empty": b"", "dense": os.urandom(3_000_001)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with open(tmp_path / "holes", "wb") as f:  # holes at both ends and between data
        f.truncate(50 << 20)
        f.seek(10 << 20)
        f.write(os.urandom(123_457))
        f.seek(30 << 20)
        f.write(b"x")
    for path in tmp_path.iterdir():
        assert assets.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest(), path.name
