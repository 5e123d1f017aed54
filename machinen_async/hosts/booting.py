"""Booting a VM on this machine from a ``BootRequest``: its image found or pulled and made a disk,
its hardware checked against what is free here, and -- a warm start -- this machine's boot
template of its start key resumed instead of the kernel booted.

``LocalDriver.boot`` runs this, so a boot asked for over SSH or through a Ray node's peer is the
same boot as a local one, on the files and templates of the host that runs it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import anyio

from ..errors import BootError
from ..protocol.messages import BootRequest, MachineSpec
from ..store import assets, boot_templates, layers, oci_image, registry
from ..supervisor.config import SupervisorConfig, deadline_of
from ..vmm import backend
from .base import Connection, Progress
from .supervisors import new_ram_dir, start_supervisor


def available_memory_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def check_memory_available(memory_mib: int) -> None:
    available = available_memory_mib()
    if memory_mib > available:
        raise BootError(
            f"{memory_mib} MiB of guest memory requested but only {available} MiB is available on this host",
            code="BOOT_MEMORY_INVALID",
        )


async def boot_here(request: BootRequest, progress: Progress | None = None) -> Connection:
    """Start the VM ``request`` asks for; the connection owns it (closing it stops the VM)."""
    name = registry.validate_name(request.name)
    check_memory_available(request.memory_mib)
    vmm = backend.default()
    accel = vmm.choose_accelerator(request.accel)
    vmm.check_installed()
    report = progress or (lambda message: None)

    def prepare() -> tuple[assets.BaseAssets, oci_image.Rootfs, Path]:
        base = assets.ensure_base(report)
        rootfs = (
            oci_image.rootfs_of(
                request.image, report, pull=request.pull, credentials=request.credentials, insecure=request.insecure
            )
            if request.image is not None
            else oci_image.Rootfs(base.rootfs_tarball, str(base.rootfs_tarball))
        )
        return base, rootfs, assets.image_for(rootfs.tarball, report)

    base, rootfs, disk_image = await anyio.to_thread.run_sync(prepare)
    registry.ensure_free(name)  # fail fast; the supervisor's claim is the real check
    machine = MachineSpec(
        memory_mib=request.memory_mib,
        cpus=request.cpus,
        accel=accel,
        kernel=str(base.kernel),
        initrd=str(base.initrd),
        image=str(disk_image),
        image_source=rootfs.source,
        image_key=disk_image.stem,
        tsc_khz=vmm.host_tsc_khz() if accel == "tcg" else None,
        network=request.network,
        network_policy=request.network_policy,
    )
    config = SupervisorConfig(
        name=name,
        machine=machine,
        ram_dir=new_ram_dir(name),
        boot_timeout=request.boot_timeout,
        detached=request.detached,
        ports=[port.to_wire() for port in request.ports],
        workload=request.workload,
        mounts=[mount.to_wire() for mount in request.mounts],
        start_workload=request.start_workload,
        deadline=deadline_of(request.ttl),
        idle_timeout=request.idle_timeout,
        on_idle=request.on_idle,
    )
    if not request.warm:
        return await start_supervisor(config)
    vmm_version = f"{vmm.installed_version()}|{vmm.launch_recipe()}"
    key = await anyio.to_thread.run_sync(boot_templates.start_key, machine, vmm_version)
    return await _warm_start(config, key)


async def _warm_start(config: SupervisorConfig, key: str) -> Connection:
    """Resume the boot template of ``key``; where there is none yet, boot cold and capture it on
    the way (the first of N concurrent boots does; the others wait, then resume it)."""
    template = await anyio.to_thread.run_sync(boot_templates.find, key)
    if template is None:
        async with boot_templates.building(key):
            template = await anyio.to_thread.run_sync(boot_templates.find, key)
            if template is None:
                return await _boot_capturing(config, key)
    try:
        reference = layers.Shared(template.path).hold()  # until the supervisor holds its own
    except FileNotFoundError:  # collected since: boot as if there had been none
        return await _warm_start(config, key)
    try:
        return await start_supervisor(replace(config, incoming=template.incoming(config.machine.image), warm=True))
    finally:
        layers.close_quietly(reference)


async def _boot_capturing(config: SupervisorConfig, key: str) -> Connection:
    partial = await anyio.to_thread.run_sync(boot_templates.new_partial)
    try:
        return await start_supervisor(replace(config, boot_template=str(partial)))
    finally:
        # Whatever became of the boot (its workload may fail after the capture), a complete
        # template is kept; an incomplete one is not (``publish`` checks).
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(boot_templates.publish, partial, key)
            await anyio.to_thread.run_sync(boot_templates.remove_partial, partial)
