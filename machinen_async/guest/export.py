"""The guest's root filesystem as a tar stream on stdout, for ``provision()`` in an image without
GNU tar (busybox, distroless): run as root by the agent's own interpreter, which every image has.

It writes what ``tar -C / -c --one-file-system --numeric-owner --xattrs --exclude=PATTERN... .``
does: entries named ``./...``; a mount point of another file system kept, empty; hard links as
links; owners by number; extended attributes (file capabilities) as PAX ``SCHILY.xattr`` records,
which ``mke2fs -d`` reads.  A file that cannot be read is reported on stderr and left out, and the
exit status is then 1, as tar's for a file that changed while it was read.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import tarfile

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing into the guest (slow under TCG)
if TYPE_CHECKING:
    from typing import BinaryIO, TextIO


def main() -> None:
    sys.exit(export("/", sys.argv[1:], sys.stdout.buffer, sys.stderr))


def export(root: str, excludes: list[str], out: BinaryIO, errors: TextIO) -> int:
    """Write the tree below ``root`` to ``out`` (``excludes``: tar's ``--exclude`` patterns,
    matched against the ``./``-names); 0, or 1 when something could not be read."""
    failed = False
    root = root.rstrip("/")
    device = os.lstat(root or "/").st_dev
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        pending = ["."]
        while pending:
            name = pending.pop()
            path = f"{root}/{name[2:]}"
            try:
                entry = tar.gettarinfo(path, arcname=name)  # a second name of an inode: a hard link
                entry.uname = entry.gname = ""
                entry.pax_headers = _xattrs(path)
                if entry.isreg():
                    with open(path, "rb") as content:
                        tar.addfile(entry, content)
                else:
                    tar.addfile(entry)
                if entry.isdir() and (name == "." or os.lstat(path).st_dev == device):
                    children = sorted(os.listdir(path), reverse=True)  # popped in name order
                    pending += [f"{name}/{child}" for child in children if not _excluded(f"{name}/{child}", excludes)]
            except OSError as exc:
                failed = True
                errors.write(f"export: {path}: {exc.strerror or exc}\n")
    return 1 if failed else 0


def _excluded(name: str, excludes: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in excludes)


def _xattrs(path: str) -> dict[str, str]:
    """As GNU tar records them; binary values (a capability) survive as surrogates, which tarfile
    writes back as the same bytes under ``hdrcharset=BINARY``."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    found = {}
    for name in names:
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        found[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
    return found
