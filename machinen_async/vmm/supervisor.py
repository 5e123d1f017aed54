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
import functools
import json
import logging
import math
import os
import secrets
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from ..errors import BootError, BootTimeoutError, MachinenError, SnapshotError, error_from_code, plain_errors
from ..protocol import wire
from ..protocol.framing import FrameStream
from ..store import bundle, layers, paths, registry, sparse
from ..store.assets import immutable_file_digest
from . import backend, capped_log

log = structlog.get_logger("machinen.supervisor")

HELLO_RETRY_S = 0.2
# A fork template stays referenced by its source this long after the fork
# call returned, so the caller can take its own reference first.
TEMPLATE_HANDOVER_S = 120.0
AGENT_RECONNECT_TIMEOUT_S = 10.0
AGENT_SEND_STALL_S = 10.0
# A guest that breaks its channel over and over costs at most this many log lines and
# reconnects a minute; beyond them each reconnect waits RESET_BACKOFF_S, logged once.
RESETS_PER_WINDOW, RESET_BACKOFF_S = 5, 1.0
_CHANNEL_DOWN = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
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
    network: bool = True
    # Destinations the guest may reach although netguard closes them ("127.0.0.1:11434", ...).
    network_allow: list[str] = field(default_factory=list)
    image_source: str = ""  # the rootfs tarball the image was built from, for people reading a manifest
    image_key: str = ""  # the image's content key (its file may be named by sha256 when received)
    ports: list[list] = field(default_factory=list)  # [[host address, host port, guest port], ...]
    # The long-running command: {"cmd", "env", "cwd"}; None runs the image's default cmd, if any.
    workload: dict[str, Any] | None = None
    # Start from saved state instead of booting (fork sibling or restore):
    # a fork template: {state, mem, ram_in_state, chain, disk_size, holds, source};
    # a bundle: {bundle, files (the manifest's, to check the copies against), ram_in_state, chain, ...}
    incoming: dict[str, Any] | None = None

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
    """One caller: a socket client, or (``frames`` None) a port-forward tunnel of our own.

    Frames for it wait in ``outbox`` (their number is bounded by the credit
    windows) so the agent relay never waits for a client that is not reading.
    """

    def __init__(self, frames: FrameStream | None) -> None:
        self.frames = frames
        self.agent_sids: dict[int, int] = {}  # client sid -> agent sid
        self.outbox_send, self.outbox = anyio.create_memory_object_stream[list](math.inf)

    async def write_loop(self) -> None:
        with contextlib.suppress(*_CHANNEL_DOWN):  # gone: its read side ends the connection
            async for frame in self.outbox:
                await self.frames.send(frame)


@dataclass(eq=False)
class Route:
    """An agent call, the client call it belongs to, and what the agent may still send on it.

    The guest may be hostile: it gets no more output window than the client
    granted, and only the frames an agent sends on a call."""

    client: ClientConnection
    client_sid: int
    window: dict[int, int] = field(
        default_factory=lambda: {wire.STDOUT: wire.INITIAL_WINDOW, wire.STDERR: wire.INITIAL_WINDOW}
    )
    closed: set[int] = field(default_factory=set)  # fds whose EOF was relayed

    def late(self, frame: list) -> bool:
        """Output on an fd after its EOF: dropped, not relayed (agents before 0.2 could race
        a detached pump's last frames against its EOF; it costs nothing here)."""
        return frame[0] in (wire.DATA, wire.EOF) and frame[2] in self.closed

    def refuse(self, frame: list) -> str | None:
        """Why the agent may not send ``frame`` (validated) on this call; None if it may."""
        kind = frame[0]
        if kind in (wire.DATA, wire.EOF):
            fd = frame[2]
            if fd not in self.window:
                return f"output on fd {fd}, which is not open"
            if kind == wire.EOF:
                self.closed.add(fd)
                return None
            self.window[fd] -= len(frame[3])
            return f"more output on fd {fd} than the client's credit" if self.window[fd] < 0 else None
        if kind == wire.CREDIT:
            return None if frame[2] == wire.STDIN else f"credit for fd {frame[2]}"
        return None if kind in wire.FINAL_KINDS else f"a frame of kind {kind}"


class Supervisor:
    def __init__(self, config: SupervisorConfig, entry: registry.VmDir) -> None:
        self.config = config
        self.entry = entry
        self.agent: FrameStream | None = None
        self.agent_up = False
        self.agent_session = 0  # counts agent sessions; a frame queued for an earlier one is dropped
        self.to_agent_send, self.to_agent = anyio.create_memory_object_stream[tuple[int, list]](math.inf)
        self.agent_info: dict[str, Any] = {}
        self.routes: dict[int, Route] = {}  # by agent sid
        self.next_agent_sid = 1
        self.stop_requested = anyio.Event()
        self.meta: dict[str, Any] = {}
        self.backend = backend.default()
        self.machine: backend.Machine | None = None  # while the VMM runs
        self.forwards: list[anyio.abc.SocketListener] = []
        self.capture_lock = anyio.Lock()
        self.chain: list[list[str]] = []  # disk chain, top (writable) first: [path, format]
        self.disk_size = 0
        self.layer_refs: list[int] = []  # flock references on every layer and template we use
        self.ram_file: Path | None = None
        self.ram_shared = True
        self.state_file: Path | None = None  # device state to load (restore, fork sibling)
        self.task_group: anyio.abc.TaskGroup | None = None
        self.paused_for: ClientConnection | None = None  # the client whose handoff holds the VM paused

    # --- the agent side -----------------------------------------------------------

    async def connect_agent(self, *, resume: anyio.Event | None = None) -> None:
        """Connect to the agent socket and complete a HELLO exchange.

        With ``resume`` (a restored or forked VM), the HELLO goes out once the
        state is loaded (``resume`` set), just before the guest continues,
        and carries the sibling's identity: hostname, the host's time (fresh
        in every retry) and entropy.  The agent applies it on the new session
        before answering, so no separate call is needed.
        """
        while True:
            try:
                stream = await anyio.connect_unix(str(self.entry.agent_socket))
                break
            except OSError:
                await anyio.sleep(0.01)
        # A guest that stops reading its port must not hold our writer (and everything queued
        # behind it) forever: past the stall limit the channel counts as broken and is reset.
        self.agent = FrameStream(
            stream,
            resync=True,
            max_frame=wire.MAX_GUEST_FRAME,
            check=wire.validate,
            send_stall_limit=AGENT_SEND_STALL_S,
        )
        try:
            await self._hello(resume)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.agent.aclose()
            raise

    async def _hello(self, resume: anyio.Event | None) -> None:
        nonce = secrets.token_bytes(8)

        async def send_hellos() -> None:
            if resume is not None:
                await resume.wait()
            with contextlib.suppress(*_CHANNEL_DOWN):  # broken: the receive below says so
                while True:
                    params = {"resume": self._identity()} if resume is not None else {}
                    await self.agent.send([wire.HELLO, 0, nonce, wire.PROTOCOL_VERSION, params])
                    await anyio.sleep(HELLO_RETRY_S)

        async with anyio.create_task_group() as tg:
            tg.start_soon(send_hellos)
            while True:
                frame = await self.agent.receive()
                if frame[0] == wire.HELLO and frame[2] == nonce:
                    self.agent_info = frame[4]
                    self.agent.resync = False
                    self.agent_session += 1
                    self.agent_up = True
                    tg.cancel_scope.cancel()
                    break

    def _identity(self) -> dict[str, Any]:
        """What a restored or forked guest takes on: its name, the host's time, fresh entropy."""
        return {"hostname": self.config.name, "time_ns": time.time_ns(), "entropy": secrets.token_bytes(64)}

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

    def send_to_agent(self, frame: list) -> bool:
        """Queue ``frame`` for the agent; False while the channel is down (being re-established).

        Never waits: a guest that is slow to read its port (or paused) must not
        stall the client loop that relays a frame, nor that client's other calls,
        nor other clients.  The queue is bounded by the credit windows."""
        if self.agent is None or not self.agent_up:
            return False
        if frame[0] == wire.CREDIT and (route := self.routes.get(frame[1])) and frame[2] in route.window:
            route.window[frame[2]] += frame[3]
        self.to_agent_send.send_nowait((self.agent_session, frame))
        return True

    async def agent_write_loop(self) -> None:
        async for session, frame in self.to_agent:
            if session != self.agent_session:
                continue  # for a session that was reset: its calls have already failed
            with contextlib.suppress(*_CHANNEL_DOWN):  # the read loop sees the reset and reconnects
                await self.agent.send(frame)

    async def _reconnect_agent(self) -> None:
        """Until the agent answers a HELLO again.  A guest whose agent stays silent keeps
        running (and can be stopped, snapshotted, reset); its calls fail as unavailable."""
        attempts, connected = 0, False
        while not connected:
            attempts += 1
            try:
                with anyio.fail_after(AGENT_RECONNECT_TIMEOUT_S):
                    await self.connect_agent()
                connected = True
            except* (TimeoutError, *_CHANNEL_DOWN, anyio.EndOfStream, wire.ProtocolError):
                if attempts == 1:
                    log.error("guest agent does not answer after a channel reset; still trying")
        log.info("agent channel re-established", attempts=attempts)

    def fail_all_calls(self, message: str) -> None:
        for route in self.routes.values():
            route.client.agent_sids.pop(route.client_sid, None)
            route.client.outbox_send.send_nowait([wire.ERROR, route.client_sid, "EXEC_AGENT_UNAVAILABLE", message])
        self.routes.clear()

    async def agent_read_loop(self) -> None:
        """Relay agent frames to clients; on a channel reset, reconnect.

        Calls in flight fail with EXEC_AGENT_UNAVAILABLE (retryable); their
        guest processes keep running, orphaned, as after a restore.
        """
        resets = capped_log.Budget(RESETS_PER_WINDOW, capped_log.BUDGET_WINDOW_S)
        while True:
            try:
                frame = await self.agent.receive()
            except (*_CHANNEL_DOWN, anyio.EndOfStream, wire.ProtocolError) as exc:
                within_budget = resets.spend()
                if within_budget:
                    log.warning("agent channel reset", error=repr(exc))
                elif resets.just_exhausted:
                    log.warning("agent channel keeps resetting: reconnects slowed, not logged for a while")
                self.agent_up = False
                self.fail_all_calls("the guest agent channel was reset")
                with contextlib.suppress(*_CHANNEL_DOWN):
                    await self.agent.aclose()
                if not within_budget:
                    await anyio.sleep(RESET_BACKOFF_S)
                await self._reconnect_agent()
                continue
            agent_sid = frame[1]
            route = self.routes.get(agent_sid)
            if route is None:
                continue  # late output of a call whose client left (or a stray HELLO)
            if route.late(frame):
                continue
            problem = route.refuse(frame)
            if problem is not None:
                log.warning("guest agent broke the protocol", call=agent_sid, problem=problem)
                frame = [wire.ERROR, agent_sid, "EXEC_PROTOCOL", f"the guest agent broke the protocol: {problem}"]
                self.send_to_agent([wire.CANCEL, agent_sid])
            if frame[0] in wire.FINAL_KINDS:
                del self.routes[agent_sid]
                route.client.agent_sids.pop(route.client_sid, None)
            frame[1] = route.client_sid
            route.client.outbox_send.send_nowait(frame)

    # --- the client side ----------------------------------------------------------

    async def serve_client(self, stream: anyio.abc.ByteStream) -> None:
        client = ClientConnection(FrameStream(stream, check=wire.validate))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.write_loop)
                while True:
                    try:
                        frame = await client.frames.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, wire.ProtocolError, OSError):
                        break
                    self.on_client_frame(client, frame, tg)
                tg.cancel_scope.cancel()
        finally:
            # A caller that went away abandons its calls: stop their processes.
            for agent_sid in list(client.agent_sids.values()):
                self.routes.pop(agent_sid, None)
                self.send_to_agent([wire.CANCEL, agent_sid])
            with anyio.CancelScope(shield=True):
                await self.resume(client)  # a handoff whose client vanished: carry on here
                await client.frames.aclose()

    def on_client_frame(self, client: ClientConnection, frame: list, tg: anyio.abc.TaskGroup) -> None:
        """Route one client frame without waiting for anything, so the next one is read at once."""
        kind, sid = frame[0], frame[1]
        if kind == wire.HELLO:
            client.outbox_send.send_nowait([wire.HELLO, 0, frame[2], wire.PROTOCOL_VERSION, self.meta])
        elif kind == wire.OPEN and frame[2].startswith("vm."):
            tg.start_soon(self.handle_local_call, client, sid, frame[2], frame[3])
        elif kind == wire.OPEN:
            self.open_agent_call(client, sid, frame[2], frame[3])
        else:
            agent_sid = client.agent_sids.get(sid)
            if agent_sid is None:
                return
            if kind == wire.CANCEL:
                del client.agent_sids[sid]
                self.routes.pop(agent_sid, None)
            frame[1] = agent_sid
            self.send_to_agent(frame)

    def open_agent_call(self, client: ClientConnection, sid: int, method: str, params: dict) -> int | None:
        """Route a new call of ``client`` to the agent; its frames will arrive in ``client.outbox``."""
        agent_sid = self.next_agent_sid
        self.next_agent_sid += 1
        self.routes[agent_sid] = Route(client, sid)
        client.agent_sids[sid] = agent_sid
        if self.send_to_agent([wire.OPEN, agent_sid, method, params]):
            return agent_sid
        self.routes.pop(agent_sid, None)
        client.agent_sids.pop(sid, None)
        client.outbox_send.send_nowait(
            [wire.ERROR, sid, "EXEC_AGENT_UNAVAILABLE", "the guest agent channel is being re-established"]
        )
        return None

    # --- port forwards --------------------------------------------------------------

    async def bind_forwards(self) -> list[anyio.abc.SocketListener]:
        """Bind every host port now, before QEMU starts, so a conflict fails fast."""
        listeners = []
        try:
            for address, host_port, _ in self.config.ports:
                try:
                    listeners.append(await anyio.create_tcp_listener(local_host=address, local_port=host_port))
                except OSError as exc:
                    raise BootError(
                        f"host port {address}:{host_port} is in use by {_port_holder(host_port)} ({exc.strerror})",
                        code="BOOT_PORT_FORWARD_IN_USE",
                        port=host_port,
                    ) from None
        except BaseException:
            for listener in listeners:
                await listener.aclose()
            raise
        return listeners

    async def serve_forward(self, guest_port: int, connection: anyio.abc.SocketStream) -> None:
        """Relay one host TCP connection to ``guest_port`` through an agent tunnel.

        The directions are independent, as on a direct connection: guest bytes
        wait for the TCP client in a task of their own, so a client that is not
        reading (yet) never holds up the CREDIT that lets its upload go on.
        """
        tunnel = ClientConnection(None)
        upload_credit = wire.INITIAL_WINDOW  # how much more the agent lets us send
        credit_granted = anyio.Event()
        to_host_send, to_host = anyio.create_memory_object_stream[bytes](math.inf)  # bounded by the agent's credit
        delivered = anyio.Event()  # everything the guest sent reached the TCP client
        async with connection:
            agent_sid = self.open_agent_call(tunnel, 1, "tunnel", {"port": guest_port})
            if agent_sid is None:
                return
            finished = False
            try:
                async with anyio.create_task_group() as tg:

                    async def host_to_guest() -> None:
                        nonlocal upload_credit, credit_granted
                        while True:
                            while upload_credit <= 0:
                                await credit_granted.wait()
                                credit_granted = anyio.Event()
                            try:
                                data = await connection.receive(min(upload_credit, wire.CHUNK))
                            except (anyio.EndOfStream, *_CHANNEL_DOWN):
                                break
                            upload_credit -= len(data)
                            self.send_to_agent([wire.DATA, agent_sid, wire.STDIN, data])
                        self.send_to_agent([wire.EOF, agent_sid, wire.STDIN])

                    async def guest_to_host() -> None:
                        try:
                            async for data in to_host:
                                await connection.send(data)
                                self.send_to_agent([wire.CREDIT, agent_sid, wire.STDOUT, len(data)])
                            await connection.send_eof()
                        except _CHANNEL_DOWN:
                            tg.cancel_scope.cancel()  # the TCP client went away: abandon the tunnel
                        finally:
                            delivered.set()

                    tg.start_soon(host_to_guest)
                    tg.start_soon(guest_to_host)
                    async for frame in tunnel.outbox:
                        kind = frame[0]
                        if kind == wire.DATA:
                            to_host_send.send_nowait(frame[3])
                        elif kind == wire.EOF:
                            to_host_send.close()
                        elif kind == wire.CREDIT:
                            upload_credit += frame[3]
                            credit_granted.set()
                        else:
                            finished = True
                            break
                    to_host_send.close()
                    await delivered.wait()
                    tg.cancel_scope.cancel()
            finally:
                if not finished:
                    self.routes.pop(agent_sid, None)
                    self.send_to_agent([wire.CANCEL, agent_sid])

    async def handle_local_call(self, client: ClientConnection, sid: int, method: str, params: dict) -> None:
        try:
            if method == "vm.info":
                result: Any = self.meta
            elif method == "vm.reset_agent_channel":
                # Drop and re-establish the agent channel (a new agent session), as a
                # restore does; for recovering a wedged channel and for tests.
                old = self.agent
                await old.aclose()
                while self.agent is old or not self.agent_up:
                    await anyio.sleep(0.01)
                result = {"agent": self.agent_info}
            elif method == "vm.fork_template":
                result = await self.freeze_template(params.get("bundle"))
            elif method == "vm.snapshot":
                result = await self.snapshot(params["dir"], paused_for=client if params.get("stay_paused") else None)
            elif method == "vm.resume":
                result = {"resumed": await self.resume(client)}
            elif method == "vm.stop":
                self.stop_requested.set()
                result = {"stopping": True}
            else:
                raise MachinenError(f"unknown method {method!r}", code="EXEC_PROTOCOL")
        except MachinenError as exc:
            client.outbox_send.send_nowait([wire.ERROR, sid, exc.code, exc.message])
            return
        except Exception as exc:  # a QMP or OS failure fails this call, not the VM
            log.exception("call failed", method=method)
            client.outbox_send.send_nowait(
                [wire.ERROR, sid, "VM_CALL_FAILED", f"{method}: {type(exc).__name__}: {exc}"]
            )
            return
        client.outbox_send.send_nowait([wire.RESULT, sid, result])

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
          goes into ``state`` by live (pre-copy) migration, so the guest runs
          while most of it streams and stops only for the last dirty pages.
        """
        layer, layer_ref = layers.new_layer()
        steps: dict[str, float] = {}
        clock = time.monotonic()

        def step(name: str) -> None:
            nonlocal clock
            now = time.monotonic()
            steps[name] = round((now - clock) * 1000, 2)
            clock = now

        frozen: list[list[str]] | None = None
        try:
            if self.ram_shared:
                await self.machine.pause()
                step("stop")
                frozen = await self._freeze_disk(layer, layer_ref)
                step("freeze_disk")
                await self.machine.save_state(state, ram=False)
                step("save_state")
                if mem is not None:
                    await anyio.to_thread.run_sync(sparse.copy, self.ram_file, mem)
                    step("copy_ram")
            else:
                stopped_ms = await self.machine.save_state(state, ram=True)
                step("stream_ram_live")
                steps["stopped_for_last_pages"] = stopped_ms
                frozen = await self._freeze_disk(layer, layer_ref)  # the guest is stopped (postmigrate)
                step("freeze_disk")
        finally:
            if frozen is None:
                layers.close_quietly(layer_ref)
            if frozen is None or not stay_paused:
                await self.machine.resume()
        step("resume")
        paused = ("stop", "freeze_disk", "save_state", "copy_ram", "stopped_for_last_pages", "resume")
        steps["total"] = round(sum(steps.get(name, 0.0) for name in paused), 2)
        return frozen, steps

    async def _freeze_disk(self, layer: layers.Layer, layer_ref: int) -> list[list[str]]:
        """Put a fresh qcow2 layer on top of the disk; return the now-frozen chain."""
        await self.machine.freeze_disk(layer.disk)
        frozen = list(self.chain)
        self.chain = [[str(layer.disk), "qcow2"], *frozen]
        self.layer_refs.append(layer_ref)
        return frozen

    def _visible_to_vmm(self) -> tuple[list[Path], list[Path]]:
        """What a confined VMM of this VM sees: (read-only, writable) paths."""
        config = self.config
        stores = [paths.private_dir(layers.layers_dir()), paths.private_dir(layers.templates_dir())]
        read_only = [Path(config.kernel), Path(config.initrd), Path(config.image)]
        return read_only, [self.entry.path, Path(config.ram_dir), *stores]

    def _machine(self) -> dict[str, Any]:
        keys = ("memory_mib", "cpus", "accel", "kernel", "initrd", "image", "image_source", "image_key", "tsc_khz",
                "network", "network_allow")  # fmt: skip
        return {k: getattr(self.config, k) for k in keys}

    async def freeze_template(self, bundle_dir: str | None = None) -> dict[str, Any]:
        """Capture this running VM as a template that fork siblings start from.

        With ``bundle_dir``, also write a snapshot bundle of that same instant
        (after the VM continues): siblings on other hosts start from it."""
        async with self.capture_lock:
            if self.paused_for is not None:
                raise MachinenError("the VM is paused for a handoff", code="FORK_VM_PAUSED")
            template, template_ref = layers.new_template()
            try:
                chain, steps = await self._capture(template.state, template.mem)
                if not self.ram_shared:
                    started = time.monotonic()
                    await self._unpack_ram(template, chain)
                    steps["unpack_ram_after_resume"] = round((time.monotonic() - started) * 1000, 2)
            except BaseException:
                layers.close_quietly(template_ref)
                raise
        if bundle_dir is not None:
            target = bundle.create_dir(Path(bundle_dir))
            try:
                for source, name in ((template.state, bundle.STATE), (template.mem, bundle.MEM)):
                    await anyio.to_thread.run_sync(sparse.copy, source, target / name)
                await self._seal_bundle(target, chain)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    bundle.remove_partial(target)
                    layers.close_quietly(template_ref)
                raise
        # Our reference only bridges the gap until the caller takes its own.
        self.task_group.start_soon(_release_later, template_ref, TEMPLATE_HANDOVER_S)
        log.info("fork template", template=template.id, pause_ms=steps["total"])
        return {
            "state": str(template.state),
            "mem": str(template.mem),
            "ram_in_state": False,
            "chain": chain,
            "disk_size": self.disk_size,
            "holds": [str(template.path), *_layer_dirs(chain)],
            "source": self.config.name,
            "pause_ms": steps["total"],
            "pause_steps_ms": steps,
            "machine": self._machine(),
        }

    async def _unpack_ram(self, template: layers.Template, chain: list[list[str]]) -> None:
        """Turn a RAM-carrying state into a RAM file plus device state.

        A fork sibling's RAM arrives inside ``state``.  Loaded by every one of
        its own siblings, each would hold a full private copy; instead a
        paused helper QEMU loads it once into the template's shared RAM file
        and saves device state without RAM, so they all map one file
        copy-on-write.  This VM is already running again meanwhile.
        """
        full_state = template.path / "state.full"
        template.state.rename(full_state)
        scratch, scratch_ref = layers.new_layer()  # the helper's disk top, never written
        try:
            await self.backend.create_overlay(scratch.disk, chain[0], self.disk_size)
            helper = self._launch(
                ram_file=template.mem, ram_shared=True, incoming=True, never_run=True,
                disk_chain=[[str(scratch.disk), "qcow2"], *chain],
                agent_socket=scratch.path / "agent.sock", control_socket=scratch.path / "qmp.sock",
            )  # fmt: skip
            async with self.backend.start(helper) as machine:
                await machine.connect()
                await machine.load_state(full_state, ram=True)
                await machine.save_state(template.state, ram=False)
        finally:
            full_state.unlink(missing_ok=True)
            layers.close_quietly(scratch_ref)

    def _launch(self, **where: Any) -> backend.Launch:
        """A VMM launch of this VM's machine; ``where``: its RAM, disk and sockets."""
        config = self.config
        spec = backend.MachineSpec(
            memory_mib=config.memory_mib,
            cpus=config.cpus,
            accel=config.accel,
            kernel=Path(config.kernel),
            initrd=Path(config.initrd),
            hostname=config.name,
            tsc_khz=config.tsc_khz,
            network=config.network,
        )
        read_only, writable = self._visible_to_vmm()
        return backend.Launch(spec=spec, read_only=read_only, writable=writable,
                              network_allow=tuple(config.network_allow), **where)  # fmt: skip

    async def snapshot(self, directory: str, *, paused_for: ClientConnection | None = None) -> dict[str, Any]:
        """Write a bundle of this running VM to ``directory``; the VM keeps running,
        unless ``paused_for`` a client: then it stays paused until that client
        resumes it or goes away (a handoff in progress)."""
        target = bundle.create_dir(Path(directory))
        try:
            async with self.capture_lock:
                if self.paused_for is not None:
                    raise SnapshotError("the VM is paused for a handoff", code="SNAPSHOT_VM_PAUSED")
                chain, steps = await self._capture(
                    target / bundle.STATE, target / bundle.MEM, stay_paused=paused_for is not None
                )
                self.paused_for = paused_for
            started = time.monotonic()
            manifest = await self._seal_bundle(target, chain)
        except BaseException:
            with anyio.CancelScope(shield=True):
                bundle.remove_partial(target)
                if paused_for is not None:
                    await self.resume(paused_for)
            raise
        write_ms = round((time.monotonic() - started) * 1000, 2)
        log.info("snapshot", bundle=str(target), pause_ms=steps["total"], write_ms=write_ms)
        return {"bundle": str(target), "pause_ms": steps["total"], "pause_steps_ms": steps,
                "write_ms": write_ms, "files": manifest.data["files"]}  # fmt: skip

    async def _seal_bundle(self, target: Path, chain: list[list[str]]) -> bundle.Manifest:
        """Finish a bundle whose state (and RAM) are in place: its disk, then the manifest."""
        # Flatten everything above the base image into one file: the bundle
        # must not depend on this host's layer files.
        base = chain[-1][0]
        await self.backend.flatten_disk(chain, target / bundle.DISK)
        machine = self._machine()
        fields = {
            "created": time.time(),
            "source": self.config.name,
            "qemu_version": await self.machine.version(),
            "machine": {"type": self.backend.machine_type, "disk_size": self.disk_size,
                        **{k: machine[k] for k in ("memory_mib", "cpus", "accel", "tsc_khz", "network")}},
            "kernel": {"sha256": await anyio.to_thread.run_sync(immutable_file_digest, Path(machine["kernel"]))},
            "initrd": {"sha256": await anyio.to_thread.run_sync(immutable_file_digest, Path(machine["initrd"]))},
            "image": {"key": self.config.image_key or Path(base).stem, "tarball": self.config.image_source,
                      "sha256": await anyio.to_thread.run_sync(immutable_file_digest, Path(base))},
        }  # fmt: skip
        return await anyio.to_thread.run_sync(bundle.seal, target, fields)

    async def resume(self, client: ClientConnection) -> bool:
        """Continue a VM that ``client`` paused; False if it was not paused by it."""
        if self.paused_for is not client:
            return False
        self.paused_for = None
        await self.machine.resume()
        return True

    # --- lifecycle ----------------------------------------------------------------

    async def run(self, report_ready) -> None:
        ram_dir = Path(self.config.ram_dir)
        paths.private_dir(ram_dir.parent)
        paths.private_dir(ram_dir)
        try:
            await self._run(ram_dir, report_ready)
        finally:
            with anyio.CancelScope(shield=True):
                for forward in self.forwards:
                    await forward.aclose()
            for ref in self.layer_refs:
                layers.close_quietly(ref)
            shutil.rmtree(ram_dir, ignore_errors=True)
            layers.collect_garbage()

    async def _prepare_disk_and_ram(self, ram_dir: Path) -> None:
        """Create this VM's writable layer and decide where its RAM lives.

        Booted and restored VMs own a shared RAM file (so they fork cheaply);
        fork siblings map their template's RAM privately (copy-on-write).
        """
        config, incoming = self.config, self.config.incoming
        if incoming is None:
            self.chain = [[config.image, "raw"]]
            self.disk_size = os.stat(config.image).st_size
        else:
            try:
                self.layer_refs += [layers.Shared(Path(p)).hold() for p in incoming["holds"]]
            except FileNotFoundError:
                raise BootError("the fork template is gone", code="FORK_TEMPLATE_NOT_FOUND") from None
            self.chain, self.disk_size = incoming["chain"], incoming["disk_size"]
        self.ram_file, self.ram_shared = ram_dir / "mem", True
        if incoming is not None and incoming.get("bundle"):
            # Restored from a bundle: each file is copied (so the bundle stays untouched) and
            # hashed as it is copied; QEMU opens only the copies.
            source, expected = Path(incoming["bundle"]), incoming["files"]
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
            self.state_file = Path(incoming["state"])
            self.ram_file, self.ram_shared = Path(incoming["mem"]), False
        layer, ref = layers.new_layer()
        self.layer_refs.append(ref)
        await self.backend.create_overlay(layer.disk, self.chain[0], self.disk_size)
        self.chain = [[str(layer.disk), "qcow2"], *self.chain]

    async def _bring_up(self, entry: registry.VmDir) -> None:
        """Until the agent answers: boot, or load saved state and resume."""
        await self.machine.connect()
        incoming = self.config.incoming
        if incoming is None:
            await self.connect_agent()
        else:
            # Our HELLO (with the sibling's identity) waits in the socket when the guest
            # continues, so the resumed agent answers at once instead of polling for a host.
            state_loaded = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(self.connect_agent, resume=state_loaded))
                await self.machine.load_state(self.state_file, ram=incoming["ram_in_state"])
                state_loaded.set()
                if incoming.get("bundle"):
                    self.state_file.unlink()  # our checked copy, loaded (a template's stays for its siblings)
                if not await self.machine.is_running():
                    await self.machine.resume()
        if incoming is None:
            workload = await self.call_agent("workload_start", self.config.workload or {"from_image": True})
            if not workload["running"] and workload["exit_code"] == 127:
                raise BootError(f"cannot start the workload {workload['argv']!r}", code="BOOT_CMD_NOT_FOUND")
        elif self.agent_info.get("hostname") != self.config.name:
            # An agent from before identity travelled in HELLO (an older bundle's RAM).
            self.agent_info = await self.call_agent("resumed", self._identity())

    async def _run(self, ram_dir: Path, report_ready) -> None:
        config, entry = self.config, self.entry
        started = time.monotonic()
        self.forwards = await self.bind_forwards()
        await self._prepare_disk_and_ram(ram_dir)
        launch = self._launch(
            ram_file=self.ram_file, ram_shared=self.ram_shared, incoming=config.incoming is not None,
            disk_chain=self.chain, agent_socket=entry.agent_socket, control_socket=entry.qmp_socket,
            logs=(entry.console_log, entry.qemu_log),
        )  # fmt: skip
        async with self.backend.start(launch) as machine:
            self.machine = machine
            try:
                await self._supervise(started, report_ready)
            finally:
                self.machine = None

    async def _supervise(self, started: float, report_ready) -> None:
        """From QEMU's start until the VM stops (or fails to come up)."""
        config, entry = self.config, self.entry
        async with anyio.create_task_group() as tg:
            self.task_group = tg
            exit_status: list[int] = []

            async def watch_qemu() -> None:
                exit_status.append(await self.machine.exited())
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
                "qemu_pid": self.machine.pid,
                "accel": config.accel,
                "memory_mib": config.memory_mib,
                "cpus": config.cpus,
                "image": config.image,
                "ram_dir": config.ram_dir,
                "detached": config.detached,
                "forked_from": (config.incoming or {}).get("source"),
                "network": config.network,
                "network_allow": config.network_allow,
                "ports": config.ports,
                "started_at": time.time(),
                "boot_s": round(boot_s, 3),
                "socket": str(entry.supervisor_socket),
            }
            listener = await anyio.create_unix_listener(str(entry.supervisor_socket))
            entry.supervisor_socket.chmod(0o600)
            entry.write_meta(self.meta)
            tg.start_soon(self.agent_read_loop)
            tg.start_soon(self.agent_write_loop)
            tg.start_soon(listener.serve, self.serve_client)
            for forward, (_, _, guest_port) in zip(self.forwards, config.ports, strict=True):
                tg.start_soon(forward.serve, functools.partial(self.serve_forward, guest_port))
            report_ready(self.meta)
            log.info("vm ready", boot_s=round(boot_s, 3), guest_uptime_s=self.agent_info.get("uptime_s"))
            await self.stop_requested.wait()
            log.info("stop requested")
            tg.cancel_scope.cancel()
        if exit_status:
            raise BootError(
                f"QEMU exited with status {exit_status[0]}: "
                + entry.qemu_log.read_text(errors="replace")[-CONSOLE_TAIL_BYTES:]
                + "\nconsole tail:\n"
                + console_tail(entry.console_log)
            )


def _port_holder(host_port: int) -> str:
    """The VM forwarding ``host_port``, for the error message, else "another process"."""
    for entry in registry.live_vms():
        meta = entry.read_meta() or {}
        if any(port == host_port for _, port, _ in meta.get("ports", [])):
            return f"VM {entry.name!r}"
    return "another process"


def _layer_dirs(chain: list[list[str]]) -> list[str]:
    """The shared layer directories a disk chain runs through."""
    root = layers.layers_dir()
    return [str(Path(path).parent) for path, _ in chain if Path(path).parent.parent == root]


async def _release_later(ref: int, delay: float) -> None:
    try:
        await anyio.sleep(delay)
    finally:
        layers.close_quietly(ref)


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


def run(config_json: str) -> int:
    """Supervise one VM until it stops; the process exit code."""
    config = SupervisorConfig.from_json(config_json)
    structlog.configure(
        processors=[structlog.processors.TimeStamper(fmt="iso"), structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    os.umask(0o077)
    return anyio.run(amain, config, backend="asyncio")


def main() -> None:
    sys.exit(run(sys.argv[1]))


if __name__ == "__main__":
    main()
