"""This machine as a host: start VMs from configs, bundles and fork templates; find and stop them.

The peer process (``machinen _peer``) serves this same driver to other
hosts, so a VM restored here over SSH starts exactly as a local one does.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import resource
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio

from ..errors import BootError, MachinenError, SnapshotError, plain_errors
from ..protocol.messages import (
    BootRequest,
    ForkRequest,
    ForkTemplate,
    HostFacts,
    IncomingState,
    MachineSpec,
    RestoreRequest,
    VMRow,
)
from ..protocol.mounts import MountEntry
from ..protocol.netpolicy import NetworkPolicy
from ..store import assets, bundle, layers, oci_image, registry
from ..store.manifest import Manifest, files_to_map
from ..supervisor.config import Lifetime, SupervisorConfig, deadline_of
from ..version import __version__
from ..vmm import backend
from . import transfer
from .base import PEER_PROTOCOL, Connection, HostDriver, Progress, TransferReport, close_connections, open_connection
from .booting import available_memory_mib, boot_here
from .supervisors import (
    SUPERVISOR_KILL_GRACE_S,
    SUPERVISOR_STOP_GRACE_S,
    await_supervisor,
    new_ram_dir,
    start_supervisor,
    start_supervisors,
)

# Fork back-pressure estimate per sibling: QEMU's own memory (under TCG its translation
# cache, capped at 64 MiB, and ~30 MiB of heap: an idle sibling measures 57-70 MiB PSS)
# plus the share of guest RAM a busy sibling typically dirties; refuse when that exceeds
# this share of MemAvailable.
FORK_OVERHEAD_MIB = {"tcg": 96, "kvm": 48}
FORK_PRIVATE_SHARE = 0.25
FORK_MEMORY_HEADROOM = 0.9
# What this process holds per VM it starts and owns (three pipes while it starts, then the
# lifeline, status and stderr pipes, a pidfd and the supervisor connection), with room to spare.
DESCRIPTORS_PER_VM = 8


def host_facts() -> HostFacts:
    """What a client needs to decide whether and how much to place here."""
    return {
        "version": __version__,
        "protocol": PEER_PROTOCOL,
        "arch": platform.machine(),
        "qemu_version": backend.default().installed_version(),
        "accel": backend.default().choose_accelerator(None),
        "cpus": os.cpu_count() or 1,
        "load_1m": os.getloadavg()[0],
        "mem_available_mib": available_memory_mib(),
        "vms": len(registry.live_vms()),
        "pid": os.getpid(),
    }


def sibling_cost_mib(accel: str, memory_mib: int) -> float:
    """Host memory one more sibling takes: the VMM's overhead and the share of guest RAM it
    copies on write (siblings on every host map one template of the fork instant)."""
    return FORK_OVERHEAD_MIB.get(accel, FORK_OVERHEAD_MIB["tcg"]) + memory_mib * FORK_PRIVATE_SHARE


def check_fork_memory(count: int, accel: str, memory_mib: int) -> None:
    """Refuse a fork the host cannot hold rather than let the OOM killer pick."""
    per_sibling = sibling_cost_mib(accel, memory_mib)
    needed = count * per_sibling + memory_mib  # + the template's RAM copy
    available = available_memory_mib()
    if needed > available * FORK_MEMORY_HEADROOM:
        raise MachinenError(
            f"forking {count} siblings needs about {needed:.0f} MiB but {available} MiB is available",
            code="FORK_MEMORY_BACKPRESSURE",
            retryable=True,
        )


def ensure_descriptors_for(count: int) -> None:
    """Make room in this process's open-file limit for ``count`` more VMs, raising the soft limit
    toward the hard one if needed (distributions default to a soft 1024: ~200 siblings)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = len(os.listdir("/proc/self/fd")) + count * DESCRIPTORS_PER_VM
    if needed <= soft:
        return
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise MachinenError(
            f"{count} more VMs need about {needed} open files here but the limit is {hard} (ulimit -Hn)",
            code="FORK_FILE_LIMIT",
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def _start_siblings(
    names: list[str],
    machine: MachineSpec,
    incoming: IncomingState,
    boot_timeout: float,
    detached: bool,
    ports: list[list],
    mounts: list[list],
    unmounts: list[str],
    lifetime: Lifetime,
) -> list[Connection]:
    """One VM per name, all resumed from the same ``incoming`` state, started at once, with live
    ``mounts`` and the guest paths of the state's mounts to drop (``unmounts``)."""
    ensure_descriptors_for(len(names))
    siblings: list[Connection | None] = [None] * len(names)
    try:
        configs = [
            SupervisorConfig(
                name=name,
                ram_dir=new_ram_dir(name),
                boot_timeout=boot_timeout,
                detached=detached,
                ports=ports,
                incoming=incoming,
                machine=machine,
                mounts=mounts,
                unmounts=unmounts,
                deadline=deadline_of(lifetime.ttl),
                idle_timeout=lifetime.idle_timeout,
                on_idle=lifetime.on_idle,
            )
            for name in names
        ]
        owners = await start_supervisors(configs)

        async def start(index: int) -> None:
            siblings[index] = await await_supervisor(configs[index], owners[index])

        try:
            with plain_errors():
                async with anyio.create_task_group() as tg:
                    for index in range(len(configs)):
                        tg.start_soon(start, index)
        except BaseException:
            with anyio.CancelScope(shield=True):  # the ones that never became VMs
                async with anyio.create_task_group() as tg:
                    for owner, sibling in zip(owners, siblings, strict=True):
                        if sibling is None:
                            tg.start_soon(owner.shutdown)
            raise
    except BaseException:
        await close_connections(siblings)
        raise
    return siblings  # type: ignore[return-value]  # all set once the task group ends


async def _restore_plan(
    bundle_dir: Path,
    image: str | os.PathLike[str] | None,
    accel: str | None,
    report: Callable[[str], None],
    trust: bool,
    network_policy: NetworkPolicy,
) -> tuple[bundle.Checked, MachineSpec]:
    """Verify a bundle and find what it runs on: (its manifest, the machine of the VMs restored from it)."""
    checked = await anyio.to_thread.run_sync(functools.partial(bundle.inspect, bundle_dir, trust=trust))
    manifest = checked.manifest
    machine = manifest.machine
    vmm = backend.default()
    chosen_accel = vmm.choose_accelerator(accel)
    if machine.type != vmm.machine_type or machine.accel != chosen_accel:
        raise SnapshotError(
            f"bundle is for {machine.type}/{machine.accel}, this host runs {vmm.machine_type}/{chosen_accel}",
            code="SNAPSHOT_INCOMPATIBLE",
        )
    local_qemu = vmm.installed_version()
    if manifest.qemu_version != local_qemu:
        raise SnapshotError(
            f"bundle was taken with QEMU {manifest.qemu_version}, this host has {local_qemu}",
            code="SNAPSHOT_INCOMPATIBLE",
        )

    def locate_assets() -> tuple[Path, Path, Path]:
        """Kernel, initrd and image of the bundle, found by content (a path from the
        manifest is only ever quoted in an error): received ones first, then this
        host's own build."""

        def boot_files() -> dict[str, Path | None]:
            return {"kernel": assets.find_boot_file(manifest.kernel.sha256),
                    "initrd": assets.find_boot_file(manifest.initrd.sha256)}  # fmt: skip

        found_boot_files = boot_files()
        base = None
        if None in found_boot_files.values():
            base = assets.ensure_base(report)  # build this host's own, then look again
            found_boot_files = boot_files()
        for key, path in found_boot_files.items():
            if path is None:
                raise SnapshotError(f"the bundle's {key} differs from this host's", code="SNAPSHOT_INCOMPATIBLE")
        wanted, digest = manifest.image.key, manifest.image.sha256
        if image is not None:
            tarball = oci_image.rootfs_of(image, report).tarball
            if assets.image_key(tarball) != wanted:
                raise SnapshotError(
                    f"{tarball} is not the image this bundle was taken on", code="SNAPSHOT_INCOMPATIBLE"
                )
            built = assets.image_for(tarball, report)
            if digest is not None and assets.immutable_file_digest(built) != digest:
                raise SnapshotError(
                    f"the image built here from {tarball} is not byte-identical to the one the bundle was taken "
                    "on (every ext4 build differs) and its disk only fits that one: move bundles between hosts "
                    "with `machinen push` or `handoff`, which send the image",
                    code="SNAPSHOT_INCOMPATIBLE",
                )
            return found_boot_files["kernel"], found_boot_files["initrd"], built
        found = assets.find_image(wanted, digest)
        if found is None and digest is None:
            base = base or assets.ensure_base(report)
            if assets.image_key(base.rootfs_tarball) == wanted:
                found = assets.image_for(base.rootfs_tarball, report)
        if found is None:
            raise BootError(
                f"the image this bundle was taken on ({manifest.image.source or 'unknown'}) is not "
                "here: restore it on the host it was taken on, or send it along with `machinen push`",
                code="BOOT_IMAGE_NOT_FOUND",
            )
        return found_boot_files["kernel"], found_boot_files["initrd"], found

    kernel, initrd, disk_image = await anyio.to_thread.run_sync(locate_assets)
    spec = MachineSpec(
        memory_mib=machine.memory_mib,
        cpus=machine.cpus,
        accel=chosen_accel,
        kernel=str(kernel),
        initrd=str(initrd),
        image=str(disk_image),
        image_source=manifest.image.source,
        image_key=manifest.image.key,
        tsc_khz=machine.tsc_khz,
        network=machine.network,
        network_policy=network_policy,
    )
    return checked, spec


def rebind(
    recorded: Sequence[MountEntry],
    given: Sequence[MountEntry],
    *,
    recorded_here: bool,
    elsewhere: str = "they are directories of the host it was taken on",
) -> tuple[list[MountEntry], list[str]]:
    """The live mounts of a VM resumed from saved state, and the guest paths to unmount in it: each of
    the ``recorded`` mounts at the directory ``given`` for its guest path (``""``: dropped), else where
    it was (if ``recorded_here``: its path means something on this machine); plus new ones ``given``.
    A recorded mount neither given nor ``recorded_here`` (``elsewhere`` says why not), or a directory
    that is not there, is MOUNT_SOURCE_NOT_FOUND."""
    by_guest = {guest: [host, guest, read_only] for host, guest, read_only in given}
    unbound = [(host, guest) for host, guest, _ in recorded if guest not in by_guest]
    if unbound and not recorded_here:
        raise BootError(
            "the VM had live mounts that are not bound here: "
            + ", ".join(f"{guest} (recorded from {host})" for host, guest in unbound)
            + f"; {elsewhere}: pass mounts= naming each guest path, Mount(DIR, {unbound[0][1]!r}, live=True) "
            f"to bind a directory of this host or Mount.drop({unbound[0][1]!r}) to unmount it",
            code="MOUNT_SOURCE_NOT_FOUND",
        )
    bound, dropped = [], []
    for host, guest, read_only in recorded:
        chosen = by_guest.pop(guest, None)
        if chosen is not None and not chosen[0]:
            dropped.append(guest)
            continue
        if chosen is None:
            chosen = [host, guest, read_only]
        if not Path(chosen[0]).is_dir():
            raise BootError(
                f"the directory of the live mount at {guest} is not there: {chosen[0]} "
                "(pass mounts= to bind another one)",
                code="MOUNT_SOURCE_NOT_FOUND",
            )
        bound.append(chosen)
    return bound + [mount for mount in by_guest.values() if mount[0]], dropped


async def _restore_one(
    bundle_dir: Path, manifest: Manifest, machine: MachineSpec, name: str, ports: list[list], detached: bool,
    boot_timeout: float, mounts: list[list], unmounts: list[str], lifetime: Lifetime,
) -> Connection:  # fmt: skip
    registry.ensure_free(name)
    config = SupervisorConfig(
        name=name,
        ram_dir=new_ram_dir(name),
        boot_timeout=boot_timeout,
        detached=detached,
        ports=ports,
        incoming=IncomingState(
            chain=[[machine.image, "raw"]],
            disk_size=manifest.machine.disk_size,
            holds=[],
            ram_in_state=manifest.ram_in_state,
            source=manifest.source,
            bundle=str(bundle_dir),
            files=files_to_map(manifest.files),
            lineage=manifest.restored_lineage,
            restored_from=str(bundle_dir),
            secrets=manifest.secrets,
        ),
        machine=machine,
        mounts=mounts,
        unmounts=unmounts,
        deadline=deadline_of(lifetime.ttl),
        idle_timeout=lifetime.idle_timeout,
        on_idle=lifetime.on_idle,
    )
    return await start_supervisor(config)


async def _restore_siblings(
    bundle_dir: Path,
    manifest: Manifest,
    machine: MachineSpec,
    names: Sequence[str],
    boot_timeout: float,
    detached: bool,
    mounts: list[list],
    unmounts: list[str],
    lifetime: Lifetime,
) -> list[Connection]:
    """Several VMs from one bundle sharing its RAM copy-on-write, as fork siblings do.

    The bundle's RAM and disk are copied once into a fork template and a
    frozen layer (the bundle stays untouched); every sibling maps the
    template privately and writes its own layer on top.
    """
    if manifest.ram_in_state:
        raise SnapshotError(
            "this bundle carries its RAM inside the device state (a handoff wrote it, or an older snapshot of a "
            "fork): restore it once, then fork that VM",
            code="SNAPSHOT_RAM_IN_STATE",
        )
    for name in names:
        registry.ensure_free(name)
    check_fork_memory(len(names), machine.accel, machine.memory_mib)
    template, template_ref = layers.new_template()
    layer, layer_ref = layers.new_layer()
    try:
        for source, target in (
            (bundle.MEM, template.mem), (bundle.STATE, template.state), (bundle.DISK, layer.disk)
        ):  # fmt: skip
            await anyio.to_thread.run_sync(bundle.copy_verified, bundle_dir / source, target, manifest.files[source])
        incoming = IncomingState(
            chain=[[str(layer.disk), "qcow2"], [machine.image, "raw"]],
            disk_size=manifest.machine.disk_size,
            holds=[str(template.path), str(layer.path)],
            ram_in_state=False,
            source=manifest.source,
            state=str(template.state),
            mem=str(template.mem),
            lineage=manifest.restored_lineage,
            restored_from=str(bundle_dir),
            secrets=manifest.secrets,
        )
        siblings = await _start_siblings(
            list(names), machine, incoming, boot_timeout, detached, [], mounts, unmounts, lifetime
        )
    finally:
        layers.close_quietly(template_ref)
        layers.close_quietly(layer_ref)
    return siblings


async def stop_or_kill(entry: registry.VmDir) -> str:
    """Wait for a supervisor asked to stop; SIGKILL it if it does not finish in time."""
    if await registry.wait_until_gone(entry, SUPERVISOR_STOP_GRACE_S + 5):
        return "stopped"
    return await _kill(entry)


async def _kill(entry: registry.VmDir) -> str:
    """SIGKILL a VM's supervisor (QEMU follows it) and clear what it left."""
    registry.kill_holder(entry)
    if not await registry.wait_until_gone(entry, SUPERVISOR_KILL_GRACE_S):
        raise MachinenError(f"{entry.name}'s supervisor survived SIGKILL", code="STOP_FAILED")
    registry.clear_leftovers(entry)
    return "killed"


class LocalDriver(HostDriver):
    """This machine."""

    name = "local"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalDriver)  # there is one of this machine

    def __hash__(self) -> int:
        return hash(LocalDriver)

    async def info(self) -> HostFacts:
        return await anyio.to_thread.run_sync(host_facts)

    async def push(self, bundle_dir: Path, *, progress: Progress | None = None, trust: bool = False) -> TransferReport:
        """Nothing moves: a bundle on this machine restores where it is (once verified)."""
        await anyio.to_thread.run_sync(functools.partial(bundle.verify, bundle_dir, trust=trust))
        return TransferReport(str(bundle_dir), bytes_total=0, bytes_sent=0, chunks_total=0, chunks_sent=0, seconds=0.0)

    async def remove_bundle(self, bundle: str) -> None:
        if Path(bundle).parent == transfer.bundles_dir():
            await anyio.to_thread.run_sync(transfer.remove_bundle, bundle)

    async def boot(self, request: BootRequest, *, progress: Progress | None = None) -> Connection:
        return await boot_here(request, progress)

    async def restore(self, request: RestoreRequest, *, progress: Progress | None = None) -> list[Connection]:
        bundle_dir = Path(request.bundle).expanduser().resolve()
        checked, machine = await _restore_plan(
            bundle_dir, request.image, request.accel, progress or (lambda message: None), request.trust,
            request.network_policy,
        )  # fmt: skip
        # A manifest's host directories are bound only if this user's machinen sealed it here: its
        # origin alone is a digest of public facts, and a bundle accepted with trust=True (or received
        # by a push, perhaps of one so accepted) may record any directory of this host.
        manifest = checked.manifest
        given = [mount.to_wire() for mount in request.mounts]
        recorded = [mount.to_wire() for mount in manifest.mounts]
        bound, dropped = rebind(recorded, given, recorded_here=checked.taken_here, elsewhere={
            "sealed": "they are directories of the host it was taken on",
            "received": "it was received by a push, so the host directories it records are not bound",
        }.get(checked.signature, "this user's machinen did not write it (it was accepted with trust=True), "
                                  "so the host directories it records are not bound"))  # fmt: skip
        names = [registry.validate_name(name) for name in request.names]
        timeout, detached = request.boot_timeout, request.detached
        if request.siblings:
            return await _restore_siblings(
                bundle_dir, manifest, machine, names, timeout, detached, bound, dropped, Lifetime.of(request)
            )
        (name,) = names
        ports = [port.to_wire() for port in request.ports]
        return [await _restore_one(
            bundle_dir, manifest, machine, name, ports, detached, timeout, bound, dropped, Lifetime.of(request)
        )]  # fmt: skip

    async def fork(
        self, source: Connection, request: ForkRequest, *, bundle_dir: Path | None = None
    ) -> tuple[list[Connection], ForkTemplate]:
        names = [registry.validate_name(name) for name in request.names]
        for name in names:
            registry.ensure_free(name)
        if names:
            check_fork_memory(len(names), source.info["accel"], source.info["memory_mib"])
        # Checked before the source pauses: a missing directory costs nothing.
        given = [mount.to_wire() for mount in request.mounts]
        bound, dropped = rebind(source.info["mounts"], given, recorded_here=True) if names else ([], [])
        params = {"capture": os.environ.get("MACHINEN_FORK_CAPTURE", "auto")}
        if bundle_dir:
            params["bundle"] = str(bundle_dir)
        reply = await source.channel.call("vm.fork_template", params)
        template = ForkTemplate.from_wire(reply)
        if not names:
            return [], template
        reference = layers.Shared(Path(template.incoming.holds[0])).hold()  # ours until every sibling holds its own
        machine = template.machine
        if request.network_policy is not None:
            machine = dataclasses.replace(machine, network_policy=request.network_policy)
        try:
            siblings = await _start_siblings(
                names, machine, template.incoming, request.boot_timeout, request.detached,
                [port.to_wire() for port in request.ports], bound, dropped, Lifetime.of(request),
            )  # fmt: skip
        finally:
            layers.close_quietly(reference)
        return siblings, template

    async def connect(self, name: str) -> Connection:
        entry = registry.find(name)
        try:
            return await open_connection(entry.supervisor_socket)
        except OSError:
            raise MachinenError(f"VM {name!r} is not accepting connections", code="REGISTRY_VM_NOT_FOUND") from None

    async def list(self) -> list[VMRow]:
        return await anyio.to_thread.run_sync(registry.list_rows)

    async def stop(self, name: str, *, force: bool = False) -> str:
        entry = registry.find(name)
        if force:
            return await _kill(entry)
        connection = await self.connect(name)
        try:
            with anyio.move_on_after(SUPERVISOR_STOP_GRACE_S):
                await connection.channel.call("vm.stop")
        except MachinenError:
            pass  # on its way down, or not answering: either way, waited for or killed below
        finally:
            await connection.channel.aclose()
        return await stop_or_kill(entry)
