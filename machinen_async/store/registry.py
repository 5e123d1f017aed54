"""Named VMs on this host: ``$MACHINEN_HOME/vms/<name>/``.

A name belongs to the supervisor holding an exclusive ``flock`` on the
entry's ``lock`` file, so a crashed supervisor (even ``kill -9``) frees its
name at once and liveness never depends on stale pid files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from ..errors import MachinenError, RegistryError
from ..protocol.messages import VMRow
from . import paths

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")  # fullmatch: "$" lets a final newline through


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise RegistryError(
            f"invalid VM name {name!r}: 1-48 characters from A-Z a-z 0-9 _ . - , starting with a letter or digit",
            code="REGISTRY_NAME_INVALID",
        )
    return name


def new_name() -> str:
    return f"vm-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class VmDir:
    """The files of one named VM."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def lock(self) -> Path:
        return self.path / "lock"

    @property
    def supervisor_socket(self) -> Path:
        return self.path / "supervisor.sock"

    @property
    def agent_socket(self) -> Path:
        return self.path / "agent.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.path / "qmp.sock"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def supervisor_log(self) -> Path:
        return self.path / "supervisor.log"

    @property
    def qemu_log(self) -> Path:
        return self.path / "qemu.log"

    @property
    def meta(self) -> Path:
        return self.path / "meta.json"

    def read_meta(self) -> dict[str, Any] | None:
        try:
            with open(paths.open_regular(self.meta), "rb") as f:
                return json.loads(f.read())
        except (OSError, ValueError, MachinenError):
            return None

    def write_meta(self, meta: dict[str, Any]) -> None:
        partial = self.meta.with_suffix(".partial")
        with open(paths.create_file(partial), "wb") as f:  # a new 0600 file, never through a symlink
            f.write(json.dumps(meta).encode())
        partial.rename(self.meta)

    def is_live(self) -> bool:
        """True while a supervisor holds the entry's lock."""
        try:
            fd = os.open(self.lock, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # none (or not a file of ours: O_NOFOLLOW)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


def vm_dir(name: str) -> VmDir:
    return VmDir(paths.vms_dir() / validate_name(name))


@contextlib.contextmanager
def claim(name: str) -> Iterator[VmDir]:
    """Own ``name`` for the duration; the entry is removed on exit.

    Raises REGISTRY_NAME_IN_USE while another live supervisor owns it.  A
    leftover entry of a dead supervisor is cleared and reused.
    """
    entry = vm_dir(name)
    paths.private_dir(entry.path.parent)
    fd = _lock_entry(entry)
    try:
        for leftover in entry.path.iterdir():
            if leftover.name != "lock":
                _remove(leftover)
        yield entry
    finally:
        for leftover in entry.path.iterdir():
            if leftover.name != "lock":
                _remove(leftover)
        # Unlink while still holding the lock, so a concurrent claimer that
        # opened the old lock file cannot believe it owns the new entry.
        entry.lock.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            entry.path.rmdir()
        os.close(fd)


def _name_in_use(entry: VmDir) -> RegistryError:
    holder = (entry.read_meta() or {}).get("supervisor_pid")
    return RegistryError(
        f"a VM named {entry.name!r} is already running" + (f" (supervisor pid {holder})" if holder else ""),
        code="REGISTRY_NAME_IN_USE",
    )


def ensure_free(name: str) -> None:
    entry = vm_dir(name)
    if entry.is_live():
        raise _name_in_use(entry)


def _lock_entry(entry: VmDir) -> int:
    while True:
        paths.private_dir(entry.path)
        fd = os.open(entry.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _name_in_use(entry) from None
        try:
            if os.stat(entry.lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # we locked a file its previous owner had just unlinked: retry


def clear_leftovers(entry: VmDir) -> None:
    """Remove what a killed supervisor left: its entry and its RAM directory.

    ``meta.json`` only suggests which RAM directory: it is removed only if it is one this
    VM's name could have (``<runtime>/<name>-<8 hex digits>``, as ``new_ram_dir`` makes them),
    a real directory there and not a symlink, so no other VM's RAM, the templates or a
    file elsewhere is ever removed on its word."""
    ram_dir = (entry.read_meta() or {}).get("ram_dir")
    if isinstance(ram_dir, str) and _is_ram_dir_of(entry.name, Path(ram_dir)):
        shutil.rmtree(ram_dir, ignore_errors=True)
    with contextlib.suppress(RegistryError), claim(entry.name):
        pass  # claiming a dead entry clears it; releasing removes it


def _is_ram_dir_of(name: str, ram_dir: Path) -> bool:
    if ram_dir.parent != paths.runtime_dir() or not re.fullmatch(re.escape(name) + r"-[0-9a-f]{8}", ram_dir.name):
        return False
    try:
        return stat.S_ISDIR(ram_dir.lstat().st_mode)
    except OSError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def find(name: str) -> VmDir:
    entry = vm_dir(name)
    if not entry.is_live():
        raise RegistryError(f"no running VM named {name!r}", code="REGISTRY_VM_NOT_FOUND")
    return entry


def live_vms() -> list[VmDir]:
    root = paths.vms_dir()
    if not root.is_dir():
        return []
    entries = (VmDir(p) for p in root.iterdir() if p.is_dir())
    return sorted((e for e in entries if e.is_live()), key=lambda e: e.name)


def collect_stale(*, dry_run: bool = False) -> list[Path]:
    """Entries and RAM directories that no live supervisor owns (after a ``kill -9``)."""
    removed: list[Path] = []
    root = paths.vms_dir()
    live = set()
    for path in sorted(root.iterdir()) if root.is_dir() else ():
        entry = VmDir(path)
        if entry.is_live():
            live.add(entry.name)
        elif path.is_dir():
            removed.append(path)
            if not dry_run:
                clear_leftovers(entry)
    runtime = paths.runtime_dir()
    for path in sorted(runtime.iterdir()) if runtime.is_dir() else ():
        owner, _, suffix = path.name.rpartition("-")
        if path.name == "templates" or not owner or len(suffix) != 8 or owner in live:
            continue
        removed.append(path)
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
    return removed


def name_holder(entry: VmDir) -> int | None:
    """The pid of the process holding ``entry``'s name (its supervisor), from /proc/locks.

    A pid in ``meta.json`` may have been reused since it was written; the
    kernel's lock table names the process that holds the lock now."""
    try:
        info = os.stat(entry.lock)
        with open("/proc/locks") as table:
            lines = table.readlines()
    except OSError:
        return None
    file_id = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in lines:
        fields = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters have "->"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "WRITE" and fields[5] == file_id:
            return int(fields[4])
    return None


def kill_holder(entry: VmDir) -> bool:
    """SIGKILL the process holding ``entry``'s name (QEMU dies with it: pdeathsig); False if none did."""
    pid = name_holder(entry)
    if pid is None:
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if name_holder(entry) != pid:  # exited between the two looks: the fd may name another process
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


async def wait_until_gone(entry: VmDir, timeout: float) -> bool:
    """Wait until no supervisor holds ``entry``; False if it still does after ``timeout``."""
    with anyio.move_on_after(timeout):
        while entry.is_live():
            await anyio.sleep(0.05)
        return True
    return False


def describe(entry: VmDir) -> VMRow | None:
    """A running VM as `machinen ls --json` shows it; None if it is not up yet."""
    meta = entry.read_meta()
    if meta is None:
        return None
    return {
        "name": meta["name"],
        "pid": meta["supervisor_pid"],
        "qemu_pid": meta["qemu_pid"],
        "accel": meta["accel"],
        "memory_mib": meta["memory_mib"],
        "uptime_s": round(time.time() - meta["started_at"], 1),
        "image": meta["image"],
        "image_source": meta.get("image_source", ""),
        "start": meta.get("start", ""),
        "detached": meta["detached"],
        "forked_from": meta.get("forked_from"),
        "deadline": meta.get("deadline"),
        "lineage": meta.get("lineage", []),
        "restored_from": meta.get("restored_from"),
        "ports": [f"{address}:{host}->{guest}" for address, host, guest in meta.get("ports", [])],
    }


def list_rows() -> list[VMRow]:
    return [row for row in map(describe, live_vms()) if row]
