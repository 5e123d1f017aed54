"""Starting VMs on this machine: ``boot()``, ``restore()``; finding them: ``connect()``, ``stop_vm()``."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio

from ..errors import BootError
from ..hosts.base import DEFAULT_BOOT_TIMEOUT_S, Connection
from ..hosts.local import LocalDriver, available_memory_mib
from ..hosts.supervisors import new_ram_dir
from ..protocol.messages import MachineSpec
from ..protocol.ports import PortSpec, parse_port_forwards
from ..store import assets, boot_templates, layers, oci_image, registry
from ..supervisor.config import SupervisorConfig, check_workload_started
from ..vmm import backend
from .forks import Forks
from .host import Host, Launch, restore_names
from .mounts import Mount, checked_mounts, copy_in, live_mounts, rebinding
from .network import NetworkPolicy, network_settings
from .process import Command, argv_of
from .vm import VM

MIN_MEMORY_MIB = 64
IMAGE_CMD = "image"  # boot(cmd="image"): an OCI image's Entrypoint + Cmd as the workload


def _validate_memory(memory_mib: Any) -> int:
    if not isinstance(memory_mib, int) or isinstance(memory_mib, bool) or memory_mib < MIN_MEMORY_MIB:
        raise BootError(
            f"memory must be an integer >= {MIN_MEMORY_MIB} MiB, got {memory_mib!r}", code="BOOT_MEMORY_INVALID"
        )
    available = available_memory_mib()
    if memory_mib > available:
        raise BootError(
            f"{memory_mib} MiB of guest memory requested but only {available} MiB is available on this host",
            code="BOOT_MEMORY_INVALID",
        )
    return memory_mib


async def _launch(
    image: str | os.PathLike | None,
    *,
    pull: str,
    credentials: tuple[str, str] | None,
    insecure: Sequence[str],
    name: str | None,
    memory_mib: int,
    cpus: int,
    accel: str | None,
    boot_timeout: float,
    detached: bool,
    ports: Sequence[PortSpec] | None,
    network: bool | NetworkPolicy,
    workload: dict[str, Any] | None,
    mounts: Sequence[str | Mount] | None,
    progress: Callable[[str], None] | None,
    warm: bool,
) -> VM:
    name = registry.validate_name(name) if name is not None else registry.new_name()
    forwards = parse_port_forwards(ports)
    chosen_mounts = checked_mounts(mounts)
    copies = [mount for mount in chosen_mounts if not mount.live]
    has_network, network_allow = network_settings(network)
    memory_mib = _validate_memory(memory_mib)
    vmm = backend.default()
    chosen_accel = vmm.choose_accelerator(accel)
    vmm.check_installed()
    report = progress or (lambda message: None)

    def prepare() -> tuple[assets.BaseAssets, oci_image.Rootfs, Path]:
        base = assets.ensure_base(report)
        rootfs = (
            oci_image.rootfs_of(image, report, pull=pull, credentials=credentials, insecure=insecure)
            if image is not None
            else oci_image.Rootfs(base.rootfs_tarball, str(base.rootfs_tarball))
        )
        return base, rootfs, assets.image_for(rootfs.tarball, report)

    base, rootfs, disk_image = await anyio.to_thread.run_sync(prepare)
    registry.ensure_free(name)  # fail fast; the supervisor's claim is the real check
    machine = MachineSpec(
        memory_mib=memory_mib,
        cpus=cpus,
        accel=chosen_accel,
        kernel=str(base.kernel),
        initrd=str(base.initrd),
        image=str(disk_image),
        image_source=rootfs.source,
        image_key=disk_image.stem,
        tsc_khz=vmm.host_tsc_khz() if chosen_accel == "tcg" else None,
        network=has_network,
        network_allow=tuple(network_allow),
    )
    config = SupervisorConfig(
        name=name,
        machine=machine,
        ram_dir=new_ram_dir(name),
        boot_timeout=boot_timeout,
        detached=detached,
        ports=forwards,
        workload=workload,
        mounts=live_mounts(chosen_mounts),
        start_workload=not copies,
    )
    if warm:
        vmm_version = f"{vmm.installed_version()}|{vmm.launch_recipe()}"
        key = await anyio.to_thread.run_sync(boot_templates.start_key, machine, vmm_version)
        connection = await _warm_start(config, key)
    else:
        connection = await LocalDriver().boot(config)
    vm = Host.local().vm(connection)
    try:
        if not config.start_workload:  # the copies first, so the workload finds them
            for mount in copies:
                await copy_in(vm, mount, stall_timeout=boot_timeout)
            check_workload_started(await vm.connection.channel.call("workload_start", workload or {"from_image": True}))
    except BaseException:
        await vm.aclose()
        raise
    return vm


async def _warm_start(config: SupervisorConfig, key: str) -> Connection:
    """Resume the boot template of ``key``; where there is none yet, boot cold and capture it on
    the way (the first of N concurrent boots does; the others wait, then resume it)."""
    driver = LocalDriver()
    template = await anyio.to_thread.run_sync(boot_templates.find, key)
    if template is None:
        async with boot_templates.building(key):
            template = await anyio.to_thread.run_sync(boot_templates.find, key)
            if template is None:
                return await _boot_capturing(driver, config, key)
    try:
        reference = layers.Shared(template.path).hold()  # until the supervisor holds its own
    except FileNotFoundError:  # collected since: boot as if there had been none
        return await _warm_start(config, key)
    try:
        return await driver.boot(replace(config, incoming=template.incoming(config.machine.image), warm=True))
    finally:
        layers.close_quietly(reference)


async def _boot_capturing(driver: LocalDriver, config: SupervisorConfig, key: str) -> Connection:
    partial = await anyio.to_thread.run_sync(boot_templates.new_partial)
    try:
        return await driver.boot(replace(config, boot_template=str(partial)))
    finally:
        # Whatever became of the boot (its workload may fail after the capture), a complete
        # template is kept; an incomplete one is not (``publish`` checks).
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(boot_templates.publish, partial, key)
            await anyio.to_thread.run_sync(boot_templates.remove_partial, partial)


def _workload(cmd: Command | None, env: Mapping[str, str] | None, cwd: str | None) -> dict[str, Any] | None:
    if cmd is None:
        return None
    if cmd == IMAGE_CMD:
        return {"image_cmd": True}
    return {"cmd": argv_of(cmd), "env": dict(env or {}), "cwd": cwd}


def boot(
    image: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    memory_mib: int = 256,
    cpus: int = 1,
    accel: str | None = None,
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT_S,
    detached: bool = False,
    ports: Sequence[PortSpec] | None = None,
    network: bool | NetworkPolicy = True,
    cmd: Command | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    mounts: Sequence[str | Mount] | None = None,
    progress: Callable[[str], None] | None = None,
    pull: str = "missing",
    credentials: tuple[str, str] | None = None,
    insecure: Sequence[str] = (),
    warm: bool = True,
) -> Launch:
    """Boot a microVM from ``image``: a rootfs tarball, or an OCI / Docker image reference
    (``"python:3.12-slim"``, ``"localhost:5000/team/agent@sha256:..."``, ``"oci:./layout:tag"``,
    ``"docker-archive:./image.tar"``; see ``rootfs_of``); default: the Debian base.  An OCI
    image needs nothing inside it (the agent brings its own interpreter); its Env, WorkingDir
    and User are the defaults of every command.  ``pull``: "missing" (default: a cached
    reference boots without asking the registry), "always" (ask what the tag names now) or
    "never"; ``credentials``: (user, password) for the registry, else ``~/.docker/config.json``;
    ``insecure``: registries reached over plain HTTP (``"host:port"``, ``"host"`` or a network
    such as ``"10.0.0.0/8"``; loopback ones always are), as Docker's ``insecure-registries``.

    ``warm`` (default): resume the boot template of this start key (image, kernel, memory, CPUs,
    network device...), which the key's first boot captured as soon as its agent answered; the
    VM gets its own hostname, machine-id, entropy and clock, then everything below applies as on
    a cold boot (``describe()["start"]`` says which it was).  False always boots the kernel.

    The VM runs ``cmd`` (or else the image's default cmd, see ``provision``)
    as its supervised workload: output in /var/log/machinen/workload.log,
    restarted after a non-zero exit.  ``cmd="image"``: an OCI image's
    Entrypoint + Cmd (never by default: a sandbox image's CMD is often a shell).

    ``accel``: "kvm", "tcg" or "auto" (default, also $MACHINEN_ACCEL).  With
    ``detached`` the VM outlives this process; reach it with ``connect(name)``.
    ``ports``: host -> guest TCP forwards, ``["3000:3000", "0.0.0.0:8080:80",
    (5432, 5432)]`` (loopback unless an address is given); they tunnel through
    the guest agent, so they need no guest network.  ``network``: outbound
    access (QEMU user-mode NAT, DNS included, nothing inbound) with the host
    closed (its loopback, its addresses, link-local: see ``NetworkPolicy``,
    which reopens chosen destinations); False boots with no network device
    at all.  Fork siblings keep their source's policy.  ``mounts``: host
    directories in the guest, ``Mount(host, guest, live=True)`` or
    ``"HOST:GUEST[:ro|rw]"`` (copied in at boot); live ones are the host's
    files themselves, both ways, and fork siblings keep them (see ``Mount``).
    """
    return Launch(
        lambda: _launch(
            image,
            pull=pull,
            credentials=credentials,
            insecure=insecure,
            name=name,
            memory_mib=memory_mib,
            cpus=cpus,
            accel=accel,
            boot_timeout=boot_timeout,
            detached=detached,
            ports=ports,
            network=network,
            workload=_workload(cmd, env, cwd),
            mounts=mounts,
            progress=progress,
            warm=warm,
        )
    )


def restore(
    bundle_dir: str | os.PathLike,
    *,
    name: str | None = None,
    n: int | None = None,
    names: Sequence[str] | None = None,
    image: str | os.PathLike | None = None,
    accel: str | None = None,
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT_S,
    detached: bool = False,
    ports: Sequence[PortSpec] | None = None,
    progress: Callable[[str], None] | None = None,
    trust: bool = False,
    network: NetworkPolicy | None = None,
    mounts: Sequence[str | Mount] | None = None,
) -> Launch:
    """Start a VM from a snapshot bundle, continuing exactly where it was.

    Port forwards and the network policy are not part of a bundle: pass
    ``ports`` and ``network`` (a ``NetworkPolicy``; default: the host closed)
    again.  Whether the VM has a network device at all is the bundle's.

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
    ``mounts`` may also add live mounts.
    """
    forwards = parse_port_forwards(ports)
    bound = rebinding(mounts)
    chosen, siblings = restore_names(name, n, names, forwards)
    local = Host.local()

    async def start() -> VM | Forks:
        started = await local.driver.restore(
            str(bundle_dir), chosen, siblings=siblings, ports=forwards, detached=detached, boot_timeout=boot_timeout,
            image=image, accel=accel, progress=progress, trust=trust,
            network_allow=list(network.allow) if network is not None else [], mounts=bound,
        )  # fmt: skip
        vms = [local.vm(connection) for connection in started]
        return Forks(vms) if siblings else vms[0]

    return Launch(start)


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
