"""Spawning and owning supervisor processes on this machine.

A supervisor (``python -m machinen_async.supervisor CONFIG_JSON``) is one
VM.  Its stdin is our "lifeline": EOF before ``DETACH`` means its owner is
gone, and it stops the VM.  Many start at once through the zygote (one
interpreter start-up for all), which makes them its children, not ours: they
are watched through pidfds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from ..errors import BootError, MachinenError, error_from_code
from ..store import paths, registry
from ..supervisor.config import DETACH, SupervisorConfig
from .base import Connection, open_connection

SUPERVISOR_STOP_GRACE_S = 10.0
SUPERVISOR_KILL_GRACE_S = 10.0
# A supervisor that neither reports nor exits within boot_timeout plus this is killed.
STATUS_SLACK_S = 30.0


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

    Offers the part of ``anyio.abc.Process`` that ``SupervisorOwner`` uses.
    """

    def __init__(self, pid: int, status_fd: int, stderr_fd: int) -> None:
        self.pid: int = pid
        self._pidfd: int = os.pidfd_open(pid)
        self.stdout: _FdReceiveStream = _FdReceiveStream(status_fd)
        self.stderr: _FdReceiveStream = _FdReceiveStream(stderr_fd)
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


class SupervisorOwner:
    """The supervisor process a ``boot()`` started, and how to end it for sure."""

    def __init__(self, process: anyio.abc.Process | _ForkedSupervisor, lifeline: int, ram_dir: Path) -> None:
        self.process: anyio.abc.Process | _ForkedSupervisor = process
        self.lifeline: int = lifeline
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


def new_ram_dir(name: str) -> str:
    return str(paths.runtime_dir() / f"{name}-{os.urandom(4).hex()}")


async def start_supervisor(config: SupervisorConfig) -> Connection:
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
    return await await_supervisor(config, SupervisorOwner(process, lifeline, Path(config.ram_dir)))


async def start_supervisors(configs: list[SupervisorConfig]) -> list[SupervisorOwner]:
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
        owners.append(SupervisorOwner(_ForkedSupervisor(pid, p[2], p[4]), p[1], Path(config.ram_dir)))
    return owners


async def await_supervisor(config: SupervisorConfig, owner: SupervisorOwner) -> Connection:
    """Wait for a spawned supervisor's ready line and connect to it; stop it on failure."""
    name, detached, process, lifeline = config.name, config.detached, owner.process, owner.lifeline
    connection = None
    try:
        with anyio.fail_after(config.boot_timeout + STATUS_SLACK_S):
            status = await _read_status_line(process)
        if "ready" not in status:
            raise await _supervisor_failure(process, status)
        connection = await open_connection(registry.vm_dir(name).supervisor_socket)
        if detached:
            os.write(lifeline, DETACH)
    except BaseException:
        with anyio.CancelScope(shield=True):
            if connection is not None:
                await connection.channel.aclose()
            await owner.shutdown()
            if detached:
                await registry.wait_until_gone(registry.vm_dir(name), SUPERVISOR_STOP_GRACE_S + 5)
        raise
    if detached:
        await owner.release()
    else:
        connection.owner = owner
    return connection
