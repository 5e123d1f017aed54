"""Starting VMs on this machine: ``boot()`` (sdk/host.py, as it starts a VM on any host), ``restore()``;
finding them: ``connect()``, ``stop_vm()``."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import overload

from ..hosts.base import DEFAULT_BOOT_TIMEOUT_S
from ..hosts.local import LocalDriver
from ..protocol.messages import PortForward, RestoreRequest
from ..protocol.ports import PortSpec
from .forks import Forks, Launch
from .host import IMAGE_CMD, Host, boot, image_argument, on_idle_argument, restore_names
from .mounts import Mount, rebinding
from .network import NetworkPolicy, Secret, secret_rules
from .vm import VM

__all__ = ["IMAGE_CMD", "boot", "connect", "restore", "stop_vm"]


@overload
def restore(
    bundle_dir: str | os.PathLike[str], *, name: str | None = None, n: None = None, names: None = None,
    image: str | os.PathLike[str] | None = ..., accel: str | None = ..., boot_timeout: float = ..., detached: bool = ...,
    ports: Sequence[PortSpec] | None = ..., progress: Callable[[str], None] | None = ..., trust: bool = ...,
    network: NetworkPolicy | None = ..., mounts: Sequence[str | Mount] | None = ..., ttl: float | None = ...,
    idle_timeout: float | None = ..., on_idle: str | None = ..., secrets: Mapping[str, Secret] | None = ...,
) -> Launch[VM]: ...  # fmt: skip


@overload
def restore(
    bundle_dir: str | os.PathLike[str], *, name: str | None = None, n: int, names: Sequence[str] | None = None,
    image: str | os.PathLike[str] | None = ..., accel: str | None = ..., boot_timeout: float = ..., detached: bool = ...,
    ports: Sequence[PortSpec] | None = ..., progress: Callable[[str], None] | None = ..., trust: bool = ...,
    network: NetworkPolicy | None = ..., mounts: Sequence[str | Mount] | None = ..., ttl: float | None = ...,
    idle_timeout: float | None = ..., on_idle: str | None = ..., secrets: Mapping[str, Secret] | None = ...,
) -> Launch[Forks]: ...  # fmt: skip


@overload
def restore(
    bundle_dir: str | os.PathLike[str], *, name: str | None = None, n: None = None, names: Sequence[str],
    image: str | os.PathLike[str] | None = ..., accel: str | None = ..., boot_timeout: float = ..., detached: bool = ...,
    ports: Sequence[PortSpec] | None = ..., progress: Callable[[str], None] | None = ..., trust: bool = ...,
    network: NetworkPolicy | None = ..., mounts: Sequence[str | Mount] | None = ..., ttl: float | None = ...,
    idle_timeout: float | None = ..., on_idle: str | None = ..., secrets: Mapping[str, Secret] | None = ...,
) -> Launch[Forks]: ...  # fmt: skip


def restore(
    bundle_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    n: int | None = None,
    names: Sequence[str] | None = None,
    image: str | os.PathLike[str] | None = None,
    accel: str | None = None,
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT_S,
    detached: bool = False,
    ports: Sequence[PortSpec] | None = None,
    progress: Callable[[str], None] | None = None,
    trust: bool = False,
    network: NetworkPolicy | None = None,
    mounts: Sequence[str | Mount] | None = None,
    ttl: float | None = None,
    idle_timeout: float | None = None,
    on_idle: str | None = None,
    secrets: Mapping[str, Secret] | None = None,
) -> Launch[VM] | Launch[Forks]:
    """Start a VM from a snapshot bundle, continuing exactly where it was.

    Port forwards and the network policy are not part of a bundle: pass
    ``ports`` and ``network`` (a ``NetworkPolicy``; default:
    ``NetworkPolicy.closed()``, nothing reachable: a bundle may come from
    anywhere) again.  Whether the VM has a network device at all is the bundle's.

    Only bundles this user's machinen wrote or received with ``push`` are
    restored (their manifest carries a MAC under this user's key); another
    one needs ``trust=True``, since QEMU parses its device state
    (SNAPSHOT_UNTRUSTED).  Every file is copied to a private place and checked
    against the manifest's sha256 as it is copied, before QEMU starts, and a
    disk whose header names other files is refused (SNAPSHOT_DISK_UNSAFE);
    a bundle from another QEMU version or accelerator is refused
    (SNAPSHOT_INCOMPATIBLE).  It runs on the exact image it was taken on,
    found by sha256; ``image`` (the rootfs tarball) helps only where building
    it gives that same file (the cached one: every ext4 build differs).  The
    bundle is never modified, so it can be restored any number of times.

    With ``n`` (or ``names``) several siblings start from the bundle at once,
    like ``vm.fork(n=...)``, and share its RAM copy-on-write: the result is
    ``Forks``.

    Live mounts come back bound to the directories ``mounts`` gives for
    their guest paths, else to the ones they had (when your machinen sealed
    the bundle on this machine; a bundle accepted with ``trust=True`` or
    received by a push binds only what ``mounts`` names); a live mount left
    unbound or a directory that is not there is MOUNT_SOURCE_NOT_FOUND.
    ``mounts`` may also add live mounts.  ``ttl``, ``idle_timeout``, ``on_idle``: each VM's
    lifetime in seconds, and without calls, and what happens then (see ``boot``).

    A bundle keeps no secret's value, only its name, hosts and the placeholder its guest holds:
    ``secrets`` (as ``boot`` takes them) gives the values again, each bound to the placeholder the
    bundle recorded under its name (a new name gets a new one, in the environment of later
    commands); the guest trusts a new CA.  ``network`` must let the guest reach their hosts.
    """
    chosen, siblings = restore_names(name, n, names)
    request = RestoreRequest(
        bundle=str(bundle_dir), names=tuple(chosen), siblings=siblings, ports=PortForward.all_of(ports),
        detached=detached, boot_timeout=boot_timeout, mounts=rebinding(mounts),
        image=image_argument(image, here=True), accel=accel, trust=trust, network_policy=network if network is not None else NetworkPolicy.closed(),
        ttl=ttl,
        idle_timeout=idle_timeout,
        on_idle=on_idle_argument(on_idle, here=True),
    )  # fmt: skip
    return Host.local().start_restore(request, progress=progress, secrets=secret_rules(secrets))


async def stop_vm(name: str, *, force: bool = False) -> str:
    """Stop VM ``name`` of this host, whoever started it; ``force`` SIGKILLs it.

    Returns how it went: "stopped", or "killed" when it had to be SIGKILLed
    (forced, or its supervisor did not finish a clean stop in time); raises
    STOP_FAILED if it is still there after that."""
    return await LocalDriver().stop(name, force=force)


@asynccontextmanager
async def connect(name: str) -> AsyncIterator[VM]:
    """Attach to a running VM by name; leaving the block only disconnects."""
    async with Host.local().connect(name) as vm:
        yield vm
