"""The QEMU backend: a confined QEMU process per VM, driven over QMP (``qemu.qmp``).

``QEMU.start`` runs ``setpriv --pdeathsig -> [network guard shim] -> bwrap -> qemu``, each
exec'ing the next, in a session of its own; the context's exit quits QEMU and kills that
whole session.  Device state always moves through descriptors the supervisor opens and
passes over QMP (``fd:`` migration): QEMU 7.2 has no ``file:`` URI, and a sandboxed QEMU
may neither spawn the shell ``exec:`` needs nor open files of its own choosing.

QEMU may be taken over by its guest, so it gets no directory it can write to (``visible``):
its control and agent sockets are listening sockets made here and passed as descriptors, a
new disk layer arrives as a descriptor too (``add-fd``), and every file opened here for it is
created ``O_EXCL | O_NOFOLLOW`` or opened ``O_NOFOLLOW`` (``store/paths.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import anyio
import anyio.abc
import structlog
from qemu.qmp import QMPClient

from ...errors import BootError, MachinenError
from ...protocol.netpolicy import NetworkPolicy, ResolvedName
from ...protocol.secret import SecretRule
from ...store import paths
from .. import capped_log
from ..backend import DiskChain, VmmLaunch
from . import command, confine, netguard

log: structlog.typing.FilteringBoundLogger = structlog.get_logger("machinen.qemu")

MIGRATION_BANDWIDTH = 16 * 1024**3  # bytes/s: effectively unlimited, to a local file
MIGRATION_DOWNTIME_MS = 50
# A guest that dirties RAM faster than it streams would keep a live migration going for ever:
# past MIGRATE_CONVERGE_S it is stopped for the rest (the caller resumes it, as after any
# live migration); past MIGRATE_DEADLINE_S any migration is cancelled and fails.
MIGRATE_CONVERGE_S, MIGRATE_DEADLINE_S = 15.0, 180.0
QUIT_GRACE_S = 2.0
TCG_LIVE_MIGRATION_SINCE = 9  # QEMU major version
REFUSALS_PER_WINDOW = 20  # refused guest connections logged a minute


class QemuMachine:
    def __init__(self, process: anyio.abc.Process, pid: int, launch: VmmLaunch, guard: netguard.Guard | None) -> None:
        self.process = process
        self.pid = pid
        self.launch = launch
        self.guard: netguard.Guard | None = guard
        self.qmp: QMPClient = QMPClient(launch.hardware.hostname)
        self.disk_node: str = "disk0"  # the top of the disk chain (command.chain_blockdev names it)
        self.layers_added: int = 0
        self.logs_copied: list[anyio.Event] = [anyio.Event(), anyio.Event()] if launch.logs else []

    async def connect(self) -> None:
        while True:
            try:
                await self.qmp.connect(str(self.launch.control_socket))
                return
            except Exception:  # noqa: BLE001  qemu.qmp raises ConnectError wrapping OSError while QEMU starts
                if self.process.returncode is not None:
                    raise BootError(f"QEMU exited ({self.process.returncode}) before it answered", code="BOOT_FAILED")
                await anyio.sleep(0.01)

    async def set_network(self, policy: NetworkPolicy) -> None:
        if self.guard is not None:
            self.guard.policy.egress.policy = policy  # read at each query and connection

    def resolved_names(self) -> list[ResolvedName]:
        return [] if self.guard is None else self.guard.policy.egress.resolved.entries()

    async def set_secrets(self, secrets: Sequence[SecretRule]) -> bytes:
        if self.guard is None:
            raise BootError("a VM without a network sends no secret", code="BOOT_SECRET_INVALID")
        return self.guard.policy.egress.set_secrets(secrets)

    async def exited(self) -> int:
        status = await self.process.wait()
        with anyio.move_on_after(1):  # its last words, for whoever reports the exit
            for copied in self.logs_copied:
                await copied.wait()
        return status

    async def pause(self) -> None:
        await self.qmp.execute("stop")

    async def resume(self) -> None:
        await self.qmp.execute("cont")

    async def is_running(self) -> bool:
        return (await self.qmp.execute("query-status"))["status"] == "running"

    async def freeze_disk(self, new_top: Path) -> None:
        """``new_top`` (made by ``create_overlay``) goes on top as descriptors in an fd set: QEMU
        creates no file and needs no writable directory for it (``blockdev-snapshot-sync`` would).
        The set holds it open read-write and read-only: when the next freeze puts a layer over
        this one, QEMU reopens it read-only (dropping its write lock, so siblings can open it)."""
        self.layers_added += 1
        node = f"layer{self.layers_added}"
        fds = [paths.open_regular(new_top, os.O_RDWR)]
        try:
            fds.append(paths.open_regular(new_top, os.O_RDONLY))
            if not os.path.samestat(os.fstat(fds[0]), os.fstat(fds[1])):
                raise MachinenError(f"{new_top} changed while it was opened", code="PATH_NOT_PRIVATE")
            added = []
            for fd in fds:
                self.qmp.send_fd_scm(fd)
                added.append(await self.qmp.execute("add-fd", {"fdset-id": added[0]["fdset-id"]} if added else {}))
        finally:
            for fd in fds:
                os.close(fd)  # QEMU holds its own copies now
        fdset = added[0]["fdset-id"]
        try:
            await self.qmp.execute(
                "blockdev-add",
                {"driver": "qcow2", "node-name": node, "backing": None,
                 "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}"}},
            )  # fmt: skip
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self.qmp.execute("remove-fd", {"fdset-id": fdset})
            raise
        with contextlib.suppress(Exception):  # the node holds a duplicate of it: the set's copy can go
            await self.qmp.execute("remove-fd", {"fdset-id": fdset, "fd": added[0]["fd"]})
        try:
            await self.qmp.execute("blockdev-snapshot", {"node": self.disk_node, "overlay": node})
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self.qmp.execute("blockdev-del", {"node-name": node})
            raise
        self.disk_node = node

    async def save_state(self, into: Path | socket.socket, *, ram: bool) -> float:
        if ram and not await self.saves_live():
            started = time.monotonic()
            await self.pause()
            await self._migrate("migrate", await self._migration_fd(into, write=True), ram=True)
            return round((time.monotonic() - started) * 1000, 2)
        final = await self._migrate("migrate", await self._migration_fd(into, write=True), ram=ram)
        return float(final.get("downtime", 0)) if ram else 0.0

    async def saves_live(self) -> bool:
        """Whether RAM can stream while the guest runs.  Under TCG, QEMU before 9.0 loses guest
        writes to its dirty tracking (a sync cleared dirty bits without resetting the TLB entries
        that skip it: fixed by "physmem: Fix migration dirty bitmap coherency with TCG memory
        access"), so a live stream would give a RAM image from no single instant."""
        if self.launch.hardware.accel == "kvm":
            return True
        major = int((await self.version()).split(".")[0])
        return major >= TCG_LIVE_MIGRATION_SINCE

    async def load_state(self, source: Path | socket.socket, *, ram: bool) -> None:
        await self._migrate("migrate-incoming", await self._migration_fd(source), ram=ram)

    async def version(self) -> str:
        version = (await self.qmp.execute("query-version"))["qemu"]
        return f"{version['major']}.{version['minor']}.{version['micro']}"

    async def _migration_fd(self, where: Path | socket.socket, *, write: bool = False) -> dict[str, str]:
        """Migration arguments naming a descriptor passed over QMP: a socket's (handed over: it is
        closed here, so the stream ends when QEMU's end does), or one we open on a path: a new
        file to write (``O_EXCL | O_NOFOLLOW``: whatever was there is replaced, never followed),
        a regular file to read (never through a symlink)."""
        if isinstance(where, socket.socket):
            fd = where.detach()
        elif write:
            fd = paths.create_file(where)
        else:
            fd = paths.open_regular(where)
        name = f"migration-{secrets.token_hex(4)}"
        try:
            self.qmp.send_fd_scm(fd)
            await self.qmp.execute("getfd", {"fdname": name})
        finally:
            os.close(fd)  # QEMU holds its own copy now
        return {"uri": f"fd:{name}"}

    async def _migrate(self, command_name: str, arguments: dict, *, ram: bool) -> dict:
        """Save or load state and wait for it.  Without ``ram``, RAM in shared files stays out
        of the stream (x-ignore-shared; both ends must agree).  QEMU's final report."""
        qmp = self.qmp
        await qmp.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": not ram}]}
        )
        if command_name == "migrate":  # QEMU's defaults (32 MiB/s, 300 ms) are for networks, not tmpfs
            await qmp.execute(
                "migrate-set-parameters",
                {"max-bandwidth": MIGRATION_BANDWIDTH, "downtime-limit": MIGRATION_DOWNTIME_MS},
            )
        await qmp.execute(command_name, arguments)
        started = time.monotonic()
        forced = False
        try:
            with anyio.move_on_after(MIGRATE_DEADLINE_S):
                while True:
                    info = await qmp.execute("query-migrate")
                    status = info.get("status")
                    if status == "completed":
                        return info
                    if status in ("failed", "cancelled"):
                        raise MachinenError(
                            f"{command_name} {status}: {info.get('error-desc', 'no detail')}",
                            code="SNAPSHOT_DUMP_FAILED",
                        )
                    if command_name == "migrate" and not forced and time.monotonic() - started > MIGRATE_CONVERGE_S:
                        forced = True
                        log.warning("live migration does not converge: stopping the guest for the rest")
                        await qmp.execute("stop")
                    await anyio.sleep(0.002)
            raise MachinenError(
                f"{command_name} did not finish within {MIGRATE_DEADLINE_S:g} s", code="SNAPSHOT_DUMP_FAILED"
            )
        except BaseException:
            # Failed, too slow or cancelled: an outgoing migration must not go on (and complete,
            # stopping the guest) behind the caller's back.
            if command_name == "migrate":
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await qmp.execute("migrate_cancel")
            raise

    async def _stop(self) -> None:
        process = self.process
        if process.returncode is None:
            with contextlib.suppress(Exception), anyio.move_on_after(0.5):
                await self.qmp.execute("quit")
            with anyio.move_on_after(QUIT_GRACE_S):
                await process.wait()
            if process.returncode is None:
                _kill_chain(process)
                await process.wait()
        with contextlib.suppress(Exception), anyio.move_on_after(1):
            await self.qmp.disconnect()


class QemuBackend:
    name = "qemu"
    machine_type = command.MACHINE_TYPE

    def check_installed(self) -> None:
        command.qemu_binary()

    def installed_version(self) -> str:
        return command.qemu_version()

    def launch_recipe(self) -> str:
        return command.recipe_digest()

    def choose_accelerator(self, requested: str | None) -> str:
        return command.choose_accelerator(requested)

    def host_tsc_khz(self) -> int | None:
        return command.host_tsc_khz()

    @contextlib.asynccontextmanager
    async def start(self, launch: VmmLaunch) -> AsyncIterator[QemuMachine]:
        with contextlib.ExitStack() as sockets:
            # QEMU serves its sockets from listening descriptors: it needs no directory to
            # create them in, and the paths stay ours.  Our copies close once it has its own.
            listeners = [sockets.enter_context(_listen(path)) for path in (launch.agent_socket, launch.control_socket)]
            process, pid, guard = await _start_chain(launch, *listeners)
        machine = QemuMachine(process, pid, launch, guard)
        log.info("qemu started", pid=pid, accel=launch.hardware.accel, memory_mib=launch.hardware.memory_mib)
        # The console (QEMU's stdout) and QEMU's own messages are copied into capped logs, and
        # QEMU's connections checked, for as long as QEMU runs: a pipe nobody reads, or a
        # connection nobody answers, would block QEMU, even while it is asked to quit.
        async with anyio.create_task_group() as helpers:
            if guard is not None:
                await helpers.start(_guard_network, guard)
            if launch.logs:
                limits = (capped_log.CONSOLE_LOG_LIMIT, capped_log.QEMU_LOG_LIMIT)
                for stream, path, limit, copied in zip(
                    (process.stdout, process.stderr), launch.logs, limits, machine.logs_copied, strict=True
                ):
                    helpers.start_soon(_copy_log, stream, path, limit, copied)
            try:
                yield machine
            finally:
                with anyio.CancelScope(shield=True):
                    await machine._stop()

    async def create_overlay(self, path: Path, backing: list[str], size: int) -> None:
        """qemu-img writes the new layer into a file created here (``O_EXCL | O_NOFOLLOW``)
        and named to it as that descriptor: it never opens ``path`` itself, where something
        else could have been planted meanwhile."""
        backing_path, backing_format = backing
        fd = paths.create_file(path, os.O_RDWR)
        try:
            await _check_call(  # -u: do not open the backing file
                ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", backing_format, "-b", backing_path,
                 f"/dev/fd/{fd}", str(size)],
                what="create a disk layer", pass_fds=[fd],
            )  # fmt: skip
        finally:
            os.close(fd)

    async def flatten_disk(self, chain: DiskChain, target: Path) -> None:
        """qemu-img reads layers that a VM's QEMU wrote (and, for the top frozen one, still
        could: a header naming an external data file would make it read any file of ours), so
        it runs confined as QEMU does, seeing only the chain (read-only) and ``target``."""
        base = chain[-1][0]
        argv = ["qemu-img", "convert", "-U", "-O", "qcow2", "-B", base, "-F", "raw",
                "json:" + json.dumps(command.chain_blockdev(chain, writable=False)), str(target)]  # fmt: skip
        os.close(paths.create_file(target))  # to bind: qemu-img truncates and fills it
        confined = confine.confined(argv, read_only=[Path(path) for path, _ in chain], writable=[target], kvm=False)
        await _check_call(confined or argv, what="write the bundle's disk")


BACKEND = QemuBackend()  # what vmm/backend.py's default() looks for in each backend folder


def visible(launch: VmmLaunch) -> tuple[list[Path], list[Path]]:
    """What a confined QEMU of ``launch`` sees besides its system files: (read-only, writable).

    Exactly the files on its command line, never a directory it could write to: kernel,
    initrd, the frozen layers and base image read-only; its own top layer, and its RAM file
    when shared (its own, or a new template's), read-write.  A private RAM file (a
    template's, mapped copy-on-write) is read-only where QEMU can open it so
    (``command.private_ram_read_only``): other siblings map it too.  A shared RAM file
    that does not exist yet is created (empty: QEMU sizes it) so that it can be bound."""
    hardware, chain = launch.hardware, launch.disk_chain
    read_only = [hardware.kernel, hardware.initrd, *(Path(path) for path, _ in chain[1:])]
    writable = [Path(chain[0][0])]
    if not launch.ram_shared and command.private_ram_read_only():
        read_only.append(launch.ram_file)
    else:
        writable.append(launch.ram_file)
    if launch.ram_shared and (launch.ram_file.is_symlink() or not launch.ram_file.exists()):
        os.close(paths.create_file(launch.ram_file))  # bwrap would bind a symlink's target
    return [*read_only, *launch.read_only], [*writable, *launch.writable]


@contextlib.contextmanager
def _listen(path: Path) -> Iterator[socket.socket]:
    """A listening unix socket at ``path`` (a leftover there is unlinked, never followed)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(16)
        yield listener


async def _start_chain(
    launch: VmmLaunch, agent: socket.socket, control: socket.socket
) -> tuple[anyio.abc.Process, int, netguard.Guard | None]:
    """QEMU confined (``confine``: its own namespaces, only ``visible`` paths) serving
    ``agent`` and ``control`` and, with a network, under netguard's filter: (process, QEMU's
    pid, guard)."""
    argv = command.command_line(launch, agent_fd=agent.fileno(), control_fd=control.fileno())
    guarded = launch.hardware.network and not launch.never_run  # a guest that never runs opens nothing
    output = subprocess.PIPE if launch.logs else subprocess.DEVNULL
    # Made before QEMU starts (it opens a netlink socket, which can fail), so a failure leaves no QEMU.
    policy = netguard.Policy.current(launch.network_policy) if guarded else None
    if policy is not None:
        policy.egress.resolved.seed(launch.resolved_names)
    try:
        info_read, info_write = os.pipe()  # bwrap writes {"child-pid": N, ...} there, then closes it
        ours, theirs = socket.socketpair()  # netguard's shim sends its listener there
        with os.fdopen(info_read, "rb") as info, ours:
            try:
                read_only, writable = visible(launch)
                confined = confine.confined(
                    argv, read_only=read_only, writable=writable, kvm=launch.hardware.accel == "kvm", info_fd=info_write
                )
                chain = confined or argv
                if guarded:
                    chain = netguard.guarded_argv(chain, theirs.fileno())
                # setpriv --pdeathsig: the chain dies with us, even on SIGKILL (the shim and bwrap
                # exec the next step, which keeps the signal; bwrap --die-with-parent passes it on
                # to the sandboxed QEMU).  A session of its own, killed whole by _kill_chain.
                process = await anyio.open_process(
                    ["setpriv", "--pdeathsig", "KILL", "--", *chain],
                    stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True,
                    pass_fds=[theirs.fileno(), agent.fileno(), control.fileno(), *([info_write] if confined else [])],
                )  # fmt: skip
            finally:
                theirs.close()
                os.close(info_write)
            try:
                ours.settimeout(30)
                listener = await anyio.to_thread.run_sync(netguard.receive_listener, ours) if guarded else None
                reported = await anyio.to_thread.run_sync(info.read) if confined else b""
                pid = json.loads(reported)["child-pid"] if reported else process.pid
            except BaseException:
                _kill_chain(process)
                with anyio.CancelScope(shield=True):
                    await process.wait()
                raise
        if listener is None:
            return process, pid, None
        refusals = capped_log.Budget(REFUSALS_PER_WINDOW, capped_log.BUDGET_WINDOW_S)

        def log_refused(address, port: int) -> None:
            if refusals.spend():
                log.info("guest connection refused", destination=str(address), port=port)
            elif refusals.just_exhausted:
                log.info("guest connections keep being refused: not logged for a while")

        return process, pid, netguard.Guard(listener, policy, log_refused)
    except BaseException:
        if policy is not None:
            policy.close()  # no guard took it
        raise


async def _guard_network(guard: netguard.Guard, *, task_status: anyio.abc.TaskStatus[None]) -> None:
    """Answer QEMU's filtered calls, and run the VM's egress proxy and resolver, until QEMU is gone."""
    async with anyio.create_task_group() as egress:
        await egress.start(guard.policy.egress.serve)  # listening before the first connection is handed over
        task_status.started()
        await anyio.to_thread.run_sync(guard.serve)  # returns once QEMU is gone
        egress.cancel_scope.cancel()


def _kill_chain(process: anyio.abc.Process) -> None:
    """SIGKILL every process of QEMU's session: killing only the first would leave a bwrap
    killed while it set the sandbox up with a child blocked for ever, waiting for it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


async def _copy_log(stream: anyio.abc.ByteReceiveStream, path: Path, limit: int, copied: anyio.Event) -> None:
    await capped_log.copy_into(stream, path, limit)
    copied.set()


async def _check_call(argv: list[str], *, what: str, pass_fds: tuple[int, ...] | list[int] = ()) -> None:
    """Run a helper program; its failure is a BootError quoting its stderr."""
    result = await anyio.run_process(argv, check=False, pass_fds=pass_fds)
    if result.returncode != 0:
        raise BootError(f"cannot {what}: {result.stderr.decode(errors='replace').strip()}")
