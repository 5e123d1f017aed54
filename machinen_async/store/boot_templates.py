"""Boot templates, for warm starts: a VM captured right after its agent first answered, before
anything of its caller's ran (workload, mounts, env, ports, commands), and kept in the cache.

A template is a snapshot bundle sealed by this user's machinen (``state``, ``mem``, ``disk.qcow2``
above the image, ``manifest.cbor``) in ``cache/boot-templates/<start key>/``, plus a ``lock`` file
that every VM resumed from it holds (a shared ``flock``, as layers are held), so ``gc`` never
removes one in use.  A warm boot maps ``mem`` copy-on-write (every VM of a key shares its pages
through the page cache, as fork siblings share their template's) and writes a fresh disk layer
on ``disk.qcow2``.

The start key is what a resumed guest cannot change: the kernel, initrd and image by sha256 (the
agent is in the image), the VMM version and how this build lays out a machine, the accelerator,
memory, CPUs and whether it has a network device.  (Not the TSC rate TCG guests are told: it is a
measurement of one fixed host rate, which varies in its last digits, and a resumed kernel keeps
the calibration it booted with.)  A template is checked before every use: every file of its
recorded size, the disk header, the state's and disk's sha256 (small; the RAM file is checked by
size).  One that fails is moved aside and rebuilt, never resumed.  The manifest's MAC is not
asked for: the cache directory is private to this user (as the images it boots are), and a
bundle's key lives in ``$MACHINEN_HOME``, of which one user may have several.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio

from ..errors import MachinenError
from ..protocol.messages import IncomingState, MachineSpec
from . import assets, bundle, layers, paths
from .manifest import Manifest

TEMPLATE_FORMAT = 1
LOCK = "lock"
BUILD_POLL_S = 0.05  # how often a boot waiting for another's template build looks again
PARTIAL_GRACE_S = 3600.0  # a template being captured this recently may still be in the making
UNUSED_FOR_S = 7 * 86400.0  # `gc` removes a template no boot resumed from for this long


@dataclass(frozen=True)
class BootTemplate:
    path: Path
    manifest: Manifest

    def incoming(self, image: str) -> IncomingState:
        """How a VM resumes from it, on the image ``image`` it was taken on."""
        return IncomingState(
            chain=[[str(self.path / bundle.DISK), "qcow2"], [image, "raw"]],
            disk_size=self.manifest.machine.disk_size,
            holds=[str(self.path)],
            ram_in_state=False,
            source=None,
            state=str(self.path / bundle.STATE),
            mem=str(self.path / bundle.MEM),
        )


def templates_dir() -> Path:
    return paths.private_dir(paths.private_dir(paths.cache_dir()) / "boot-templates")


def start_key(machine: MachineSpec, vmm_version: str) -> str:
    """What a template must have been taken on for ``machine`` to resume from it (``vmm_version``:
    the VMM's version and this build's launch recipe)."""
    parts = [
        TEMPLATE_FORMAT,
        *(assets.immutable_file_digest(Path(path)) for path in (machine.kernel, machine.initrd, machine.image)),
        vmm_version, machine.accel, machine.memory_mib, machine.cpus, machine.network,
    ]  # fmt: skip
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def find(key: str) -> BootTemplate | None:
    """The template of ``key`` if there is one that passes its checks (one that fails is discarded)."""
    path = templates_dir() / key
    if not path.is_dir():
        return None
    try:
        manifest = bundle.inspect(path, trust=True).manifest
        if manifest.ram_in_state or not (path / LOCK).is_file():
            raise MachinenError("incomplete", code="SNAPSHOT_CORRUPT")
        for name in (bundle.STATE, bundle.DISK):
            if assets.sha256_file(path / name) != manifest.files[name].sha256:
                raise MachinenError(f"{name} does not match its hash", code="SNAPSHOT_CORRUPT")
    except (MachinenError, OSError):
        discard(path)
        return None
    with contextlib.suppress(OSError):
        os.utime(path / LOCK)  # last used: what `gc` goes by
    return BootTemplate(path, manifest)


def discard(path: Path) -> None:
    """Move a template out of the way (VMs resumed from it keep their open files), then remove it
    unless one still holds it (``collect_unused`` does later)."""
    aside = path.with_name(f".discarded-{secrets.token_hex(6)}")
    with contextlib.suppress(FileNotFoundError):
        path.rename(aside)
        _remove_unheld(aside)


def _remove_unheld(path: Path, *, dry_run: bool = False) -> bool:
    """As ``layers.remove_unheld``; a directory that never got its lock (a capture that did not
    finish) cannot be held by anyone, so it goes too."""
    if not (path / LOCK).exists():
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
        return True
    return layers.remove_unheld(path, dry_run=dry_run)


def new_partial() -> Path:
    """An empty directory for a template being captured (``publish`` puts it in place)."""
    partial = templates_dir() / f".partial-{secrets.token_hex(8)}"
    partial.mkdir(mode=0o700)
    return partial


def publish(partial: Path, key: str) -> bool:
    """Make the captured ``partial`` the template of ``key``; False (nothing published) if the
    capture did not complete (the supervisor logs why; the boot itself went on)."""
    try:
        bundle.inspect(partial, trust=True)
        os.close(paths.create_file(partial / LOCK))
        partial.rename(templates_dir() / key)
    except (MachinenError, OSError):
        return False
    return True


def remove_partial(partial: Path) -> None:
    shutil.rmtree(partial, ignore_errors=True)


@contextlib.asynccontextmanager
async def building(key: str) -> AsyncIterator[None]:
    """Exclusive right to build the template of ``key``, among processes and tasks alike (each
    waiter has its own open file): N concurrent first boots build one template."""
    # Opened, never replaced: every waiter must lock the same inode (the directory is ours alone).
    fd = os.open(templates_dir() / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await anyio.sleep(BUILD_POLL_S)
        yield
    finally:
        os.close(fd)


def collect_unused(*, dry_run: bool = False) -> list[Path]:
    """Templates nothing holds and that no boot used for ``UNUSED_FOR_S`` or none can use any more
    (their kernel, initrd or image is gone from the cache, or they were discarded or never
    finished): what was (or would be) removed."""
    root = templates_dir()
    removed = []
    for path in sorted(root.iterdir()):
        if path.suffix == ".lock" and not path.with_suffix("").exists():  # a build lock of a key with no template
            if layers.unlink_unheld(path, dry_run=dry_run):  # a late waiter locks a file no one else will
                removed.append(path)
            continue
        if not path.is_dir() or (not path.name.startswith(".") and _usable(path)):
            continue
        if path.name.startswith(".partial-") and time.time() - path.stat().st_mtime < PARTIAL_GRACE_S:
            continue
        if _remove_unheld(path, dry_run=dry_run):
            removed.append(path)
    return removed


def _usable(path: Path) -> bool:
    try:
        if time.time() - (path / LOCK).stat().st_mtime > UNUSED_FOR_S:
            return False
        manifest = bundle.inspect(path, trust=True).manifest
    except (MachinenError, OSError):
        return False
    return (
        assets.find_image(manifest.image.key, manifest.image.sha256) is not None
        and all(assets.find_boot_file(boot_file.sha256) is not None for boot_file in (manifest.kernel, manifest.initrd))
    )  # fmt: skip
