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
