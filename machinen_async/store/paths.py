"""Where machinen keeps things; every location can be moved by an env var.

- ``MACHINEN_HOME`` (default ``~/.machinen``): the registry, ``vms/<name>/``
  holds a VM's sockets, console log, disk overlay and lock.
- ``MACHINEN_CACHE_DIR`` (default ``~/.cache/machinen``): kernel, initrd,
  rootfs tarballs and ext4 images, content addressed.
- ``MACHINEN_RUNTIME_DIR`` (default ``$XDG_RUNTIME_DIR/machinen``, else
  ``/dev/shm/machinen-<uid>``): guest RAM files; must be tmpfs so RAM is
  shareable between processes.

Directories are created 0700, and one that exists must be ours: a real
directory (not a symlink) owned by this user.  The default runtime directory
has a predictable name in a world-writable place, so another user could
create it first and read every guest's RAM.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import MachinenError


def private_dir(path: Path) -> Path:
    """``path`` as a 0700 directory of this user's: created if missing, else checked.

    Raises ``MachinenError`` (PATH_NOT_PRIVATE) for a symlink, a non-directory
    or a directory owned by another user, rather than using it."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # not a directory: said below
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        problem = "a symlink"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "not a directory"
    elif info.st_uid != os.getuid():
        problem = f"owned by uid {info.st_uid}"
    else:
        problem = None
    if problem is not None:
        raise MachinenError(
            f"{path} is {problem}; machinen keeps its files only in directories of its own user (uid {os.getuid()})",
            code="PATH_NOT_PRIVATE",
        )
    path.chmod(0o700)
    return path


def home() -> Path:
    return Path(os.environ.get("MACHINEN_HOME") or Path.home() / ".machinen")


def vms_dir() -> Path:
    return home() / "vms"


def cache_dir() -> Path:
    return Path(os.environ.get("MACHINEN_CACHE_DIR") or Path.home() / ".cache" / "machinen")


def runtime_dir() -> Path:
    if os.environ.get("MACHINEN_RUNTIME_DIR"):
        return Path(os.environ["MACHINEN_RUNTIME_DIR"])
    if os.environ.get("XDG_RUNTIME_DIR"):  # the user's own tmpfs (systemd), 0700 by design
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "machinen"
    return Path(f"/dev/shm/machinen-{os.getuid()}")


def create_file(path: Path, flags: int = os.O_WRONLY, mode: int = 0o600) -> int:
    """A new empty file at ``path``, open with ``flags``: the descriptor.

    Made for directories another process can write to (a confined VMM, earlier): whatever
    is at ``path`` already (a leftover, or a symlink planted to a victim file) is unlinked,
    never followed, and the file is created relative to a descriptor of its directory with
    ``O_CREAT | O_EXCL | O_NOFOLLOW``, so it is a new inode of ours or the call fails."""
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.unlink(path.name, dir_fd=directory)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            pass  # the O_EXCL open below fails with EEXIST: nothing there is ever followed
        return os.open(path.name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=directory)
    finally:
        os.close(directory)


def open_regular(path: Path, flags: int = os.O_RDONLY) -> int:
    """An existing regular file at ``path``, open with ``flags``, never through a symlink in its
    last component and never blocking on a FIFO or device put there.  ``MachinenError``
    (PATH_NOT_PRIVATE) for anything but a regular file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise MachinenError(f"{path} is a symlink; machinen opens only files of its own there",
                            code="PATH_NOT_PRIVATE") from None  # fmt: skip
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MachinenError(f"{path} is not a regular file", code="PATH_NOT_PRIVATE")
    os.set_blocking(fd, True)
    return fd
