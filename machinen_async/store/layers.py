"""Disk layers and RAM templates shared between VMs, reference counted by ``flock``.

- A *layer* (``$MACHINEN_HOME/layers/<id>/disk.qcow2``) is one qcow2 file of
  a VM's disk chain.  A VM writes to its newest layer; a fork freezes it and
  gives the source a fresh one on top, and every sibling a fresh one too.
- A *template* (``$MACHINEN_RUNTIME_DIR/templates/<id>/``, tmpfs) is a frozen
  guest RAM file (``mem``) plus the device state (``state``) of one fork
  event; siblings map ``mem`` copy-on-write (``share=off``).

Every user of a layer or template holds a shared ``flock`` on its ``lock``
file for as long as it needs it (supervisors for their whole life).  The
garbage collector deletes exactly those that nobody holds, so a crashed user
(even ``kill -9``) never pins anything, and nothing in use is ever deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import paths


@dataclass(frozen=True)
class Shared:
    """A reference-counted directory (a layer or a template)."""

    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def lock(self) -> Path:
        return self.path / "lock"

    def hold(self) -> int:
        """Take a reference; close the returned fd to drop it.

        Raises FileNotFoundError if the collector removed it first.
        """
        fd = os.open(self.lock, os.O_RDONLY | os.O_NOFOLLOW)
        fcntl.flock(fd, fcntl.LOCK_SH)
        if os.fstat(fd).st_nlink == 0:  # collected while we waited for the lock
            os.close(fd)
            raise FileNotFoundError(self.lock)
        return fd


@dataclass(frozen=True)
class Layer(Shared):
    @property
    def disk(self) -> Path:
        return self.path / "disk.qcow2"


@dataclass(frozen=True)
class Template(Shared):
    @property
    def mem(self) -> Path:
        return self.path / "mem"

    @property
    def state(self) -> Path:
        return self.path / "state"


def layers_dir() -> Path:
    return paths.home() / "layers"


def templates_dir() -> Path:
    return paths.runtime_dir() / "templates"


def _create(root: Path) -> tuple[Path, int]:
    """Create ``root/<id>`` already referenced; it appears under its final
    name only then, so the collector never sees it unreferenced."""
    paths.private_dir(root.parent)
    paths.private_dir(root)
    name = secrets.token_hex(8)
    partial = root / f".{name}"
    partial.mkdir(mode=0o700)
    fd = os.open(partial / "lock", os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    partial.rename(root / name)
    return root / name, fd


def new_layer() -> tuple[Layer, int]:
    """A fresh layer directory and a reference to it (an fd to close)."""
    path, fd = _create(layers_dir())
    return Layer(path), fd


def new_template() -> tuple[Template, int]:
    path, fd = _create(templates_dir())
    return Template(path), fd


def collect_garbage(*, dry_run: bool = False) -> list[Path]:
    """Delete every layer and template that no process holds; return them."""
    removed = []
    for root in (layers_dir(), templates_dir()):
        if not root.is_dir():
            continue
        for path in root.iterdir():
            if path.name.startswith("."):
                continue  # being created
            if remove_unheld(path, dry_run=dry_run):
                removed.append(path)
    return removed


def remove_unheld(path: Path, *, dry_run: bool = False) -> bool:
    """Remove the reference-counted directory ``path`` if nobody holds it; whether it was (or,
    with ``dry_run``, would be) removed.  One without a ``lock`` (being removed, or not ours) stays."""
    if not unlink_unheld(path / "lock", dry_run=dry_run):
        return False
    if not dry_run:  # its lock is gone: a late holder sees st_nlink == 0, a new one finds nothing
        shutil.rmtree(path, ignore_errors=True)
    return True


def unlink_unheld(lock: Path, *, dry_run: bool = False) -> bool:
    """Unlink the lock file ``lock`` if no process holds a ``flock`` on it (unlinked under an
    exclusive lock, so a late holder sees st_nlink == 0); whether it was (or would be)."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if not dry_run:
            lock.unlink()
        return True
    finally:
        os.close(fd)


def close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
