"""Sparse files: guest RAM images, device state and disks are mostly holes.

One place that knows how to find a file's data (SEEK_DATA/SEEK_HOLE, never
reading the holes) and how to copy a file keeping its holes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path


def data_regions(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each region of ``fd``'s first ``size`` bytes that holds data."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


COPY_BLOCK = 1 << 20
# copy_file_range refuses some pairs of filesystems (tmpfs RAM -> a bundle on disk: EXDEV).
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


def copy(source: Path, target: Path) -> None:
    """Copy ``source`` to a new ``target`` (0600), its holes left as holes.

    Data regions are copied in the kernel (copy_file_range) where the two filesystems
    allow it, else through a buffer.  Blocking: run it in a worker thread."""
    with open(source, "rb") as src, open(target, "xb", opener=private_opener) as dst:
        size = os.fstat(src.fileno()).st_size
        in_kernel = True
        for start, end in data_regions(src.fileno(), size):
            offset = start
            while offset < end:
                count = min(COPY_BLOCK, end - offset) if not in_kernel else end - offset
                if in_kernel:
                    try:
                        copied = os.copy_file_range(src.fileno(), dst.fileno(), count, offset, offset)
                    except OSError as exc:
                        if exc.errno not in _NO_KERNEL_COPY:
                            raise
                        in_kernel = False
                        continue
                else:
                    copied = os.pwrite(dst.fileno(), os.pread(src.fileno(), count, offset), offset)
                if copied == 0:
                    raise OSError(errno.EIO, f"{source} shrank while it was copied")
                offset += copied
        dst.truncate(size)


def private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)
