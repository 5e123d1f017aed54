"""Where machinen keeps things; every location can be moved by an env var.

- ``MACHINEN_HOME`` (default ``~/.machinen``): the registry, ``vms/<name>/``
  holds a VM's sockets, console log, disk overlay and lock.
- ``MACHINEN_CACHE_DIR`` (default ``~/.cache/machinen``): kernel, initrd,
  rootfs tarballs and ext4 images, content addressed.
- ``MACHINEN_RUNTIME_DIR`` (default ``/dev/shm/machinen-<uid>``): guest RAM
  files; must be tmpfs so RAM is shareable between processes.

Directories are created 0700.
"""

from __future__ import annotations

import os
from pathlib import Path


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def home() -> Path:
    return Path(os.environ.get("MACHINEN_HOME") or Path.home() / ".machinen")


def vms_dir() -> Path:
    return home() / "vms"


def cache_dir() -> Path:
    return Path(os.environ.get("MACHINEN_CACHE_DIR") or Path.home() / ".cache" / "machinen")


def runtime_dir() -> Path:
    return Path(os.environ.get("MACHINEN_RUNTIME_DIR") or f"/dev/shm/machinen-{os.getuid()}")
