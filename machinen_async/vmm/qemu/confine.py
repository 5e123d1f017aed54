"""QEMU in namespaces of its own (bubblewrap), seeing only the files a VM needs.

``-sandbox`` limits what QEMU may do; this limits what it can see: a guest
that took QEMU over through a device-emulation bug would still run as this
user, with the user's files (``~/.ssh``, other projects) a path away.  Under
bwrap QEMU gets a new user, PID, IPC, UTS and cgroup namespace and a root made of
/usr (read-only), /etc/resolv.conf (slirp reads it), a minimal /dev (plus
/dev/kvm under KVM), and bind mounts of exactly the files on its command line
(``backend.visible``): the kernel, initrd, base image and frozen disk layers
(read-only), a fork template's RAM file (read-only where QEMU maps it so), and
read-write only its own top disk layer and its own RAM file.  No directory is
writable: its sockets, new disk layers and migration state reach it as
descriptors, so it can plant nothing (a symlink, a FIFO) where the supervisor
creates files.  The network namespace stays the host's: QEMU's user-mode
network opens host sockets (``netguard`` checks them).  ``qemu-img convert``,
which reads layers a QEMU wrote, runs the same way.

``$MACHINEN_QEMU_NAMESPACES``: ``auto`` (default) confines QEMU when ``bwrap`` is installed
and can create a user namespace here (some containers and hardened kernels forbid them; QEMU
then runs unconfined, still under seccomp, and the supervisor log says so), ``on`` refuses to
start QEMU otherwise (``BOOT_CONFINEMENT_UNAVAILABLE``), ``off`` never confines.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import structlog

from ...errors import BootError

log: structlog.typing.FilteringBoundLogger = structlog.get_logger("machinen.confine")

SYSTEM_LINKS = {"/bin": "usr/bin", "/sbin": "usr/sbin", "/lib": "usr/lib", "/lib64": "usr/lib64"}


def bwrap() -> str | None:
    """The bwrap to confine QEMU with, per $MACHINEN_QEMU_NAMESPACES, or None."""
    setting = os.environ.get("MACHINEN_QEMU_NAMESPACES", "auto").lower()
    if setting == "off":
        return None
    program, why_not = _usable_bwrap()
    if program is None and setting == "on":
        raise BootError(f"cannot confine QEMU ($MACHINEN_QEMU_NAMESPACES=on): {why_not}",
                        code="BOOT_CONFINEMENT_UNAVAILABLE")  # fmt: skip
    return program


@functools.cache
def _usable_bwrap() -> tuple[str | None, str]:
    program = shutil.which("bwrap")
    if program is None:
        why_not = "bwrap (Debian package bubblewrap) is not installed"
    else:
        try:
            tried = subprocess.run([program, "--unshare-user", "--ro-bind", "/", "/", "true"],
                                   capture_output=True, timeout=30, check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            why_not = f"bwrap did not run: {e}"
        else:
            if tried.returncode == 0:
                return program, ""
            why_not = f"bwrap cannot create a user namespace here: {tried.stderr.decode(errors='replace').strip()}"
    if os.environ.get("MACHINEN_QEMU_NAMESPACES", "auto").lower() != "on":
        log.warning("QEMU runs without namespaces of its own", reason=why_not)
    return None, why_not


def confined(
    argv: list[str], *, read_only: Iterable[Path], writable: Iterable[Path], kvm: bool, info_fd: int | None = None
) -> list[str] | None:
    """``argv`` under bwrap (which reports the sandboxed pid on ``info_fd``), or None without bwrap."""
    program = bwrap()
    if program is None:
        return None
    args = [program, "--unshare-user", "--unshare-pid", "--as-pid-1", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", *(["--info-fd", str(info_fd)] if info_fd is not None else []),
            "--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]  # fmt: skip
    for link, target in SYSTEM_LINKS.items():
        if Path(link).is_symlink():  # merged /usr (Debian since bookworm): links into /usr
            args += ["--symlink", target, link]
        elif Path(link).is_dir():
            args += ["--ro-bind", link, link]
    args += [
        "--ro-bind-try",
        "/etc/resolv.conf",
        "/etc/resolv.conf",
        "--ro-bind-try",
        "/etc/ld.so.cache",
        "/etc/ld.so.cache",
    ]
    if kvm:
        args += ["--dev-bind", "/dev/kvm", "/dev/kvm"]
    for path in read_only:
        args += ["--ro-bind", str(path), str(path)]
    for path in writable:
        args += ["--bind", str(path), str(path)]
    return [*args, "--", *argv]
