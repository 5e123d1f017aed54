"""``Supervisor``: brings one VM up, serves its clients until asked to stop, takes it down.

It composes the agent relay, the capture of disk and RAM, and the port
forwards; the calls named ``vm.*`` are answered here, from ``local_calls``.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import anyio
import anyio.abc
import structlog

from ..errors import BootError, BootTimeoutError, ExecTimeoutError, MachinenError
from ..protocol import wire
from ..protocol.framing import FrameStream
from ..protocol.messages import checked_ttl, idle_snapshot_dir
from ..protocol.netpolicy import NetworkPolicy
from ..protocol.secret import DEFAULT_HEADERS, SecretRule, SecretSlot
from ..store import layers, paths, registry
from ..vmm import backend, capped_log
from . import forwards, metrics, mounts
from .capture import Capture
from .config import SupervisorConfig, check_workload_started
from .relay import AgentRelay, ClientConnection

log: structlog.typing.FilteringBoundLogger = structlog.get_logger("machinen.supervisor")

# vm.reset_agent_channel without a timeout of its own: how long the agent has to answer the new session.
RESET_TIMEOUT_S = 30.0

# How often an idle_timeout's watch looks whether calls are in progress.  A call is counted as
# running until the look after it, at the latest, so an idle VM is never stopped early.
IDLE_POLL_S = 0.5
# Calls that only look at the VM (``machinen ls --json`` and ``machinen top`` ask every VM for its
# metrics): not a use of it, so they do not keep an idle VM running.
LOOKING_CALLS = frozenset({"vm.info", "vm.metrics"})

LocalCall = Callable[[ClientConnection, "wire.Params"], Awaitable["wire.Params"]]
ReportReady = Callable[["wire.Params"], None]  # called with the VM's meta once it is up


class Supervisor:
    def __init__(self, config: SupervisorConfig, entry: registry.VmDir) -> None:
        self.config: SupervisorConfig = config
        self.entry = entry
        self.relay: AgentRelay = AgentRelay(entry.agent_socket, config.name)
        self.capture: Capture = Capture(config, entry)
        self.forwards: list[forwards.Forward] = []
        self.mounts: list[mounts.HostDirectory] = []
        self.stop_requested: anyio.Event = anyio.Event()
        self.meta: wire.Params = {}  # VMInfo once the VM is up
        self.secrets: list[SecretRule] = []  # in memory only: never in meta.json, a bundle or a log
        self.deadline_moved: anyio.Event = anyio.Event()  # set (and replaced) by each vm.extend
        self.own_work_running: int = 0  # vm.* calls and port-forwarded connections in progress
        self.calls_ended_by: float = time.monotonic()  # the last call known ended by then at the latest
        self.local_calls: dict[str, LocalCall] = {
            "vm.info": self._info,
            "vm.reset_agent_channel": self._reset_agent_channel,
            "vm.fork_template": self._fork_template,
            "vm.snapshot": self._snapshot,
            "vm.resume": self._resume,
            "vm.stop": self._stop,
            "vm.extend": self._extend,
            "vm.metrics": self._metrics,
            "vm.set_network": self._set_network,
            "vm.set_secrets": self._set_secrets,
            "vm.secret_values": self._secret_values,
        }

    # --- lifecycle ----------------------------------------------------------------

    async def run(self, report_ready: ReportReady) -> None:
        ram_dir = Path(self.config.ram_dir)
        paths.private_dir(ram_dir.parent)
        paths.private_dir(ram_dir)
        try:
            await self._run(ram_dir, report_ready)
        finally:
            with anyio.CancelScope(shield=True):
                for forward in self.forwards:
                    await forward.aclose()
                for directory in self.mounts:
                    directory.close()
            self.capture.release_layers()
            shutil.rmtree(ram_dir, ignore_errors=True)
            layers.collect_garbage()

    async def _run(self, ram_dir: Path, report_ready: ReportReady) -> None:
        started = time.monotonic()
        self.forwards = await forwards.bind_forwards(self.config.ports)
        for source, _, read_only in self.config.mounts:
            self.mounts.append(mounts.HostDirectory(source, read_only))
        await self.capture.prepare_disk_and_ram(ram_dir)
        async with self.capture.running() as machine:
            await self._supervise(machine, started, report_ready)

    async def _bring_up(self, machine: backend.Machine) -> None:
        """Until the agent answers: boot, or load saved state and resume."""
        await machine.connect()
        incoming = self.config.incoming
        if incoming is None:
            await self.relay.connect(new_identity=True)
        else:
            # Our HELLO (with the sibling's identity) waits in the socket when the guest
            # continues, so the resumed agent answers at once instead of polling for a host.
            state_file = self.capture.state_file
            state_loaded = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(self.relay.connect, resume=state_loaded))
                await machine.load_state(state_file, ram=incoming.ram_in_state)
                state_loaded.set()
                if incoming.bundle:
                    state_file.unlink()  # our checked copy, loaded (a template's stays for its siblings)
                if not await machine.is_running():
                    await machine.resume()
            if self.relay.agent_info.get("hostname") != self.config.name:
                await self.relay.send_identity()
        if incoming is None and self.config.boot_template:
            await self._capture_boot_template(Path(self.config.boot_template))
        if incoming is None or self.config.warm:  # a boot: nothing of the caller's ran yet
            for _, target, read_only in self.config.mounts:  # there before the workload starts
                await self.relay.call("mount_prepare", {"target": target, "read_only": read_only})
            if self.config.start_workload:
                workload = await self.relay.call("workload_start", self.config.workload or {"from_image": True})
                check_workload_started(workload)
        for target in self.config.unmounts:
            await self.relay.call("mount_drop", {"target": target})

    async def _capture_boot_template(self, directory: Path) -> None:
        """The boot template later boots resume from; one that cannot be captured only costs them
        their warm start (the launcher publishes nothing incomplete), never this boot."""
        try:
            await self.capture.boot_template(directory)
        except (MachinenError, OSError) as error:  # OSError: its directory went (a gc, a full disk)
            log.warning("boot template not captured", error=str(error))

    async def _supervise(self, machine: backend.Machine, started: float, report_ready: ReportReady) -> None:
        """From QEMU's start until the VM stops (or fails to come up)."""
        config, entry = self.config, self.entry
        async with anyio.create_task_group() as tg:
            self.capture.task_group = tg
            exit_status: list[int] = []

            async def watch_qemu() -> None:
                exit_status.append(await machine.exited())
                tg.cancel_scope.cancel()

            tg.start_soon(watch_qemu)
            try:
                with anyio.fail_after(config.boot_timeout):
                    await self._bring_up(machine)
            except TimeoutError:
                raise BootTimeoutError(
                    f"the guest agent did not answer within {config.boot_timeout:g} s; console tail:\n"
                    + capped_log.tail(entry.console_log),
                ) from None
            boot_s = time.monotonic() - started
            self.meta = {
                "name": config.name,
                "supervisor_pid": os.getpid(),
                "qemu_pid": machine.pid,
                "accel": config.machine.accel,
                "memory_mib": config.machine.memory_mib,
                "cpus": config.machine.cpus,
                "image": config.machine.image,
                "image_source": config.machine.image_source,
                "ram_dir": config.ram_dir,
                "detached": config.detached,
                "forked_from": config.incoming.source if config.incoming else None,
                "start": _start_kind(config),
                "network": config.machine.network,
                "network_policy": config.machine.network_policy.to_wire(),
                "ports": config.ports,
                "mounts": config.mounts,
                "started_at": time.time(),
                "boot_s": round(boot_s, 3),
                "socket": str(entry.supervisor_socket),
                "deadline": config.deadline,
                "idle_timeout": config.idle_timeout,
                "on_idle": config.on_idle,
                "lineage": config.lineage,
                "restored_from": config.incoming.restored_from if config.incoming and not config.warm else None,
            }
            listener = await anyio.create_unix_listener(str(entry.supervisor_socket))
            entry.supervisor_socket.chmod(0o600)
            entry.write_meta(self.meta)
            tg.start_soon(self.relay.read_loop)
            tg.start_soon(self.relay.write_loop)
            tg.start_soon(listener.serve, self.serve_client)
            for forward, (_, _, guest_port) in zip(self.forwards, config.ports, strict=True):
                tg.start_soon(forward.serve, functools.partial(self._serve_forward, guest_port))
            for directory, (_, target, _) in zip(self.mounts, config.mounts, strict=True):
                tg.start_soon(mounts.serve_mount, self.relay, directory, target)
            tg.start_soon(self._stop_at_deadline)
            if config.idle_timeout is not None:
                self.calls_ended_by = time.monotonic()
                tg.start_soon(self._stop_when_idle, config.idle_timeout)
            report_ready(self.meta)
            log.info("vm ready", boot_s=round(boot_s, 3), guest_uptime_s=self.relay.agent_info.get("uptime_s"))
            await self.stop_requested.wait()
            log.info("stop requested")
            tg.cancel_scope.cancel()
        if exit_status:
            raise BootError(
                f"QEMU exited with status {exit_status[0]}: "
                + capped_log.tail(entry.qemu_log)
                + "\nconsole tail:\n"
                + capped_log.tail(entry.console_log)
            )

    async def _stop_at_deadline(self) -> None:
        """Stop the VM when its deadline (``meta["deadline"]``) passes, whoever owns it; ``vm.extend``
        moves the deadline and wakes this loop to wait for the new one."""
        while True:
            moved = self.deadline_moved
            deadline = self.meta["deadline"]
            with anyio.move_on_after(math.inf if deadline is None else deadline - time.time()):
                await moved.wait()
                continue
            log.info("deadline reached", deadline=deadline)
            self.stop_requested.set()
            return

    async def _stop_when_idle(self, idle_s: float) -> None:
        """Stop the VM once it has had no call in progress (a client's: relayed to the agent, or a
        ``vm.*`` one but ``LOOKING_CALLS``; or a port-forwarded connection) and none started for
        ``idle_s`` seconds.  The supervisor's own long calls (a live mount's server) are not activity.  With ``on_idle``
        "snapshot:DIR" a bundle of it goes into DIR first; the VM stops even if that fails."""
        while True:
            if self.own_work_running or any(route.client.frames is not None for route in self.relay.routes.values()):
                self.calls_ended_by = time.monotonic() + IDLE_POLL_S
                await anyio.sleep(IDLE_POLL_S)
                continue
            idle_for = time.monotonic() - self.calls_ended_by
            if idle_for >= idle_s:
                log.info("idle: stopping", idle_timeout=idle_s)
                try:
                    await self._snapshot_when_idle()
                finally:
                    self.stop_requested.set()
                return
            await anyio.sleep(min(IDLE_POLL_S, idle_s - idle_for))

    async def _snapshot_when_idle(self) -> None:
        """``on_idle="snapshot:DIR"``: the bundle ``vm.snapshot`` writes, into DIR.  One that cannot
        be written (DIR not empty, a full disk, a handoff's pause) is logged, not raised: the VM
        must not outlive its idle timeout."""
        directory = idle_snapshot_dir(self.config.on_idle)
        if directory is None:
            return
        try:
            taken = await self.capture.snapshot(directory)
        except Exception:  # whatever went wrong, the stop that follows must happen
            log.exception("idle: snapshot not written", bundle=directory)
        else:
            log.info("idle: snapshot written", bundle=taken["bundle"], pause_ms=taken["pause_ms"])

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
                self.relay.cancel(agent_sid)
            with anyio.CancelScope(shield=True):
                await self.capture.resume(client)  # a handoff whose client vanished: carry on here
                await client.frames.aclose()

    def on_client_frame(self, client: ClientConnection, frame: wire.Frame, tg: anyio.abc.TaskGroup) -> None:
        """Route one client frame without waiting for anything, so the next one is read at once."""
        kind, sid = wire.kind(frame), wire.stream_id(frame)
        if kind == wire.HELLO:
            nonce, _, _ = wire.hello(frame)
            client.outbox.put([wire.HELLO, 0, nonce, wire.PROTOCOL_VERSION, self.meta])
        elif kind == wire.OPEN:
            method, params = wire.request(frame)
            if method not in LOOKING_CALLS:
                self.calls_ended_by = time.monotonic() + IDLE_POLL_S  # a call that ends before the next look
            if method.startswith("vm."):
                tg.start_soon(self.handle_local_call, client, sid, method, params)
            else:
                self.relay.open_call(client, sid, method, params)
        else:
            agent_sid = client.agent_sids.get(sid)
            if agent_sid is None:
                return
            if kind == wire.CANCEL:
                del client.agent_sids[sid]
                self.relay.cancel(agent_sid)
                return
            self.relay.send(wire.readdressed(frame, agent_sid))

    async def handle_local_call(self, client: ClientConnection, sid: int, method: str, params: wire.Params) -> None:
        if method in LOOKING_CALLS:
            await self._answer_local_call(client, sid, method, params)
            return
        self.own_work_running += 1  # in progress: the VM is not idle
        try:
            await self._answer_local_call(client, sid, method, params)
        finally:
            self.own_work_running -= 1

    async def _serve_forward(self, guest_port: int, connection: anyio.abc.SocketStream) -> None:
        self.own_work_running += 1  # a connection through a port forward: the VM is in use
        self.calls_ended_by = time.monotonic() + IDLE_POLL_S
        try:
            await forwards.serve_forward(self.relay, guest_port, connection)
        finally:
            self.own_work_running -= 1

    async def _answer_local_call(self, client: ClientConnection, sid: int, method: str, params: wire.Params) -> None:
        try:
            call = self.local_calls.get(method)
            if call is None:
                raise MachinenError(f"unknown method {method!r}", code="EXEC_PROTOCOL")
            result = await call(client, params)
        except MachinenError as exc:
            client.outbox.put([wire.ERROR, sid, exc.code, exc.message])
            return
        except Exception as exc:  # a QMP or OS failure fails this call, not the VM
            log.exception("call failed", method=method)
            client.outbox.put([wire.ERROR, sid, "VM_CALL_FAILED", f"{method}: {type(exc).__name__}: {exc}"])
            return
        client.outbox.put([wire.RESULT, sid, result])

    async def _info(self, client: ClientConnection, params: wire.Params) -> wire.Params:
        return self.meta

    async def _reset_agent_channel(self, client: ClientConnection, params: wire.Params) -> wire.Params:
        """Past the deadline the caller gets EXEC_AGENT_TIMEOUT; the read loop keeps reconnecting."""
        timeout = params.get("timeout")
        if type(timeout) not in (int, float) or not 0 < timeout < math.inf:
            timeout = RESET_TIMEOUT_S
        with anyio.move_on_after(timeout):
            return {"agent": await self.relay.reset()}
        raise ExecTimeoutError(
            f"the guest agent did not answer a new session within {timeout:g} s; the supervisor keeps trying"
        )

    async def _fork_template(self, client: ClientConnection, params: wire.Params) -> wire.Params:
        template = await self.capture.freeze_template(params.get("bundle"), params.get("capture", "auto"))
        return template.to_wire()

    async def _snapshot(self, client: ClientConnection, params: wire.Params) -> wire.Params:
        return await self.capture.snapshot(params["dir"], paused_for=client if params.get("stay_paused") else None)

    async def _resume(self, client: ClientConnection, params: wire.Params) -> wire.Params:
        return {"resumed": await self.capture.resume(client)}

    async def _extend(self, client: ClientConnection, params: wire.Params) -> wire.Params:
        """Push the deadline ``seconds`` later (or set one ``seconds`` from now), in meta.json too."""
        seconds = checked_ttl(params.get("seconds"))
        if seconds is None:
            raise BootError("vm.extend needs a number of seconds", code="BOOT_TTL_INVALID")
        deadline = self.meta["deadline"]
        self.meta["deadline"] = (time.time() if deadline is None else deadline) + seconds
        self.entry.write_meta(self.meta)
        self.deadline_moved.set()
        self.deadline_moved = anyio.Event()
        return {"deadline": self.meta["deadline"]}

    async def _set_network(self, client: ClientConnection, params: wire.Params) -> wire.Params:
        """A new policy for the running VM, and for its later forks and meta.json."""
        policy = NetworkPolicy.from_wire(params.get("policy"))
        machine = self.capture.machine
        if not self.config.machine.network or machine is None:
            raise BootError(f"VM {self.config.name!r} has no network device", code="BOOT_NETWORK_RULE_INVALID")
        await machine.set_network(policy)
        self.config = replace(self.config, machine=replace(self.config.machine, network_policy=policy))
        self.capture.config = self.config  # what its fork templates and bundles record
        self.meta["network_policy"] = policy.to_wire()
        self.entry.write_meta(self.meta)
        return {}

    async def _set_secrets(self, client: ClientConnection, params: wire.Params) -> wire.Params:
        """Secrets for the guest's requests (their values stay in this process's memory): the
        egress proxy puts them in; the reply's CA and placeholders are for the guest."""
        entries = params.get("secrets")
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise BootError("vm.set_secrets takes a list of secrets", code="BOOT_SECRET_INVALID")
        # A secret its guest already holds a placeholder of (from its bundle, its fork source or an
        # earlier call) keeps that placeholder: the guest's processes have it in their environment.
        held = {slot.name: slot.placeholder for slot in self.capture.secret_slots}
        secrets = [SecretRule(entry.get("name"), entry.get("value"), entry.get("hosts"),
                              held.get(str(entry.get("name"))) or entry.get("placeholder", ""),
                              entry.get("headers", DEFAULT_HEADERS))
                   for entry in entries]  # fmt: skip
        given = {secret.name for secret in secrets}
        slots = SecretSlot.all_from(  # checks the count and that no name is given twice
            [slot for slot in self.capture.secret_slots if slot.name not in given] + [s.slot for s in secrets]
        )
        machine = self.capture.machine
        if not self.config.machine.network or machine is None:
            raise BootError(f"VM {self.config.name!r} has no network device", code="BOOT_SECRET_INVALID")
        ca_pem = await machine.set_secrets(secrets)
        env = {secret.name: secret.placeholder for secret in secrets}
        self.secrets, self.capture.secret_slots = secrets, slots
        self.meta["secrets"] = [{"name": s.name, "hosts": list(s.hosts)} for s in secrets]  # never a value
        self.entry.write_meta(self.meta)
        return {"placeholders": env, "ca_pem": ca_pem}  # the client has the guest trust it (egress_trust)

    async def _secret_values(self, client: ClientConnection, params: wire.Params) -> wire.Params:
        """The secrets as set (values included), for a fork given them (``fork(secrets="inherit")``):
        to this user's clients only, over the supervisor's 0600 socket."""
        return {"secrets": [{"name": s.name, "value": s.value, "hosts": list(s.hosts), "placeholder": s.placeholder,
                             "headers": list(s.headers)} for s in self.secrets]}  # fmt: skip

    async def _metrics(self, client: ClientConnection, params: wire.Params) -> wire.Params:
        capture = self.capture
        assert capture.ram_file is not None  # chosen before the VM (and this socket) came up
        measured = functools.partial(metrics.vm_metrics, self.meta["qemu_pid"], capture.ram_file, capture.ram_shared,
                                     Path(capture.chain[0][0]))  # fmt: skip
        return dict(await anyio.to_thread.run_sync(measured))

    async def _stop(self, client: ClientConnection, params: wire.Params) -> wire.Params:
        self.stop_requested.set()
        return {"stopping": True}


def _start_kind(config: SupervisorConfig) -> str:
    """How the VM came up: ``cold`` (booted a kernel), ``warm`` (resumed a boot template),
    ``restore`` (a bundle) or ``fork`` (a fork template)."""
    if config.incoming is None:
        return "cold"
    if config.warm:
        return "warm"
    return "restore" if config.incoming.bundle else "fork"
