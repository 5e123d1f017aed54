"""Per-VM supervisor process: ``python -m machinen_async.vmm.supervisor CONFIG_JSON``.

It owns everything one VM is made of -- the registry entry (name lock),
QEMU, QMP, the agent channel, the RAM file and the disk overlay -- and serves
a 0600 unix socket that any number of clients (SDK, CLI, other processes)
use at once.  Client frames are relayed to the guest agent with stream ids
rewritten, so flow control stays end to end; methods named ``vm.*`` are
answered here.

It always runs on asyncio (``qemu.qmp`` is asyncio-only), whatever event
loop its clients use.  Startup result is one JSON line on stdout:
``{"ready": {...}}`` or ``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog
from qemu.qmp import QMPClient

from .. import paths, registry
from ..errors import BootError, BootTimeoutError, MachinenError, error_from_code, plain_errors
from ..vsock import wire
from ..vsock.framed import FrameStream
from . import qemu, storage

log = structlog.get_logger("machinen.supervisor")

HELLO_RETRY_S = 0.2
# A fork template stays referenced by its source this long after the fork
# call returned, so the caller can take its own reference first.
TEMPLATE_HANDOVER_S = 120.0
AGENT_RECONNECT_TIMEOUT_S = 10.0
_CHANNEL_DOWN = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
QEMU_QUIT_GRACE_S = 2.0
CONSOLE_TAIL_BYTES = 3000
# The launcher writes this byte on our stdin to let the VM outlive it; EOF
# without it means "my owner is gone": stop.
DETACH = b"d"


@dataclass(frozen=True)
class SupervisorConfig:
    name: str
    memory_mib: int
    cpus: int
    accel: str
    kernel: str
    initrd: str
    image: str
    ram_dir: str  # chosen by the launcher, so it can clean up if it has to SIGKILL us
    tsc_khz: int | None
    boot_timeout: float
    detached: bool
    incoming: dict[str, Any] | None = None  # {"template", "layer", "source"}: start as a fork sibling

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SupervisorConfig:
        return cls(**json.loads(text))


def console_tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - CONSOLE_TAIL_BYTES))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class ClientConnection:
    def __init__(self, frames: FrameStream) -> None:
        self.frames = frames
        self.agent_sids: dict[int, int] = {}  # client sid -> agent sid
        self.outbox_send, self.outbox = anyio.create_memory_object_stream[list](float("inf"))

    async def write_loop(self) -> None:
        async for frame in self.outbox:
            await self.frames.send(frame)


class Supervisor:
    def __init__(self, config: SupervisorConfig, entry: registry.VmDir) -> None:
        self.config = config
        self.entry = entry
        self.agent: FrameStream | None = None
        self.agent_up = False
        self.agent_info: dict[str, Any] = {}
        self.routes: dict[int, tuple[ClientConnection, int]] = {}
        self.next_agent_sid = 1
        self.stop_requested = anyio.Event()
        self.meta: dict[str, Any] = {}
        self.qmp = QMPClient(config.name)
        self.fork_lock = anyio.Lock()
        self.layer: storage.Layer | None = None
        self.layer_refs: list[int] = []  # flock references on every layer and template we use
        self.disk_node = "disk0"
        self.ram_file: Path | None = None
        self.task_group: anyio.abc.TaskGroup | None = None

    # --- the agent side -----------------------------------------------------------

    async def connect_agent(self) -> None:
        """Connect to the agent socket and complete a HELLO exchange."""
        while True:
            try:
                stream = await anyio.connect_unix(str(self.entry.agent_socket))
                break
            except OSError:
                await anyio.sleep(0.01)
        self.agent = FrameStream(stream, resync=True)
        nonce = secrets.token_bytes(8)

        async def send_hellos() -> None:
            while True:
                await self.agent.send([wire.HELLO, 0, nonce, wire.PROTOCOL_VERSION, {}])
                await anyio.sleep(HELLO_RETRY_S)

        async with anyio.create_task_group() as tg:
            tg.start_soon(send_hellos)
            while True:
                frame = await self.agent.receive()
                if frame[0] == wire.HELLO and frame[2] == nonce:
                    self.agent_info = frame[4]
                    self.agent.resync = False
                    self.agent_up = True
                    tg.cancel_scope.cancel()
                    break

    async def call_agent(self, method: str, params: dict) -> Any:
        """A unary agent call of the supervisor's own; only before the read loop runs."""
        sid = self.next_agent_sid
        self.next_agent_sid += 1
        await self.agent.send([wire.OPEN, sid, method, params])
        while True:
            frame = await self.agent.receive()
            if frame[1] == sid and frame[0] == wire.RESULT:
                return frame[2]
            if frame[1] == sid and frame[0] == wire.ERROR:
                raise error_from_code(frame[2], frame[3])

    async def send_to_agent(self, frame: list) -> bool:
        """False while the agent channel is down (being re-established)."""
        if self.agent is None or not self.agent_up:
            return False
        try:
            await self.agent.send(frame)
            return True
        except _CHANNEL_DOWN:
            return False

    def fail_all_calls(self, message: str) -> None:
        for client, client_sid in self.routes.values():
            client.agent_sids.pop(client_sid, None)
            client.outbox_send.send_nowait([wire.ERROR, client_sid, "EXEC_AGENT_UNAVAILABLE", message])
        self.routes.clear()

    async def agent_read_loop(self) -> None:
        """Relay agent frames to clients; on a channel reset, reconnect.

        Calls in flight fail with EXEC_AGENT_UNAVAILABLE (retryable); their
        guest processes keep running, orphaned, as after a restore.
        """
        while True:
            try:
                frame = await self.agent.receive()
            except (*_CHANNEL_DOWN, anyio.EndOfStream, wire.ProtocolError) as exc:
                log.warning("agent channel reset", error=repr(exc))
                self.agent_up = False
                self.fail_all_calls("the guest agent channel was reset")
                with contextlib.suppress(*_CHANNEL_DOWN):
                    await self.agent.aclose()
                try:
                    with anyio.fail_after(AGENT_RECONNECT_TIMEOUT_S):
                        await self.connect_agent()
                except TimeoutError:
                    log.error("guest agent unreachable after a channel reset")
                    self.stop_requested.set()
                    return
                log.info("agent channel re-established")
                continue
            route = self.routes.get(frame[1])
            if route is None:
                continue  # late output of a call whose client left
            client, client_sid = route
            if frame[0] in wire.FINAL_KINDS:
                del self.routes[frame[1]]
                client.agent_sids.pop(client_sid, None)
            frame[1] = client_sid
            client.outbox_send.send_nowait(frame)

    # --- the client side ----------------------------------------------------------

    async def serve_client(self, stream: anyio.abc.ByteStream) -> None:
        client = ClientConnection(FrameStream(stream))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.write_loop)
                while True:
                    try:
                        frame = await client.frames.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, wire.ProtocolError, OSError):
                        break
                    await self.on_client_frame(client, frame, tg)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                # A caller that went away abandons its calls: stop their processes.
                for agent_sid in list(client.agent_sids.values()):
                    self.routes.pop(agent_sid, None)
                    await self.send_to_agent([wire.CANCEL, agent_sid])
                await client.frames.aclose()

    async def on_client_frame(self, client: ClientConnection, frame: list, tg: anyio.abc.TaskGroup) -> None:
        kind, sid = frame[0], frame[1]
        if kind == wire.HELLO:
            client.outbox_send.send_nowait([wire.HELLO, 0, frame[2], wire.PROTOCOL_VERSION, self.meta])
        elif kind == wire.OPEN and frame[2].startswith("vm."):
            tg.start_soon(self.handle_local_call, client, sid, frame[2], frame[3])
        elif kind == wire.OPEN:
            agent_sid = self.next_agent_sid
            self.next_agent_sid += 1
            self.routes[agent_sid] = (client, sid)
            client.agent_sids[sid] = agent_sid
            if not await self.send_to_agent([wire.OPEN, agent_sid, frame[2], frame[3]]):
                self.routes.pop(agent_sid, None)
                client.agent_sids.pop(sid, None)
                client.outbox_send.send_nowait(
                    [wire.ERROR, sid, "EXEC_AGENT_UNAVAILABLE", "the guest agent channel is being re-established"]
                )
        else:
            agent_sid = client.agent_sids.get(sid)
            if agent_sid is None:
                return
            if kind == wire.CANCEL:
                del client.agent_sids[sid]
                self.routes.pop(agent_sid, None)
            frame[1] = agent_sid
            await self.send_to_agent(frame)

    async def handle_local_call(self, client: ClientConnection, sid: int, method: str, params: dict) -> None:
        try:
            if method == "vm.info":
                result: Any = {**self.meta, "agent": self.agent_info}
            elif method == "vm.reset_agent_channel":
                # Drop and re-establish the agent channel (a new agent session), as a
                # restore does; for recovering a wedged channel and for tests.
                old = self.agent
                await old.aclose()
                while self.agent is old or not self.agent_up:
                    await anyio.sleep(0.01)
                result = {"agent": self.agent_info}
            elif method == "vm.fork_template":
                result = await self.freeze_template()
            elif method == "vm.stop":
                self.stop_requested.set()
                result = {"stopping": True}
            else:
                raise MachinenError(f"unknown method {method!r}", code="EXEC_PROTOCOL")
        except MachinenError as exc:
            client.outbox_send.send_nowait([wire.ERROR, sid, exc.code, exc.message])
            return
        client.outbox_send.send_nowait([wire.RESULT, sid, result])

    # --- fork -------------------------------------------------------------------

    async def freeze_template(self) -> dict[str, Any]:
        """Capture this running VM as a template siblings start from.

        The pause covers: QMP stop, freezing the disk layer (the VM continues
        on a fresh qcow2 on top), saving device state (RAM skipped:
        x-ignore-shared) and copying the touched RAM pages to the template.
        The RAM copy is what lets this VM keep running on its own file while
        siblings map the frozen one copy-on-write.
        """
        if self.config.incoming is not None:
            raise MachinenError(
                "forking a VM that is itself a fork is not supported yet", code="FORK_OF_FORK_UNSUPPORTED"
            )
        async with self.fork_lock:
            template, template_ref = storage.new_template()
            layer, layer_ref = storage.new_layer()
            steps: dict[str, float] = {}
            clock = time.monotonic()

            def step(name: str) -> None:
                nonlocal clock
                now = time.monotonic()
                steps[name] = round((now - clock) * 1000, 2)
                clock = now

            paused_at = clock
            await self.qmp.execute("stop")
            step("stop")
            try:
                node = f"disk{len(self.layer_refs)}"
                await self.qmp.execute(
                    "blockdev-snapshot-sync",
                    {"node-name": self.disk_node, "snapshot-file": str(layer.disk),
                     "snapshot-node-name": node, "format": "qcow2"},
                )  # fmt: skip
                frozen, self.layer, self.disk_node = self.layer, layer, node
                self.layer_refs.append(layer_ref)
                step("freeze_disk")
                await _migrate(self.qmp, "migrate", {"uri": _exec_uri(f"cat > {template.state}")})
                step("save_state")
                await _check_call(["cp", "--sparse=always", str(self.ram_file), str(template.mem)], what="copy RAM")
                step("copy_ram")
            finally:
                await self.qmp.execute("cont")
            pause_ms = (time.monotonic() - paused_at) * 1000
        # Our reference only bridges the gap until the caller takes its own.
        self.task_group.start_soon(_release_later, template_ref, TEMPLATE_HANDOVER_S)
        log.info("fork template", template=template.id, frozen_layer=frozen.id, pause_ms=round(pause_ms, 1))
        return {
            "template": str(template.path),
            "layer": str(frozen.path),
            "pause_ms": round(pause_ms, 2),
            "pause_steps_ms": steps,
            "source": self.config.name,
            "machine": {
                k: getattr(self.config, k)
                for k in ("memory_mib", "cpus", "accel", "kernel", "initrd", "image", "tsc_khz")
            },
        }

    # --- lifecycle ----------------------------------------------------------------

    async def run(self, report_ready) -> None:
        ram_dir = Path(self.config.ram_dir)
        paths.private_dir(ram_dir.parent)
        paths.private_dir(ram_dir)
        try:
            await self._run(ram_dir, report_ready)
        finally:
            for ref in self.layer_refs:
                storage.close_quietly(ref)
            shutil.rmtree(ram_dir, ignore_errors=True)
            storage.collect_garbage()

    async def _prepare_disk_and_ram(self, ram_dir: Path) -> tuple[Path, bool]:
        """Create this VM's writable layer; return (RAM file, shared?)."""
        config = self.config
        self.layer, ref = storage.new_layer()
        self.layer_refs.append(ref)
        if config.incoming is None:
            backing, backing_format = config.image, "raw"
            self.ram_file, shared = ram_dir / "mem", True
        else:
            template = storage.Template(Path(config.incoming["template"]))
            frozen = storage.Layer(Path(config.incoming["layer"]))
            try:
                self.layer_refs += [template.hold(), frozen.hold()]
            except FileNotFoundError:
                raise BootError("the fork template is gone", code="FORK_TEMPLATE_NOT_FOUND") from None
            backing, backing_format = str(frozen.disk), "qcow2"
            self.ram_file, shared = template.mem, False
        await _check_call(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", backing, str(self.layer.disk)],
            what="create the disk overlay",
        )
        return self.ram_file, shared

    async def _bring_up(self, entry: registry.VmDir) -> None:
        """Until the agent answers: boot, or load a template's state and resume."""
        await _connect_qmp(self.qmp, entry.qmp_socket)
        if self.config.incoming is not None:
            template = storage.Template(Path(self.config.incoming["template"]))
            await _migrate(self.qmp, "migrate-incoming", {"uri": _exec_uri(f"cat {template.state}")})
            if (await self.qmp.execute("query-status"))["status"] != "running":
                await self.qmp.execute("cont")
        await self.connect_agent()
        if self.config.incoming is not None:
            resumed = await self.call_agent(
                "resumed",
                {"hostname": self.config.name, "time_ns": time.time_ns(), "entropy": secrets.token_bytes(64)},
            )
            self.agent_info = resumed

    async def _run(self, ram_dir: Path, report_ready) -> None:
        config, entry = self.config, self.entry
        started = time.monotonic()
        ram_file, ram_shared = await self._prepare_disk_and_ram(ram_dir)
        machine = qemu.MachineConfig(
            memory_mib=config.memory_mib,
            cpus=config.cpus,
            accel=config.accel,
            kernel=Path(config.kernel),
            initrd=Path(config.initrd),
            hostname=config.name,
            tsc_khz=config.tsc_khz,
        )
        argv = qemu.command_line(
            machine,
            ram_file=ram_file,
            ram_shared=ram_shared,
            incoming=config.incoming is not None,
            disk=self.layer.disk,
            console_log=entry.console_log,
            agent_socket=entry.agent_socket,
            qmp_socket=entry.qmp_socket,
        )
        # setpriv --pdeathsig: QEMU dies with its supervisor, even on SIGKILL.
        with open(entry.qemu_log, "wb") as qemu_log:
            process = await anyio.open_process(
                ["setpriv", "--pdeathsig", "KILL", "--", *argv],
                stdin=subprocess.DEVNULL,
                stdout=qemu_log,
                stderr=qemu_log,
            )
        log.info("qemu started", pid=process.pid, accel=config.accel, memory_mib=config.memory_mib)
        try:
            async with anyio.create_task_group() as tg:
                self.task_group = tg
                qemu_exited = anyio.Event()

                async def watch_qemu() -> None:
                    await process.wait()
                    qemu_exited.set()
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_qemu)
                try:
                    with anyio.fail_after(config.boot_timeout):
                        await self._bring_up(entry)
                except TimeoutError:
                    raise BootTimeoutError(
                        f"the guest agent did not answer within {config.boot_timeout:g} s; console tail:\n"
                        + console_tail(entry.console_log),
                    ) from None
                boot_s = time.monotonic() - started
                self.meta = {
                    "name": config.name,
                    "supervisor_pid": os.getpid(),
                    "qemu_pid": process.pid,
                    "accel": config.accel,
                    "memory_mib": config.memory_mib,
                    "cpus": config.cpus,
                    "image": config.image,
                    "ram_dir": config.ram_dir,
                    "detached": config.detached,
                    "forked_from": (config.incoming or {}).get("source"),
                    "started_at": time.time(),
                    "boot_s": round(boot_s, 3),
                    "socket": str(entry.supervisor_socket),
                }
                listener = await anyio.create_unix_listener(str(entry.supervisor_socket))
                entry.supervisor_socket.chmod(0o600)
                entry.write_meta(self.meta)
                tg.start_soon(self.agent_read_loop)
                tg.start_soon(listener.serve, self.serve_client)
                report_ready(self.meta)
                log.info("vm ready", boot_s=round(boot_s, 3), guest_uptime_s=self.agent_info.get("uptime_s"))
                await self.stop_requested.wait()
                log.info("stop requested")
                tg.cancel_scope.cancel()
            if qemu_exited.is_set():
                raise BootError(
                    f"QEMU exited with status {process.returncode}: "
                    + entry.qemu_log.read_text(errors="replace")[-CONSOLE_TAIL_BYTES:]
                    + "\nconsole tail:\n"
                    + console_tail(entry.console_log)
                )
        finally:
            with anyio.CancelScope(shield=True):
                await _stop_qemu(process, self.qmp)


async def _check_call(argv: list[str], *, what: str) -> None:
    result = await anyio.run_process(argv, check=False)
    if result.returncode != 0:
        raise BootError(f"cannot {what}: {result.stderr.decode(errors='replace').strip()}")


def _exec_uri(shell_command: str) -> str:
    # QEMU 7.2 has no file: migration URI; exec: runs the command with /bin/sh.
    return f"exec:{shell_command}"


async def _migrate(qmp: QMPClient, command: str, arguments: dict) -> None:
    """Save or load device state (RAM in shared files skipped) and wait for it."""
    await qmp.execute(
        "migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
    )
    await qmp.execute(command, arguments)
    while True:
        info = await qmp.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise MachinenError(
                f"{command} {status}: {info.get('error-desc', 'no detail')}", code="SNAPSHOT_DUMP_FAILED"
            )
        await anyio.sleep(0.002)


async def _release_later(ref: int, delay: float) -> None:
    try:
        await anyio.sleep(delay)
    finally:
        storage.close_quietly(ref)


async def _connect_qmp(qmp: QMPClient, socket_path: Path) -> None:
    while True:
        try:
            await qmp.connect(str(socket_path))
            return
        except Exception:  # qemu.qmp raises ConnectError wrapping OSError while QEMU starts
            await anyio.sleep(0.01)


async def _stop_qemu(process: anyio.abc.Process, qmp: QMPClient) -> None:
    if process.returncode is None:
        with contextlib.suppress(Exception), anyio.move_on_after(0.5):
            await qmp.execute("quit")
        with anyio.move_on_after(QEMU_QUIT_GRACE_S):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
    with contextlib.suppress(Exception), anyio.move_on_after(1):
        await qmp.disconnect()


async def _owner_lets_go() -> bool:
    """Wait on the launcher's pipe: True on EOF (owner gone), False on DETACH."""
    await anyio.wait_readable(0)
    return os.read(0, 1) != DETACH


async def amain(config: SupervisorConfig) -> int:
    ready_out = os.fdopen(os.dup(1), "w")

    def report(payload: dict) -> None:
        ready_out.write(json.dumps(payload) + "\n")
        ready_out.flush()
        ready_out.close()

    def report_ready(meta: dict) -> None:
        report({"ready": meta})
        # From here on nobody reads our stdout/stderr: log to the entry instead.
        log_fd = os.open(entry.supervisor_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)

    try:
        with plain_errors(), registry.claim(config.name) as entry:
            supervisor = Supervisor(config, entry)
            async with anyio.create_task_group() as tg:

                def request_stop() -> None:
                    if supervisor.meta:
                        supervisor.stop_requested.set()
                    else:
                        tg.cancel_scope.cancel()  # still booting: abandon the boot

                async def signals() -> None:
                    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as received:
                        async for signum in received:
                            log.info("signal", signum=int(signum))
                            request_stop()

                async def watch_owner() -> None:
                    if await _owner_lets_go():
                        log.info("owner process gone")
                        request_stop()
                    else:
                        log.info("detached")

                tg.start_soon(signals)
                tg.start_soon(watch_owner)
                await supervisor.run(report_ready)
                tg.cancel_scope.cancel()
            if not supervisor.meta:
                raise BootError("boot cancelled", code="BOOT_CANCELLED")
    except MachinenError as exc:
        if not ready_out.closed:
            report({"error": exc.to_dict()})
        log.error("failed", code=exc.code, message=exc.message)
        return 1
    return 0


def main() -> None:
    config = SupervisorConfig.from_json(sys.argv[1])
    structlog.configure(
        processors=[structlog.processors.TimeStamper(fmt="iso"), structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    os.umask(0o077)
    sys.exit(anyio.run(amain, config, backend="asyncio"))


if __name__ == "__main__":
    main()
