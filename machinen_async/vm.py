"""The public SDK: ``boot()``, ``restore()``, ``connect()``, ``VM`` (with
``fork()`` and ``snapshot()``), ``Forks`` and ``Process``.

A ``VM`` talks to its per-VM supervisor over one unix socket, multiplexing
any number of concurrent calls (see ``protocol.mux``).  ``boot()`` starts a
supervisor and owns it: leaving the ``async with`` (normally, on error or on
cancellation) stops QEMU and removes every file the VM had.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc

from .errors import (
    BootError,
    ExecError,
    ExecTimeoutError,
    GuestFileError,
    MachinenError,
    SnapshotError,
    error_from_code,
    plain_errors,
)
from .network import NetworkPolicy, network_settings
from .ports import PortSpec, parse_port_forwards
from .protocol import wire
from .protocol.mux import Call, Channel
from .store import assets, bundle, layers, paths, registry
from .supervisor.config import DETACH, SupervisorConfig
from .vmm import backend

DEFAULT_EXEC_TIMEOUT_S = 300.0
# What exec() keeps of each output stream and read_file() of a file, in host
# memory; beyond it the call fails (the guest decides how much it writes).
DEFAULT_MAX_OUTPUT = 256 * 1024 * 1024
DEFAULT_BOOT_TIMEOUT_S = 60.0
MIN_MEMORY_MIB = 64
# Host-side backstop beyond the agent's own timeout, for a guest that froze.
AGENT_TIMEOUT_SLACK_S = 10.0
SUPERVISOR_STOP_GRACE_S = 10.0
SUPERVISOR_KILL_GRACE_S = 10.0
# Fork back-pressure estimate per sibling: QEMU's own memory (TCG translation
# cache capped at 64 MiB, heap) plus the share of guest RAM a busy sibling
# typically dirties; refuse when that exceeds this share of MemAvailable.
FORK_OVERHEAD_MIB = {"tcg": 160, "kvm": 48}
FORK_PRIVATE_SHARE = 0.25
FORK_MEMORY_HEADROOM = 0.9
# A supervisor that neither reports nor exits within boot_timeout plus this is killed.
STATUS_SLACK_S = 30.0

Command = str | Sequence[str]


def _argv(cmd: Command) -> list[str]:
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    argv = [str(a) for a in cmd]
    if not argv:
        raise ExecError("empty command", code="EXEC_COMMAND_INVALID")
    return argv


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: int | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    pause_ms: float
    write_ms: float
    size_bytes: int


class ProcessOutput(anyio.abc.ByteReceiveStream):
    """A guest process's stdout or stderr, chunk by chunk as it is produced."""

    def __init__(self, call: Call, fd: int) -> None:
        self._call = call
        self._fd = fd
        self._leftover = b""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._leftover:
            self._leftover = await self._call.receive(self._fd)
        data, self._leftover = self._leftover[:max_bytes], self._leftover[max_bytes:]
        return data

    async def aclose(self) -> None:
        pass


class ProcessInput(anyio.abc.ByteSendStream):
    """A guest process's stdin; ``aclose()`` sends EOF."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self._closed = False

    async def send(self, item: bytes) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        await self._call.send(item)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._call.send_eof()


class Process:
    """A running guest process (see ``VM.process``)."""

    def __init__(self, call: Call, argv: list[str]) -> None:
        self._call = call
        self.argv = argv
        self.stdin = ProcessInput(call)
        self.stdout = ProcessOutput(call, wire.STDOUT)
        self.stderr = ProcessOutput(call, wire.STDERR)
        self.returncode: int | None = None
        self.signal: int | None = None
        self.timed_out = False

    async def wait(self) -> int:
        """Exit code (128+N when killed by signal N).

        Like a pipe, unread output eventually blocks the process: read
        stdout/stderr (or use ``VM.exec``) for chatty commands.
        """
        if self.returncode is None:
            outcome = await self._call.result()
            self.signal = outcome["signal"]
            self.timed_out = outcome["timed_out"]
            self.returncode = outcome["exit_code"]
        return self.returncode

    async def send_signal(self, signum: int, *, group: bool = False) -> None:
        await self._call.control({"signal": int(signum), "group": group})

    async def kill(self) -> None:
        await self.send_signal(signal.SIGKILL, group=True)

    async def resize(self, rows: int, cols: int) -> None:
        """New terminal size for a ``tty`` process (it gets SIGWINCH)."""
        await self._call.control({"resize": [int(rows), int(cols)]})


class VM:
    """A running VM.  Get one from ``boot()`` or ``connect()``."""

    def __init__(self, channel: Channel, info: dict[str, Any], *, owner: Any = None, host: Any = None) -> None:
        self._channel = channel
        self._owner = owner  # set when closing this handle must stop the VM
        self.info = info
        self.name: str = info["name"]
        self.host = host  # None for this machine, else the remote.host.SSHHost it runs on
        self.handoff_report: Any = None  # set on the VM a handoff() returned

    def __repr__(self) -> str:
        where = f" on {self.host.name}" if self.host is not None else ""
        return f"<VM {self.name}{where} accel={self.info.get('accel')} memory={self.info.get('memory_mib')}MiB>"

    @asynccontextmanager
    async def process(
        self,
        cmd: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bool = True,
        timeout: float | None = None,
        tty: bool = False,
        size: tuple[int, int] = (24, 80),
    ) -> AsyncIterator[Process]:
        """Start a guest process and stream its stdin/stdout/stderr.

        With ``tty`` it runs on a pseudo-terminal of ``size`` (rows, cols) as
        its controlling terminal: all output arrives on stdout, and
        ``Process.resize`` changes the size.  Leaving the block while it still
        runs kills it (and its process group).
        """
        argv = _argv(cmd)
        params = {"argv": argv, "env": dict(env or {}), "cwd": cwd, "stdin": stdin, "timeout": timeout}
        if tty:
            params.update(tty=True, rows=size[0], cols=size[1])
        call = await self._channel.open("exec", params)
        try:
            yield Process(call, argv)
        finally:
            with anyio.CancelScope(shield=True):
                await call.cancel()

    async def exec(
        self,
        cmd: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        input: bytes | None = None,
        timeout: float | None = DEFAULT_EXEC_TIMEOUT_S,
        check: bool = False,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        """Run ``cmd`` (argv list, or a string for ``/bin/sh -c``) to completion.

        ``timeout`` kills the guest process group and raises
        ``ExecTimeoutError`` (EXEC_AGENT_TIMEOUT); ``check`` raises
        ``ExecError`` (EXEC_NONZERO_EXIT) on a non-zero exit.  A stdout or
        stderr longer than ``max_output`` bytes (None: no limit) kills the
        process and raises ``ExecError`` (EXEC_OUTPUT_TOO_LARGE); stream
        bigger outputs with ``process()``.
        """
        stdout, stderr = bytearray(), bytearray()
        backstop = None if timeout is None else timeout + AGENT_TIMEOUT_SLACK_S
        with anyio.move_on_after(backstop) as scope, plain_errors():
            async with self.process(cmd, env=env, cwd=cwd, stdin=input is not None, timeout=timeout) as proc:

                async def collect(stream: ProcessOutput, into: bytearray) -> None:
                    async for chunk in stream:
                        if max_output is not None and len(into) + len(chunk) > max_output:
                            raise ExecError(
                                f"{cmd!r} wrote more than max_output={max_output} bytes", code="EXEC_OUTPUT_TOO_LARGE"
                            )
                        into += chunk

                async with anyio.create_task_group() as tg:
                    tg.start_soon(collect, proc.stdout, stdout)
                    tg.start_soon(collect, proc.stderr, stderr)
                    if input is not None:
                        await proc.stdin.send(input)
                        await proc.stdin.aclose()
                exit_code = await proc.wait()
        if scope.cancelled_caught:
            raise ExecTimeoutError(f"the guest agent did not finish {cmd!r} within {backstop:g} s")
        result = ExecResult(exit_code, bytes(stdout), bytes(stderr), proc.signal)
        if proc.timed_out:
            raise ExecTimeoutError(f"{cmd!r} timed out after {timeout:g} s and was killed", result=result)
        if check and exit_code != 0:
            raise ExecError(
                f"{cmd!r} exited with {exit_code}: {result.stderr[-500:].decode(errors='replace')}",
                code="EXEC_NONZERO_EXIT",
                result=result,
            )
        return result

    async def read_file(self, path: str, *, max_output: int | None = DEFAULT_MAX_OUTPUT) -> bytes:
        """The file's bytes; one longer than ``max_output`` (None: no limit) raises
        ``GuestFileError`` (FILE_TOO_LARGE)."""
        call = await self._channel.open("read_file", {"path": path})
        chunks = []
        size = 0
        try:
            while True:
                try:
                    chunks.append(await call.receive(wire.STDOUT))
                except anyio.EndOfStream:
                    break
                size += len(chunks[-1])
                if max_output is not None and size > max_output:
                    raise GuestFileError(f"{path} is larger than max_output={max_output} bytes", code="FILE_TOO_LARGE")
            await call.result()
        finally:
            with anyio.CancelScope(shield=True):
                await call.cancel()
        return b"".join(chunks)

    async def write_file(
        self, path: str, data: bytes, *, mode: int = 0o644, append: bool = False, parents: bool = False
    ) -> None:
        """Write ``data`` to ``path`` in the guest; replaced atomically unless ``append``."""
        call = await self._channel.open(
            "write_file", {"path": path, "mode": mode, "append": append, "parents": parents}
        )
        try:
            await call.send(data)
            await call.send_eof()
            await call.result()
        finally:
            with anyio.CancelScope(shield=True):
                await call.cancel()

    async def ping(self) -> dict[str, Any]:
        return await self._channel.call("ping")

    async def describe(self) -> dict[str, Any]:
        """Supervisor metadata, plus the guest agent's live info under ``"agent"``."""
        info = await self._channel.call("vm.info")
        info["agent"] = await self._channel.call("info")
        return info

    def fork(
        self,
        n: int | None = None,
        *,
        name: str | None = None,
        names: Sequence[str] | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT_S,
        detached: bool = False,
        ports: Sequence[PortSpec] | None = None,
        hosts: Sequence[Any] | None = None,
    ) -> _ForkLaunch:
        """Siblings of this running VM, started concurrently from one instant.

        ``child = await vm.fork(name="b")`` gives one VM (close it with
        ``await child.aclose()``); ``async with vm.fork(n=8) as forks`` gives
        ``Forks`` and closes them on exit.  This VM pauses only for the fork
        window and keeps running; memory is shared copy-on-write and every
        sibling writes its own qcow2 layer over the frozen disk.  Siblings get
        their own name, hostname, fresh guest entropy and the current time, and
        never inherit port forwards: ``ports`` gives a single sibling its own.
        ``detached`` siblings outlive this process (closing their handles only
        disconnects).  ``hosts`` (``Host.local()``, ``Host.ssh(...)``) spreads the
        siblings over several hosts by free memory and CPU; remote siblings
        start from a snapshot pushed there (see docs/scale-out.md).
        """
        count = 1 if n is None else n
        if not isinstance(count, int) or count < 1:
            raise MachinenError(f"n must be a positive integer, got {n!r}", code="FORK_COUNT_INVALID")
        if names is not None:
            chosen = [registry.validate_name(x) for x in names]
            if len(chosen) != count and n is not None:
                raise MachinenError(f"{len(chosen)} names for {count} siblings", code="FORK_COUNT_INVALID")
        elif name is not None:
            chosen = [registry.validate_name(name if n is None else f"{name}-{i}") for i in range(count)]
        else:
            chosen = [f"{self.name[:40]}-{os.urandom(3).hex()}" for _ in range(count)]
        forwards = parse_port_forwards(ports)
        if forwards and len(chosen) > 1:
            raise MachinenError("ports can be given to a single sibling only", code="PARSE_PORT_INVALID")
        if hosts is not None and (forwards or not hosts):
            raise MachinenError("hosts= needs at least one host and takes no ports", code="FORK_HOSTS_INVALID")
        return _ForkLaunch(self, chosen, n is None and len(chosen) == 1, boot_timeout, detached, forwards, hosts)

    async def snapshot(self, bundle_dir: str | os.PathLike) -> SnapshotInfo:
        """Write a restorable bundle of this VM to ``bundle_dir`` (new or empty).

        Non-destructive: the VM pauses only to capture state and keeps running.
        """
        target = Path(bundle_dir).expanduser().resolve()
        result = await self._channel.call("vm.snapshot", {"dir": str(target)})
        return SnapshotInfo(
            path=Path(result["bundle"]),
            pause_ms=result["pause_ms"],
            write_ms=result["write_ms"],
            size_bytes=sum(f["size"] for f in result["files"].values()),
        )

    async def handoff(
        self,
        host: Any,
        *,
        name: str | None = None,
        ports: Sequence[PortSpec] | None = None,
        detached: bool | None = None,
        precopy: bool = True,
        progress: Callable[[str], None] | None = None,
    ) -> VM:
        """Move this running VM to ``host`` (a ``Host.ssh(...)``); returns the VM there.

        The VM pauses, its final state goes to the host (only the chunks the
        host lacks; with ``precopy`` a first snapshot taken while it still
        runs has already sent most of them) and is verified there, the VM
        starts there, and only then does this one stop.  On any failure this
        VM simply continues.  Ports are not carried over: pass ``ports``.
        The moved VM is owned like this one was (``detached`` overrides);
        ``moved.handoff_report`` tells bytes moved and the pause.
        """
        from .remote.handoff import handoff

        return await handoff(self, host, name=name, ports=ports, detached=detached, precopy=precopy, progress=progress)

    async def _snapshot_paused(self, bundle_dir: Path) -> None:
        """Snapshot and stay paused until ``_resume`` or until this handle disconnects."""
        await self._channel.call("vm.snapshot", {"dir": str(bundle_dir), "stay_paused": True})

    async def _resume(self) -> None:
        await self._channel.call("vm.resume")

    async def reset_agent_channel(self) -> dict[str, Any]:
        """Drop and re-establish the supervisor's channel to the guest agent.

        Calls in flight fail with EXEC_AGENT_UNAVAILABLE; their guest processes
        keep running (as after a restore).  A recovery tool for a wedged channel.
        """
        return await self._channel.call("vm.reset_agent_channel")

    async def stop(self) -> str:
        """Stop the VM (QEMU, supervisor, files) and wait until it is gone.

        Returns "stopped", or "killed" if its supervisor did not finish a clean
        stop in time and was SIGKILLed; STOP_FAILED if even that failed."""
        if self._owner is not None:
            await self.aclose()
            return "stopped"
        if self.host is not None:
            await self._channel.aclose()
            return await self.host.stop(self.name)
        try:
            with anyio.fail_after(SUPERVISOR_STOP_GRACE_S):
                await self._channel.call("vm.stop")
        except (MachinenError, TimeoutError):
            pass  # on its way down, or not answering: either way, waited for or killed below
        await self._channel.aclose()
        return await _stop_or_kill(registry.vm_dir(self.name))

    async def aclose(self) -> None:
        """Disconnect; a VM this handle booted is also stopped."""
        with anyio.CancelScope(shield=True):
            await self._channel.aclose()
            if self._owner is not None:
                await self._owner.shutdown()


T = TypeVar("T")


class Forks(Sequence[VM]):
    """Siblings of one fork event, in order; ``async with`` closes them all."""

    def __init__(self, vms: list[VM], fork_info: dict[str, Any] | None = None) -> None:
        """``fork_info`` describes the source's pause; siblings restored from a bundle have none."""
        fork_info = fork_info or {"pause_ms": 0.0, "pause_steps_ms": {}}
        self._vms = vms
        self.source_pause_ms: float = fork_info["pause_ms"]
        self.source_pause_steps_ms: dict[str, float] = fork_info["pause_steps_ms"]
        self.placement: dict[str, str] = fork_info.get("placement", {})  # sibling -> host, with hosts=

    def __getitem__(self, index):  # type: ignore[override]
        return self._vms[index]

    def __len__(self) -> int:
        return len(self._vms)

    async def map(
        self, fn: Callable[[VM, int], Awaitable[T]], *, return_exceptions: bool = False
    ) -> list[T | BaseException]:
        """Run ``fn(sibling, index)`` for every sibling concurrently; results in order.

        The first failure cancels the others and is raised, unless
        ``return_exceptions`` is set: then each failure is returned in its slot.
        """
        results: list[Any] = [None] * len(self._vms)

        async def run(index: int, vm: VM) -> None:
            try:
                results[index] = await fn(vm, index)
            except Exception as exc:
                if not return_exceptions:
                    raise
                results[index] = exc

        with plain_errors():
            async with anyio.create_task_group() as tg:
                for index, vm in enumerate(self._vms):
                    tg.start_soon(run, index, vm)
        return results

    async def aclose(self) -> None:
        await _close_all(self._vms)


async def _close_all(vms: Sequence[VM | None]) -> None:
    with anyio.CancelScope(shield=True):
        async with anyio.create_task_group() as tg:
            for vm in vms:
                if vm is not None:
                    tg.start_soon(vm.aclose)


def _check_fork_memory(count: int, machine: dict[str, Any]) -> None:
    """Refuse a fork the host cannot hold rather than let the OOM killer pick."""
    per_sibling = FORK_OVERHEAD_MIB[machine["accel"]] + machine["memory_mib"] * FORK_PRIVATE_SHARE
    needed = count * per_sibling + machine["memory_mib"]  # + the template's RAM copy
    available = _available_memory_mib()
    if needed > available * FORK_MEMORY_HEADROOM:
        raise MachinenError(
            f"forking {count} siblings needs about {needed:.0f} MiB but {available} MiB is available",
            code="FORK_MEMORY_BACKPRESSURE",
            retryable=True,
        )


async def _fork(
    source: VM,
    names: list[str],
    boot_timeout: float,
    detached: bool,
    ports: list[list],
    *,
    bundle_dir: Path | None = None,
) -> tuple[list[VM], dict[str, Any]]:
    """Siblings ``names`` of ``source``; ``bundle_dir`` also gets a bundle of the same instant."""
    for name in names:
        registry.ensure_free(name)
    if names:
        _check_fork_memory(len(names), source.info)
    fork_info = await source._channel.call("vm.fork_template", {"bundle": str(bundle_dir)} if bundle_dir else {})
    if not names:
        return [], fork_info
    template = layers.Shared(Path(fork_info["holds"][0]))
    reference = template.hold()  # ours until every sibling holds its own
    incoming = {
        key: fork_info[key] for key in ("state", "mem", "ram_in_state", "chain", "disk_size", "holds", "source")
    }
    try:
        siblings = await _start_siblings(names, fork_info["machine"], incoming, boot_timeout, detached, ports)
    finally:
        layers.close_quietly(reference)
    return siblings, fork_info


async def _start_siblings(
    names: list[str],
    machine: dict[str, Any],
    incoming: dict[str, Any],
    boot_timeout: float,
    detached: bool,
    ports: list[list],
) -> list[VM]:
    """One VM per name, all resumed from the same ``incoming`` state, started at once."""
    siblings: list[VM | None] = [None] * len(names)
    try:
        configs = [
            SupervisorConfig(
                name=name,
                ram_dir=_new_ram_dir(name),
                boot_timeout=boot_timeout,
                detached=detached,
                ports=ports,
                incoming=incoming,
                **machine,
            )
            for name in names
        ]
        owners = await _start_supervisors(configs)

        async def start(index: int) -> None:
            siblings[index] = await _await_supervisor(configs[index], owners[index])

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
        await _close_all(siblings)
        raise
    return siblings  # type: ignore[return-value]  # all set once the task group ends


class _ForkLaunch:
    """``await vm.fork()`` -> VM (or ``Forks`` with ``n``); ``async with`` closes them on exit."""

    def __init__(
        self,
        source: VM,
        names: list[str],
        single: bool,
        boot_timeout: float,
        detached: bool,
        ports: list[list],
        hosts: Sequence[Any] | None,
    ) -> None:
        self._source = source
        self._hosts = hosts
        self._names = names
        self._single = single
        self._boot_timeout = boot_timeout
        self._detached = detached
        self._ports = ports
        self._result: VM | Forks | None = None

    async def _start(self) -> VM | Forks:
        if self._hosts is not None:
            from .remote.spread import fork_across

            siblings, fork_info = await fork_across(
                self._source, self._names, self._hosts, self._boot_timeout, self._detached
            )
        else:
            siblings, fork_info = await _fork(
                self._source, self._names, self._boot_timeout, self._detached, self._ports
            )
        return siblings[0] if self._single else Forks(siblings, fork_info)

    def __await__(self):
        return self._start().__await__()

    async def __aenter__(self) -> VM | Forks:
        self._result = await self._start()
        return self._result

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._result is not None
        await self._result.aclose()


class _FdReceiveStream(anyio.abc.ByteReceiveStream):
    """The read end of a pipe, on whichever event loop is running."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            try:
                data = os.read(self._fd, max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._fd)
                continue
            if not data:
                raise anyio.EndOfStream
            return data

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _ForkedSupervisor:
    """A supervisor the zygote forked: not our child, so watched through a pidfd.

    Offers the part of ``anyio.abc.Process`` that ``_Owner`` uses.
    """

    def __init__(self, pid: int, status_fd: int, stderr_fd: int) -> None:
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)
        self.stdout = _FdReceiveStream(status_fd)
        self.stderr = _FdReceiveStream(stderr_fd)
        self.returncode: int | None = None  # its exit status is its parent's to read: -1 means "exited"

    async def wait(self) -> int:
        if self.returncode is None:
            await anyio.wait_readable(self._pidfd)
            self.returncode = -1
        return self.returncode

    def send_signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def aclose(self) -> None:
        await self.stdout.aclose()
        await self.stderr.aclose()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


class _Owner:
    """The supervisor process a ``boot()`` started, and how to end it for sure."""

    def __init__(self, process: anyio.abc.Process | _ForkedSupervisor, lifeline: int, ram_dir: Path) -> None:
        self.process = process
        self.lifeline = lifeline
        self.ram_dir = ram_dir

    def _cut_lifeline(self) -> None:
        if self.lifeline >= 0:
            os.close(self.lifeline)
            self.lifeline = -1

    async def release(self) -> None:
        """Let a detached supervisor live on (it got DETACH before our EOF)."""
        self._cut_lifeline()
        await self.process.aclose()

    async def shutdown(self) -> None:
        with anyio.CancelScope(shield=True):
            self._cut_lifeline()  # EOF tells the supervisor to stop
            with anyio.move_on_after(SUPERVISOR_STOP_GRACE_S / 2):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(SUPERVISOR_STOP_GRACE_S):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()  # QEMU follows through its parent-death signal
                await self.process.wait()
                shutil.rmtree(self.ram_dir, ignore_errors=True)
            await self.process.aclose()


def _available_memory_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def _validate_memory(memory_mib: Any) -> int:
    if not isinstance(memory_mib, int) or isinstance(memory_mib, bool) or memory_mib < MIN_MEMORY_MIB:
        raise BootError(
            f"memory must be an integer >= {MIN_MEMORY_MIB} MiB, got {memory_mib!r}", code="BOOT_MEMORY_INVALID"
        )
    available = _available_memory_mib()
    if memory_mib > available:
        raise BootError(
            f"{memory_mib} MiB of guest memory requested but only {available} MiB is available on this host",
            code="BOOT_MEMORY_INVALID",
        )
    return memory_mib


async def _read_status_line(process: anyio.abc.Process) -> dict[str, Any]:
    assert process.stdout is not None
    buffer = b""
    while b"\n" not in buffer:
        try:
            buffer += await process.stdout.receive()
        except anyio.EndOfStream:
            break
    try:
        return json.loads(buffer.split(b"\n", 1)[0])
    except ValueError:
        return {}


async def _supervisor_failure(process: anyio.abc.Process, status: dict[str, Any]) -> MachinenError:
    if "error" in status:
        error = status["error"]
        return error_from_code(error["code"], error["message"])
    await process.wait()
    stderr = b""
    if process.stderr is not None:
        with anyio.move_on_after(1):
            async for chunk in process.stderr:
                stderr += chunk
    return BootError(
        f"the VM supervisor exited ({process.returncode}) before the VM was ready:\n"
        + stderr.decode(errors="replace")[-3000:]
    )


async def _open_channel(socket_path: Path) -> tuple[Channel, dict[str, Any]]:
    stream = await anyio.connect_unix(str(socket_path))
    channel = Channel.over(stream)
    try:
        info = await channel.hello()
    except BaseException:
        await channel.aclose()
        raise
    return channel, info


async def _launch(
    image: str | os.PathLike | None,
    *,
    name: str | None,
    memory_mib: int,
    cpus: int,
    accel: str | None,
    boot_timeout: float,
    detached: bool,
    ports: Sequence[PortSpec] | None,
    network: bool | NetworkPolicy,
    workload: dict[str, Any] | None,
    progress: Callable[[str], None] | None,
) -> VM:
    name = registry.validate_name(name) if name is not None else registry.new_name()
    forwards = parse_port_forwards(ports)
    has_network, network_allow = network_settings(network)
    memory_mib = _validate_memory(memory_mib)
    vmm = backend.default()
    chosen_accel = vmm.choose_accelerator(accel)
    vmm.check_installed()
    report = progress or (lambda message: None)

    def prepare() -> tuple[assets.BaseAssets, Path, Path]:
        base = assets.ensure_base(report)
        tarball = Path(image).expanduser().resolve() if image is not None else base.rootfs_tarball
        return base, tarball, assets.image_for(tarball, report)

    base, tarball, disk_image = await anyio.to_thread.run_sync(prepare)
    registry.ensure_free(name)  # fail fast; the supervisor's claim is the real check
    config = SupervisorConfig(
        name=name,
        memory_mib=memory_mib,
        cpus=cpus,
        accel=chosen_accel,
        kernel=str(base.kernel),
        initrd=str(base.initrd),
        image=str(disk_image),
        image_source=str(tarball),
        image_key=disk_image.stem,
        ram_dir=_new_ram_dir(name),
        tsc_khz=vmm.host_tsc_khz() if chosen_accel == "tcg" else None,
        boot_timeout=boot_timeout,
        detached=detached,
        ports=forwards,
        network=has_network,
        network_allow=network_allow,
        workload=workload,
    )
    return await _start_supervisor(config)


def _new_ram_dir(name: str) -> str:
    return str(paths.runtime_dir() / f"{name}-{os.urandom(4).hex()}")


async def _start_supervisor(config: SupervisorConfig) -> VM:
    """Spawn a supervisor for ``config`` and connect once it reports ready."""
    argv = [sys.executable, "-m", "machinen_async.supervisor", config.to_json()]
    if config.detached:
        # setsid --fork: the supervisor is nobody's child here, so it never lingers as our zombie.
        argv = ["setsid", "--fork", *argv]
    # The supervisor's stdin is our "lifeline": EOF before DETACH means we are gone.
    lifeline_read, lifeline = os.pipe()
    try:
        process = await anyio.open_process(
            argv, stdin=lifeline_read, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
    except BaseException:
        os.close(lifeline)
        raise
    finally:
        os.close(lifeline_read)
    return await _await_supervisor(config, _Owner(process, lifeline, Path(config.ram_dir)))


async def _start_supervisors(configs: list[SupervisorConfig]) -> list[_Owner]:
    """Spawn several supervisors at once through the zygote (one interpreter start-up for all)."""
    pipes = [(*os.pipe(), *os.pipe(), *os.pipe()) for _ in configs]  # lifeline, status, stderr: (read, write) each
    try:
        jobs = [[config.to_json(), p[0], p[3], p[5]] for config, p in zip(configs, pipes, strict=True)]
        # Shielded (it takes ~0.2 s): cancelled halfway, children we have no pids for would clean
        # up after themselves only once they notice their lifeline closed, after we returned.
        with anyio.CancelScope(shield=True):
            zygote = await anyio.run_process(
                [sys.executable, "-m", "machinen_async.supervisor.zygote"],
                input=json.dumps(jobs).encode(),
                pass_fds=[fd for p in pipes for fd in (p[0], p[3], p[5])],
            )
        pids = json.loads(zygote.stdout)
    except BaseException:
        for p in pipes:
            for fd in p:
                os.close(fd)
        raise
    owners = []
    for config, pid, p in zip(configs, pids, pipes, strict=True):
        for fd in (p[0], p[3], p[5]):  # the child's ends
            os.close(fd)
        owners.append(_Owner(_ForkedSupervisor(pid, p[2], p[4]), p[1], Path(config.ram_dir)))
    return owners


async def _await_supervisor(config: SupervisorConfig, owner: _Owner) -> VM:
    """Wait for a spawned supervisor's ready line and connect to it; stop it on failure."""
    name, detached, process, lifeline = config.name, config.detached, owner.process, owner.lifeline
    try:
        with anyio.fail_after(config.boot_timeout + STATUS_SLACK_S):
            status = await _read_status_line(process)
        if "ready" not in status:
            raise await _supervisor_failure(process, status)
        channel, info = await _open_channel(registry.vm_dir(name).supervisor_socket)
        if detached:
            os.write(lifeline, DETACH)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await owner.shutdown()
            if detached:
                await registry.wait_until_gone(registry.vm_dir(name), SUPERVISOR_STOP_GRACE_S + 5)
        raise
    if detached:
        await owner.release()
        owner = None
    return VM(channel, info, owner=owner)


class _Boot:
    """``async with boot(...) as vm`` (stopped on exit) or ``vm = await boot(...)`` (call ``vm.aclose()``).

    Also ``restore(..., n=4)``: then the result is ``Forks``."""

    def __init__(self, start: Callable[[], Awaitable[Any]]) -> None:
        self._start = start
        self._vm: Any = None

    def __await__(self):
        return self._start().__await__()

    async def __aenter__(self) -> Any:
        self._vm = await self._start()
        return self._vm

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._vm is not None
        await self._vm.aclose()


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
    progress: Callable[[str], None] | None = None,
) -> _Boot:
    """Boot a microVM from ``image`` (a rootfs tarball; default: the Debian base).

    The VM runs ``cmd`` (or else the image's default cmd, see ``provision``)
    as its supervised workload: output in /var/log/machinen/workload.log,
    restarted after a non-zero exit.

    ``accel``: "kvm", "tcg" or "auto" (default, also $MACHINEN_ACCEL).  With
    ``detached`` the VM outlives this process; reach it with ``connect(name)``.
    ``ports``: host -> guest TCP forwards, ``["3000:3000", "0.0.0.0:8080:80",
    (5432, 5432)]`` (loopback unless an address is given); they tunnel through
    the guest agent, so they need no guest network.  ``network``: outbound
    access (QEMU user-mode NAT, DNS included, nothing inbound) with the host
    closed (its loopback, its addresses, link-local: see ``NetworkPolicy``,
    which reopens chosen destinations); False boots with no network device
    at all.  Fork siblings keep their source's policy.
    """
    return _Boot(
        lambda: _launch(
            image,
            name=name,
            memory_mib=memory_mib,
            cpus=cpus,
            accel=accel,
            boot_timeout=boot_timeout,
            detached=detached,
            ports=ports,
            network=network,
            workload=None if cmd is None else {"cmd": _argv(cmd), "env": dict(env or {}), "cwd": cwd},
            progress=progress,
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
) -> _Boot:
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
    """
    bundle_path = Path(bundle_dir)
    allow = list(network.allow) if network is not None else []
    if n is None and names is None:
        return _Boot(
            lambda: _restore(bundle_path, name, image, accel, boot_timeout, detached, ports, progress, trust, allow)
        )
    if names is not None:
        chosen = [registry.validate_name(x) for x in names]
    elif isinstance(n, int) and n >= 1:
        prefix = registry.validate_name(name) if name is not None else registry.new_name()
        chosen = [f"{prefix}-{i}" for i in range(n)]
    else:
        raise MachinenError(f"n must be a positive integer, got {n!r}", code="FORK_COUNT_INVALID")
    if ports:
        raise MachinenError("ports can be given to a single VM only", code="PARSE_PORT_INVALID")
    return _Boot(
        lambda: _restore_siblings(bundle_path, chosen, image, accel, boot_timeout, detached, progress, trust, allow)
    )


async def _restore_plan(
    bundle_dir: Path,
    image: str | os.PathLike | None,
    accel: str | None,
    report: Callable[[str], None],
    trust: bool,
    network_allow: list[str],
) -> tuple[bundle.Manifest, dict[str, Any]]:
    """Verify a bundle and find what it runs on: (manifest, the machine fields of its VMs' configs)."""
    manifest = await anyio.to_thread.run_sync(functools.partial(bundle.inspect, bundle_dir, trust=trust))
    machine = manifest.machine
    vmm = backend.default()
    chosen_accel = vmm.choose_accelerator(accel)
    if machine.get("type") != vmm.machine_type or machine.get("accel") != chosen_accel:
        raise SnapshotError(
            f"bundle is for {machine.get('type')}/{machine.get('accel')}, "
            f"this host runs {vmm.machine_type}/{chosen_accel}",
            code="SNAPSHOT_INCOMPATIBLE",
        )
    local_qemu = vmm.installed_version()
    if manifest.data.get("qemu_version") != local_qemu:
        raise SnapshotError(
            f"bundle was taken with QEMU {manifest.data.get('qemu_version')}, this host has {local_qemu}",
            code="SNAPSHOT_INCOMPATIBLE",
        )

    def locate_assets() -> tuple[Path, Path, Path]:
        """Kernel, initrd and image of the bundle, found by content (a path from the
        manifest is only ever quoted in an error): received ones first, then this
        host's own build."""

        def boot_files() -> dict[str, Path | None]:
            return {key: assets.find_boot_file(manifest.data[key]["sha256"]) for key in ("kernel", "initrd")}

        found_boot_files = boot_files()
        base = None
        if None in found_boot_files.values():
            base = assets.ensure_base(report)  # build this host's own, then look again
            found_boot_files = boot_files()
        for key, path in found_boot_files.items():
            if path is None:
                raise SnapshotError(f"the bundle's {key} differs from this host's", code="SNAPSHOT_INCOMPATIBLE")
        wanted, digest = manifest.data["image"]["key"], manifest.data["image"].get("sha256")
        if image is not None:
            tarball = Path(image).expanduser().resolve()
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
                f"the image this bundle was taken on ({manifest.data['image'].get('tarball', 'unknown')}) is not "
                "here: restore it on the host it was taken on, or send it along with `machinen push`",
                code="BOOT_IMAGE_NOT_FOUND",
            )
        return found_boot_files["kernel"], found_boot_files["initrd"], found

    kernel, initrd, disk_image = await anyio.to_thread.run_sync(locate_assets)
    fields = {
        "memory_mib": machine["memory_mib"],
        "cpus": machine["cpus"],
        "accel": chosen_accel,
        "kernel": str(kernel),
        "initrd": str(initrd),
        "image": str(disk_image),
        "image_source": manifest.data["image"].get("tarball", ""),
        "image_key": manifest.data["image"]["key"],
        "tsc_khz": machine["tsc_khz"],
        "network": machine["network"],
        "network_allow": network_allow,
    }
    return manifest, fields


async def _restore(
    bundle_dir: Path,
    name: str | None,
    image: str | os.PathLike | None,
    accel: str | None,
    boot_timeout: float,
    detached: bool,
    ports: Sequence[PortSpec] | None,
    progress: Callable[[str], None] | None,
    trust: bool,
    network_allow: list[str],
) -> VM:
    name = registry.validate_name(name) if name is not None else registry.new_name()
    forwards = parse_port_forwards(ports)
    bundle_dir = bundle_dir.expanduser().resolve()
    manifest, fields = await _restore_plan(
        bundle_dir, image, accel, progress or (lambda message: None), trust, network_allow
    )
    registry.ensure_free(name)
    config = SupervisorConfig(
        name=name,
        ram_dir=_new_ram_dir(name),
        boot_timeout=boot_timeout,
        detached=detached,
        ports=forwards,
        incoming={
            "bundle": str(bundle_dir),
            "files": manifest.data["files"],
            "ram_in_state": manifest.ram_in_state,
            "chain": [[fields["image"], "raw"]],
            "disk_size": manifest.machine["disk_size"],
            "holds": [],
            "source": manifest.data.get("source"),
        },
        **fields,
    )
    return await _start_supervisor(config)


async def _restore_siblings(
    bundle_dir: Path,
    names: list[str],
    image: str | os.PathLike | None,
    accel: str | None,
    boot_timeout: float,
    detached: bool,
    progress: Callable[[str], None] | None,
    trust: bool,
    network_allow: list[str],
) -> Forks:
    """Several VMs from one bundle sharing its RAM copy-on-write, as fork siblings do.

    The bundle's RAM and disk are copied once into a fork template and a
    frozen layer (the bundle stays untouched); every sibling maps the
    template privately and writes its own layer on top.
    """
    bundle_dir = bundle_dir.expanduser().resolve()
    manifest, fields = await _restore_plan(
        bundle_dir, image, accel, progress or (lambda message: None), trust, network_allow
    )
    if manifest.ram_in_state:
        raise SnapshotError(
            "this bundle carries its RAM inside the device state (a snapshot of a fork): restore it once, "
            "then fork that VM",
            code="SNAPSHOT_RAM_IN_STATE",
        )
    for name in names:
        registry.ensure_free(name)
    _check_fork_memory(len(names), fields)
    template, template_ref = layers.new_template()
    layer, layer_ref = layers.new_layer()
    try:
        for source, target in (
            (bundle.MEM, template.mem), (bundle.STATE, template.state), (bundle.DISK, layer.disk)
        ):  # fmt: skip
            await anyio.to_thread.run_sync(
                bundle.copy_verified, bundle_dir / source, target, manifest.data["files"][source]
            )
        incoming = {
            "state": str(template.state),
            "mem": str(template.mem),
            "ram_in_state": False,
            "chain": [[str(layer.disk), "qcow2"], [fields["image"], "raw"]],
            "disk_size": manifest.machine["disk_size"],
            "holds": [str(template.path), str(layer.path)],
            "source": manifest.data.get("source"),
        }
        siblings = await _start_siblings(names, fields, incoming, boot_timeout, detached, [])
    finally:
        layers.close_quietly(template_ref)
        layers.close_quietly(layer_ref)
    return Forks(siblings)


async def stop_vm(name: str, *, force: bool = False) -> str:
    """Stop VM ``name`` of this host, whoever started it; ``force`` SIGKILLs it.

    Returns how it went: "stopped", or "killed" when it had to be SIGKILLed
    (forced, or its supervisor did not finish a clean stop in time); raises
    STOP_FAILED if it is still there after that."""
    entry = registry.find(name)
    if not force:
        async with connect(name) as vm:
            return await vm.stop()
    registry.kill_holder(entry)
    if not await registry.wait_until_gone(entry, SUPERVISOR_KILL_GRACE_S):
        raise MachinenError(f"{name}'s supervisor survived SIGKILL", code="STOP_FAILED")
    registry.clear_leftovers(entry)
    return "killed"


async def _stop_or_kill(entry: registry.VmDir) -> str:
    """Wait for a supervisor asked to stop; SIGKILL it if it does not finish in time."""
    if await registry.wait_until_gone(entry, SUPERVISOR_STOP_GRACE_S + 5):
        return "stopped"
    registry.kill_holder(entry)
    if not await registry.wait_until_gone(entry, SUPERVISOR_KILL_GRACE_S):
        raise MachinenError(f"{entry.name}'s supervisor survived SIGKILL", code="STOP_FAILED")
    registry.clear_leftovers(entry)
    return "killed"


@asynccontextmanager
async def connect(name: str) -> AsyncIterator[VM]:
    """Attach to a running VM by name; leaving the block only disconnects."""
    entry = registry.find(name)
    try:
        channel, info = await _open_channel(entry.supervisor_socket)
    except OSError:
        raise MachinenError(f"VM {name!r} is not accepting connections", code="REGISTRY_VM_NOT_FOUND") from None
    vm = VM(channel, info)
    try:
        yield vm
    finally:
        await vm.aclose()
