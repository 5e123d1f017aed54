"""``Mount``: a host directory in the guest -- live (served on every access) or copied in at boot."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from ..errors import BootError, plain_errors
from ..protocol.guest_abi import ROOT_USER
from ..protocol.messages import MountBinding

if TYPE_CHECKING:
    from .vm import VM

ERROR_TAIL_BYTES = 2000
# Guest paths a mount may not cover: the system, and the agent's own files.
RESERVED_PREFIX = "/usr/lib/machinen"
RESERVED = ("/", "/proc", "/sys", "/dev", "/run", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/boot")


@dataclass(frozen=True)
class Mount:
    """``host`` (a directory) at ``guest`` (an absolute path).  ``live``: the guest works on the host's
    files themselves, both ways, at once; else they are copied in at boot.  ``read_only`` is enforced
    on the host side."""

    host: str
    guest: str
    live: bool = False
    read_only: bool = False

    @classmethod
    def drop(cls, guest: str) -> Mount:
        """For ``fork``/``restore``/``handoff``: unmount the live mount at ``guest`` in the new VM
        (what is open there then fails with ENOTCONN instead of waiting)."""
        return cls("", guest, live=True)

    @classmethod
    def parse(cls, spec: str | Mount, *, live: bool = False) -> Mount:
        """``HOST:GUEST[:ro|rw]`` (or a ``Mount``, returned as it is)."""
        if isinstance(spec, Mount):
            return spec
        if not isinstance(spec, str):
            raise BootError(f"a mount is HOST:GUEST[:ro|rw] or a Mount, not {spec!r:.100}", code="MOUNT_SPEC_INVALID")
        parts = spec.split(":")
        mode = parts.pop() if len(parts) == 3 and parts[-1] in ("ro", "rw") else "rw"
        if len(parts) != 2 or not all(parts):
            raise BootError(f"not a mount: {spec!r} (expected HOST:GUEST[:ro|rw])", code="MOUNT_SPEC_INVALID")
        return cls(parts[0], parts[1], live=live, read_only=mode == "ro")

    def checked(self, *, here: bool = True) -> Mount:
        """This mount with its host directory made absolute (``here``: and there), or a typed error;
        for another host, the directory must be an absolute path of that host."""
        guest = os.path.normpath(self.guest)
        if not self.guest.startswith("/") or "\0" in guest or guest in RESERVED or guest.startswith(RESERVED_PREFIX):
            raise BootError(f"cannot mount over {self.guest!r} in the guest", code="MOUNT_SPEC_INVALID")
        if not self.host:  # a drop
            return Mount("", guest, live=True)
        if not here:
            if not self.host.startswith("/"):
                raise BootError(
                    f"a directory of another host is an absolute path: {self.host!r}", code="MOUNT_SPEC_INVALID"
                )
            return Mount(os.path.normpath(self.host), guest, self.live, self.read_only)
        host = Path(os.path.expanduser(self.host)).resolve()
        if not host.is_dir():
            raise BootError(f"the directory to mount is not there: {host}", code="MOUNT_SOURCE_NOT_FOUND")
        return Mount(str(host), guest, self.live, self.read_only)


def checked_mounts(
    mounts: Sequence[str | Mount] | None, *, live_here: bool = True, resuming: bool = False
) -> list[Mount]:
    """Each mount parsed and checked (its host directory made absolute); one per guest path.  A copied
    one is always a directory of this machine; a live one of the VM's host (``live_here``: this one)."""
    parsed = [Mount.parse(mount) for mount in mounts or ()]
    checked = [mount.checked(here=live_here or not mount.live) for mount in parsed]
    if any(not mount.host for mount in checked) and not resuming:
        raise BootError("Mount.drop() is for fork, restore and handoff", code="MOUNT_SPEC_INVALID")
    targets = [mount.guest for mount in checked]
    if len(set(targets)) != len(targets):
        raise BootError("two mounts at one guest path", code="MOUNT_SPEC_INVALID")
    return checked


def rebinding(mounts: Sequence[str | Mount] | None, *, here: bool = True) -> tuple[MountBinding, ...]:
    """Live mounts that re-bind (or add to) those of a VM resumed from saved state (fork, restore, handoff)."""
    if any(not Mount.parse(mount).live for mount in mounts or ()):
        raise BootError(
            "only live mounts are re-bound (nothing is copied into a running guest)", code="MOUNT_SPEC_INVALID"
        )
    chosen = checked_mounts(mounts, live_here=here, resuming=True)  # a drop is the guest path with host ""
    return live_mounts(chosen)


def live_mounts(mounts: Sequence[Mount]) -> tuple[MountBinding, ...]:
    """The live ones, as a request carries them."""
    return tuple(MountBinding(mount.host, mount.guest, mount.read_only) for mount in mounts if mount.live)


@contextlib.contextmanager
def _stall_guard(mount: Mount, seconds: float) -> Iterator[None]:
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        raise BootError(
            f"the guest stalled copying {mount.host} for {seconds:g} s", code="MOUNT_COPY_STALLED"
        ) from None


async def copy_in(vm: VM, mount: Mount, *, stall_timeout: float) -> None:
    """Copy a host directory into the guest (``tar`` on both sides, streamed: bounded memory).
    A guest that takes nothing for ``stall_timeout`` seconds fails the copy (MOUNT_COPY_STALLED)."""
    # The guest path is an argument, not part of the script: no quoting to get wrong.
    script = 'mkdir -p "$1" && tar -x -C "$1" -f -' + (' && chmod -R a-w "$1"' if mount.read_only else "")
    async with await anyio.open_process(["tar", "-C", mount.host, "-cf", "-", "."], stderr=subprocess.PIPE) as packer:
        packer_errors = bytearray()
        # As root whatever the image's User: the copy is the host's, as `docker cp`'s.
        async with vm.process(["sh", "-c", script, "sh", mount.guest], user=ROOT_USER) as unpacker:
            errors = bytearray()

            async def keep_tail(stream: anyio.abc.ByteReceiveStream, into: bytearray) -> None:
                async for chunk in stream:  # drained as it comes, only its end kept: whatever is printed
                    into += chunk
                    del into[:-ERROR_TAIL_BYTES]

            with plain_errors():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(keep_tail, unpacker.stderr, errors)
                    tg.start_soon(keep_tail, packer.stderr, packer_errors)
                    async for data in packer.stdout:
                        with _stall_guard(mount, stall_timeout):
                            await unpacker.stdin.send(data)
                    await unpacker.stdin.aclose()
            with _stall_guard(mount, stall_timeout):
                status = await unpacker.wait()
            if status != 0:
                raise BootError(f"copying {mount.host} into {mount.guest} failed: {errors.decode(errors='replace')}",
                                code="MOUNT_COPY_FAILED")  # fmt: skip
        if await packer.wait() != 0:
            raise BootError(
                f"reading {mount.host} failed: {packer_errors.decode(errors='replace')}", code="MOUNT_COPY_FAILED"
            )
