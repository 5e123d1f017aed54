"""This VM's disk chain, RAM and VMM, and capturing them: fork templates and snapshot bundles."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from ..errors import BootError, ForkError, MachinenError, SnapshotError, plain_errors
from ..protocol.messages import ForkTemplate, IncomingState, MountBinding, descend
from ..protocol.secret import SecretSlot
from ..store import bundle, layers, manifest, registry, sparse
from ..store.assets import immutable_file_digest
from ..vmm import backend, capped_log
from .config import SupervisorConfig
from .relay import ClientConnection

log: structlog.typing.FilteringBoundLogger = structlog.get_logger("machinen.supervisor")

# A fork template stays referenced by its source this long after the fork
# call returned, so the caller can take its own reference first.
TEMPLATE_HANDOVER_S = 120.0
CAPTURE_MODES = ("auto", "copy", "stream")
# ``auto`` streams a VM's own RAM file from this much touched, and this share of its RAM.  Copying
# 384 MiB while stopped takes ~100 ms here (tmpfs, ~4 GB/s), as long as the rest of the pause; a
# smaller copy is cheaper than a stream, which reads all of the RAM (+0.3 s of fork wall per 256 MiB).
STREAM_MIN_TOUCHED = 384 * 2**20
STREAM_MIN_TOUCHED_SHARE = 0.5


class StepTimer:
    """Milliseconds per named step, each timed from the end of the one before; the steps the
    guest spent stopped add up to its pause (``"total"`` in ``result``)."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._paused_ms = 0.0
        self._clock = time.monotonic()

    def __call__(self, name: str, *, paused: bool) -> None:
        now = time.monotonic()
        self.record(name, (now - self._clock) * 1000, paused=paused)
        self._clock = now

    def record(self, name: str, ms: float, *, paused: bool) -> None:
        self.ms[name] = round(ms, 2)
        if paused:
            self._paused_ms += ms

    def result(self) -> dict[str, float]:
        return {**self.ms, "total": round(self._paused_ms, 2)}


class Capture:
    def __init__(self, config: SupervisorConfig, entry: registry.VmDir) -> None:
        self.config = config
        self.entry = entry
        self.backend: backend.Backend = backend.default()
        self.machine: backend.Machine | None = None  # while the VMM runs
        self.lock: anyio.Lock = anyio.Lock()
        self.chain: list[list[str]] = []  # disk chain, top (writable) first: [path, format]
        self.disk_size: int = 0
        self.layer_refs: list[int] = []  # flock references on every layer and template we use
        self.ram_file: Path | None = None
        self.ram_shared: bool = True
        self.state_file: Path | None = None  # device state to load (restore, fork sibling)
        self.task_group: anyio.abc.TaskGroup | None = None  # holds templates' references until handed over
        self.paused_for: ClientConnection | None = None  # the client whose handoff holds the VM paused
        # The secrets whose placeholders its guest holds (what it started from, then ``vm.set_secrets``):
        # its bundles and fork templates remember them, never a value.
        self.secret_slots: tuple[SecretSlot, ...] = config.incoming.secrets if config.incoming is not None else ()

    # --- the machine -----------------------------------------------------------------

    async def prepare_disk_and_ram(self, ram_dir: Path) -> None:
        """Create this VM's writable layer and decide where its RAM lives.

        Booted and restored VMs own a shared RAM file (so they fork cheaply);
        fork siblings map their template's RAM privately (copy-on-write).
        """
        config, incoming = self.config, self.config.incoming
        if incoming is None:
            self.chain = [[config.machine.image, "raw"]]
            self.disk_size = os.stat(config.machine.image).st_size
        else:
            try:
                self.layer_refs += [layers.Shared(Path(p)).hold() for p in incoming.holds]
            except FileNotFoundError:
                raise ForkError("the fork template is gone", code="FORK_TEMPLATE_NOT_FOUND") from None
            self.chain, self.disk_size = incoming.chain, incoming.disk_size
        self.ram_file, self.ram_shared = ram_dir / "mem", True
        if incoming is not None and incoming.bundle:
            # Restored from a bundle: each file is copied (so the bundle stays untouched) and
            # hashed as it is copied; QEMU opens only the copies.
            source, expected = Path(incoming.bundle), manifest.files_from_map(incoming.files)
            imported, ref = layers.new_layer()
            self.layer_refs.append(ref)
            copies = [(bundle.DISK, imported.disk), (bundle.STATE, ram_dir / bundle.STATE)]
            if bundle.MEM in expected:
                copies.append((bundle.MEM, self.ram_file))
            for name, target in copies:
                await anyio.to_thread.run_sync(bundle.copy_verified, source / name, target, expected[name])
            self.chain = [[str(imported.disk), "qcow2"], *self.chain]
            self.state_file = ram_dir / bundle.STATE
        elif incoming is not None:  # a fork sibling: the template's RAM, mapped copy-on-write
            self.state_file = Path(incoming.state)
            self.ram_file, self.ram_shared = Path(incoming.mem), False
        layer, ref = layers.new_layer()
        self.layer_refs.append(ref)
        await self.backend.create_overlay(layer.disk, self.chain[0], self.disk_size)
        self.chain = [[str(layer.disk), "qcow2"], *self.chain]

    def release_layers(self) -> None:
        for ref in self.layer_refs:
            layers.close_quietly(ref)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[backend.Machine]:
        """The VMM of this VM, on the disk and RAM prepared; stopped on leaving."""
        entry = self.entry
        launch = self._launch(
            ram_file=self.ram_file, ram_shared=self.ram_shared, incoming=self.config.incoming is not None,
            disk_chain=self.chain, agent_socket=entry.agent_socket, control_socket=entry.qmp_socket,
            logs=(entry.console_log, entry.qemu_log),
        )  # fmt: skip
        async with self.backend.start(launch) as machine:
            self.machine = machine
            try:
                yield machine
            finally:
                self.machine = None

    def _hardware(self) -> backend.Hardware:
        """This VM's virtual hardware: what its VMM runs, and what a bundle of it records."""
        machine = self.config.machine
        return backend.Hardware(
            memory_mib=machine.memory_mib,
            cpus=machine.cpus,
            accel=machine.accel,
            kernel=Path(machine.kernel),
            initrd=Path(machine.initrd),
            hostname=self.config.name,
            tsc_khz=machine.tsc_khz,
            network=machine.network,
        )

    def _launch(self, **where: Any) -> backend.VmmLaunch:
        """A VMM launch of this VM's machine; ``where``: its RAM, disk and sockets."""
        # A confined VMM sees only the files of its launch (its disk chain, RAM file, kernel and
        # initrd): not this VM's directory (logs, meta.json, sockets), nor the layer and template
        # stores, where we create files it could otherwise plant symlinks for.
        incoming = self.config.incoming
        return backend.VmmLaunch(
            hardware=self._hardware(), network_policy=self.config.machine.network_policy,
            resolved_names=incoming.resolved_names if incoming is not None else (), **where,
        )  # fmt: skip

    # --- capture: fork templates and snapshots -------------------------------------

    async def _capture(
        self, state: Path, mem: Path | None, *, stay_paused: bool = False
    ) -> tuple[list[list[str]], dict[str, float]]:
        """Save this VM's state while it keeps running; return (frozen disk chain, timings).

        With ``stay_paused`` the guest is left stopped after a successful
        capture (a handoff: the state must stay the last one).

        The disk freeze gives the VM a fresh qcow2 layer on top, so the
        returned chain (top first) is immutable from now on; it happens while
        the guest is stopped, at the same instant as the saved state.

        - A VM on its own shared RAM file: stop, freeze the disk, save device
          state with RAM skipped (x-ignore-shared), copy the touched RAM to
          ``mem``, continue.  The copy lets the VM run on its own file while
          others use the frozen one.
        - A VM whose RAM privately maps a template (a fork sibling): its RAM
          goes into ``state`` by migration, live where the VMM allows it
          (``saves_live``): the guest stops only for the last dirty pages.
          Only a handoff's snapshot takes this way (it must stay paused): a
          sibling's fork template and other snapshots stream into a helper
          (``_stream_into``).
        """
        layer, layer_ref = layers.new_layer()
        step = StepTimer()
        frozen: list[list[str]] | None = None
        try:
            await self.backend.create_overlay(layer.disk, self.chain[0], self.disk_size)  # before the pause
            step("new_layer", paused=False)
            if self.ram_shared:
                await self.machine.pause()
                step("stop", paused=True)
                frozen = await self._freeze_disk(layer, layer_ref)
                step("freeze_disk", paused=True)
                await self.machine.save_state(state, ram=False)
                step("save_state", paused=True)
                if mem is not None:
                    await anyio.to_thread.run_sync(sparse.copy, self.ram_file, mem)
                    step("copy_ram", paused=True)
            else:
                stopped_ms = await self.machine.save_state(state, ram=True)
                step("stream_ram", paused=False)
                step.record("stopped_while_streaming", stopped_ms, paused=True)
                frozen = await self._freeze_disk(layer, layer_ref)  # the guest is stopped (postmigrate)
                step("freeze_disk", paused=True)
        finally:
            if frozen is None:
                layers.close_quietly(layer_ref)
            if frozen is None or not stay_paused:
                with anyio.CancelScope(shield=True):  # never left stopped, even when cancelled
                    await self.machine.resume()
        step("resume", paused=True)
        return frozen, step.result()

    async def _freeze_disk(self, layer: layers.Layer, layer_ref: int) -> list[list[str]]:
        """Put a fresh qcow2 layer on top of the disk; return the now-frozen chain."""
        await self.machine.freeze_disk(layer.disk)
        frozen = list(self.chain)
        self.chain = [[str(layer.disk), "qcow2"], *frozen]
        self.layer_refs.append(layer_ref)
        return frozen

    async def freeze_template(self, bundle_dir: str | None = None, capture: str = "auto") -> ForkTemplate:
        """Capture this running VM as a template that fork siblings start from.

        ``capture``: ``copy`` (stop, copy the touched RAM), ``stream`` (live, into a helper),
        or ``auto`` (see ``_streams``).  With ``bundle_dir``, also write a snapshot bundle of
        that same instant (after the VM continues): siblings on other hosts start from it."""
        if capture not in CAPTURE_MODES:
            raise MachinenError(f"capture is one of {', '.join(CAPTURE_MODES)}, not {capture!r:.40}",
                                code="FORK_CAPTURE_INVALID")  # fmt: skip
        async with self.lock:
            if self.paused_for is not None:
                raise MachinenError("the VM is paused for a handoff", code="FORK_VM_PAUSED")
            template, template_ref = layers.new_template()
            instant = time.time()  # what the siblings' lineage records of their parent
            try:
                if await self._streams(capture):
                    chain, steps = await self._stream_into(template)
                else:
                    chain, steps = await self._capture(template.state, template.mem)
            except BaseException:
                layers.close_quietly(template_ref)
                raise
        if bundle_dir is not None:
            target = bundle.create_dir(Path(bundle_dir))
            try:
                for source, name in ((template.state, bundle.STATE), (template.mem, bundle.MEM)):
                    await anyio.to_thread.run_sync(sparse.copy, source, target / name)
                await self._seal_bundle(target, chain, taken_at=instant)
            except BaseException:
                bundle.remove_partial(target)
                layers.close_quietly(template_ref)
                raise
        # Our reference only bridges the gap until the caller takes its own.
        self.task_group.start_soon(_release_later, template_ref, TEMPLATE_HANDOVER_S)
        log.info("fork template", template=template.id, pause_ms=steps["total"], steps=steps)
        incoming = IncomingState(
            chain=chain,
            disk_size=self.disk_size,
            holds=[str(template.path), *_layer_dirs(chain)],
            ram_in_state=False,
            source=self.config.name,
            state=str(template.state),
            mem=str(template.mem),
            lineage=descend(self.config.lineage, self.config.name, instant),
            resolved_names=self.machine.resolved_names() if self.machine is not None else [],
            secrets=self.secret_slots,
        )
        return ForkTemplate(
            incoming, self.config.machine, pause_ms=steps["total"], pause_steps_ms=steps, mounts=self.config.mounts
        )

    async def _streams(self, capture: str) -> bool:
        """Whether a fork template streams live (``_stream_into``) rather than copies while stopped.

        A fork sibling's RAM is private to its VMM: only a stream reaches it.  A VM on its own
        RAM file can be copied, in a pause that grows with the RAM it has touched; a stream
        pauses it only for the last dirty pages, but reads every page, and reading a page the
        guest never touched puts a zero page into the file (tmpfs): (RAM - touched) more host
        memory, in the VM's file and the template.  ``auto`` streams when that is at most what
        is touched and the copy would be long, and the VMM streams live (else the guest stops
        for the whole stream, longer than for a copy)."""
        if not self.ram_shared or capture == "stream":
            return True
        if capture == "copy" or not await self.machine.saves_live():
            return False
        touched = os.stat(self.ram_file).st_blocks * 512
        ram = self.config.machine.memory_mib * 2**20
        return touched >= STREAM_MIN_TOUCHED and touched >= ram * STREAM_MIN_TOUCHED_SHARE

    async def _stream_into(
        self, template: layers.Template, *, stay_paused: bool = False
    ) -> tuple[list[list[str]], dict[str, float]]:
        """Capture into ``template`` by live migration into a paused helper VMM whose RAM is the
        template's file: the guest runs while its RAM streams and stops only for the last dirty
        pages (then the disk freezes, as in ``_capture``), whatever it has touched.  The helper
        then saves device state without RAM, so siblings map that one file copy-on-write; it
        loads as the stream arrives, so nothing is written twice.  With ``stay_paused`` the guest
        stays stopped after a successful capture (a handoff), as in ``_capture``."""
        step = StepTimer()
        layer, layer_ref = layers.new_layer()
        scratch, scratch_ref = layers.new_layer()  # the helper's disk top, never written
        frozen: list[list[str]] | None = None
        try:
            # The disk's contents never reach a saved state: the helper's is a blank layer on the base.
            base = self.chain[-1]
            await self.backend.create_overlay(scratch.disk, base, self.disk_size)
            await self.backend.create_overlay(layer.disk, self.chain[0], self.disk_size)
            helper_logs = (scratch.path / "console.log", scratch.path / "qemu.log")
            helper = self._launch(
                ram_file=template.mem, ram_shared=True, incoming=True, never_run=True,
                disk_chain=[[str(scratch.disk), "qcow2"], base], logs=helper_logs,
                agent_socket=scratch.path / "agent.sock", control_socket=scratch.path / "qmp.sock",
            )  # fmt: skip
            try:
                async with self._helper(helper) as machine:
                    step("start_helper", paused=False)
                    sending, receiving = socket.socketpair()
                    with sending, receiving, plain_errors():
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(functools.partial(machine.load_state, receiving, ram=True))
                            try:
                                stopped_ms = await self.machine.save_state(sending, ram=True)
                                step("stream_ram", paused=False)
                                step.record("stopped_while_streaming", stopped_ms, paused=True)
                                frozen = await self._freeze_disk(layer, layer_ref)  # stopped (postmigrate)
                                step("freeze_disk", paused=True)
                            finally:
                                if frozen is None or not stay_paused:
                                    with anyio.CancelScope(shield=True):  # never left stopped by a failure
                                        await self.machine.resume()
                                step("resume", paused=True)
                        step("helper_loaded", paused=False)
                    await machine.save_state(template.state, ram=False)
                    step("helper_saved_state", paused=False)
            except MachinenError as error:
                raise MachinenError(
                    f"streaming the fork template failed: {error}; the helper QEMU said: "
                    + capped_log.tail(helper_logs[1]),
                    code=error.code,
                ) from None
        except BaseException:
            if frozen is not None and stay_paused:  # left stopped for a capture that then failed
                with anyio.CancelScope(shield=True):
                    await self.machine.resume()
            raise
        finally:
            if frozen is None:
                layers.close_quietly(layer_ref)
            layers.close_quietly(scratch_ref)
        return frozen, step.result()

    @contextlib.asynccontextmanager
    async def _helper(self, launch: backend.VmmLaunch) -> AsyncIterator[backend.Machine]:
        """A helper VMM, answering on its control socket.  One that exits before it answers has
        touched nothing yet: it is started once more (the reason is logged) before giving up."""
        for attempt in (1, 2):
            async with self.backend.start(launch) as machine:
                try:
                    await machine.connect()
                except BootError:
                    if attempt == 2:
                        raise
                    log.warning("helper VMM exited before it answered: starting it again",
                                said=capped_log.tail(launch.logs[1]) if launch.logs else "")  # fmt: skip
                    continue
                yield machine
                return

    async def snapshot(self, directory: str, *, paused_for: ClientConnection | None = None) -> dict[str, Any]:
        """Write a bundle of this running VM to ``directory``; the VM keeps running,
        unless ``paused_for`` a client: then it stays paused until that client
        resumes it or goes away (a handoff in progress)."""
        target = bundle.create_dir(Path(directory))
        try:
            async with self.lock:
                if self.paused_for is not None:
                    raise SnapshotError("the VM is paused for a handoff", code="SNAPSHOT_VM_PAUSED")
                instant = time.time()  # what the lineage of VMs restored from it records
                if self.ram_shared:
                    chain, steps = await self._capture(
                        target / bundle.STATE, target / bundle.MEM, stay_paused=paused_for is not None
                    )
                else:  # RAM mapped from a template (a fork sibling, a warm VM): streamed into a file
                    # of the bundle's own, so it restores as siblings too and a handoff's final
                    # bundle shares its RAM's chunks with the precopy's
                    chain, steps = await self._stream_into(layers.Template(target), stay_paused=paused_for is not None)
                self.paused_for = paused_for
            started = time.monotonic()
            sealed = await self._seal_bundle(target, chain, taken_at=instant)
        except BaseException:
            with anyio.CancelScope(shield=True):
                bundle.remove_partial(target)
                if paused_for is not None:
                    await self.resume(paused_for)
            raise
        write_ms = round((time.monotonic() - started) * 1000, 2)
        log.info("snapshot", bundle=str(target), pause_ms=steps["total"], write_ms=write_ms)
        return {"bundle": str(target), "pause_ms": steps["total"], "pause_steps_ms": steps,
                "write_ms": write_ms, "files": manifest.files_to_map(sealed.files)}  # fmt: skip

    async def boot_template(self, directory: Path) -> None:
        """Write a boot template (a bundle of this VM as it is now, just booted, with no mounts)
        into the empty ``directory``; the VM keeps running."""
        try:
            async with self.lock:
                instant = time.time()
                chain, steps = await self._capture(directory / bundle.STATE, directory / bundle.MEM)
            await self._seal_bundle(directory, chain, taken_at=instant, mounts=[])
        except BaseException:
            bundle.remove_partial(directory)
            raise
        log.info("boot template", directory=str(directory), pause_ms=steps["total"])

    async def _seal_bundle(
        self, target: Path, chain: list[list[str]], *, taken_at: float, mounts: list[list] | None = None
    ) -> manifest.Manifest:
        """Finish a bundle whose state (and RAM) are in place: its disk, then the manifest
        (``taken_at``: the instant captured; ``mounts``: the live mounts it records, by default this VM's)."""
        # Flatten everything above the base image into one file: the bundle
        # must not depend on this host's layer files.
        base = chain[-1][0]
        await self.backend.flatten_disk(chain, target / bundle.DISK)
        machine, hardware = self.config.machine, self._hardware()

        async def digest(path: Path) -> str:
            return await anyio.to_thread.run_sync(immutable_file_digest, path)

        taken = manifest.Manifest(
            machine=manifest.SavedMachine.of(
                hardware, machine_type=self.backend.machine_type, disk_size=self.disk_size
            ),
            kernel=manifest.BootFile(await digest(hardware.kernel)),
            initrd=manifest.BootFile(await digest(hardware.initrd)),
            image=manifest.ImageIdentity(
                key=machine.image_key or Path(base).stem, sha256=await digest(Path(base)), source=machine.image_source
            ),
            files={},  # the seal hashes them
            qemu_version=await self.machine.version(),
            mounts=tuple(MountBinding(*mount) for mount in (self.config.mounts if mounts is None else mounts)),
            source=self.config.name,
            origin=bundle.origin(),
            created=taken_at,
            lineage=tuple(self.config.lineage),
            secrets=self.secret_slots,
        )
        return (await anyio.to_thread.run_sync(bundle.seal, target, taken)).manifest

    async def resume(self, client: ClientConnection) -> bool:
        """Continue a VM that ``client`` paused; False if it was not paused by it."""
        if self.paused_for is not client:
            return False
        self.paused_for = None
        await self.machine.resume()
        return True


def _layer_dirs(chain: list[list[str]]) -> list[str]:
    """The shared layer directories a disk chain runs through."""
    root = layers.layers_dir()
    return [str(Path(path).parent) for path, _ in chain if Path(path).parent.parent == root]


async def _release_later(ref: int, delay: float) -> None:
    try:
        await anyio.sleep(delay)
    finally:
        layers.close_quietly(ref)
