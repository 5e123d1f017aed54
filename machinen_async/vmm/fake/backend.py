"""A VMM backend with no VM, for fast tests: ``MACHINEN_VMM=fake`` (never the default).

The "machine" is the real guest agent (``guest/``) run on this host under bubblewrap: user, UTS,
PID and IPC namespaces of its own, so the identity a booted guest takes on (hostname, clock,
entropy, machine-id) changes nothing of the host's (root inside is no one outside); the host's
files read-only but a private ``/tmp``; the host's network, none where the machine has none.
Its agent port is one end of a socketpair that this backend bridges to ``launch.agent_socket`` as
QEMU bridges the virtio-serial port: the supervisor connects, drops and reconnects there as it
does to a VM, and the frames are the real agent's.

What it is not: no kernel and no disk (kernel, initrd and image are never read; a disk layer is an
empty file), no memory limit. ``pause``/``resume`` stop and continue every process of the machine.
Device state cannot be saved or loaded, so snapshot, fork, restore and handoff raise
``SNAPSHOT_VMM_UNSUPPORTED``, and a boot only misses its boot template (its warm start).

The smallest example of a backend: docs/extending.md "A new VMM backend".
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import anyio.abc

from ...errors import BootError, SnapshotError
from ...protocol.netpolicy import NetworkPolicy, ResolvedName
from ...protocol.secret import SecretRule
from ...store import paths
from ...version import __version__
from .. import capped_log
from ..backend import DiskChain, VmmLaunch

# Where ``machinen_async`` is imported from, for the agent's interpreter.
PACKAGE_ROOT = Path(__file__).resolve().parents[3]
ACCELERATOR = "fake"

# The agent as guest/init.py starts it in a VM after PID 1's set-up, on a descriptor instead of
# the virtio port.  Run, never imported: no host module imports guest/ (tests/unit/test_layout.py).
AGENT = """
import os, sys
from machinen_async.guest.server import Agent
from machinen_async.guest.task import BASE_ENV, take_image_defaults
take_image_defaults()
os.environ.update(BASE_ENV)
Agent(int(sys.argv[1])).serve()
"""


def unsupported(what: str) -> SnapshotError:
    return SnapshotError(
        f"the fake VMM (MACHINEN_VMM=fake) cannot {what}: it has no device state", code="SNAPSHOT_VMM_UNSUPPORTED"
    )


def _process_tree(root: int) -> set[int]:
    """``root`` and every process descended from it (from /proc: the agent's commands run in
    sessions of their own, so a process group would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    tree, queue = set(), [root]
    while queue:
        pid = queue.pop()
        tree.add(pid)
        queue += children.get(pid, [])
    return tree


def _signal_tree(root: int, signum: int) -> None:
    """Signal the whole tree, again until no new process appeared (one could fork meanwhile)."""
    signalled: set[int] = set()
    while new := _process_tree(root) - signalled:
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        signalled |= new


class FakeMachine:
    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        self.pid: int = process.pid
        self.paused: bool = False

    async def connect(self) -> None:
        """No control channel: the process is all there is."""

    async def set_network(self, policy: NetworkPolicy) -> None:
        """No network device: nothing to enforce."""

    def resolved_names(self) -> list[ResolvedName]:
        return []

    async def set_secrets(self, secrets: Sequence[SecretRule]) -> bytes:
        raise BootError("the fake VMM has no network to send secrets over", code="BOOT_SECRET_INVALID")

    async def exited(self) -> int:
        return await self.process.wait()

    async def pause(self) -> None:
        _signal_tree(self.pid, signal.SIGSTOP)
        self.paused = True

    async def resume(self) -> None:
        _signal_tree(self.pid, signal.SIGCONT)
        self.paused = False

    async def is_running(self) -> bool:
        return not self.paused and self.process.returncode is None

    async def freeze_disk(self, new_top: Path) -> None:
        raise unsupported("freeze a disk")

    async def save_state(self, into: Path | socket.socket, *, ram: bool) -> float:
        raise unsupported("save a machine's state")

    async def saves_live(self) -> bool:
        return False

    async def load_state(self, source: Path | socket.socket, *, ram: bool) -> None:
        raise unsupported("load a machine's state")

    async def version(self) -> str:
        return BACKEND.installed_version()


def _sandbox(launch: VmmLaunch, port_fd: int, tmp: Path) -> list[str]:
    """The agent under bubblewrap (see the module's docstring), reading its port on ``port_fd``."""
    network = [] if launch.hardware.network else ["--unshare-net"]
    # The package and the interpreter's environment (msgpack) shown again where the private /tmp
    # hides them: a checkout under /tmp (a CI clone) runs its agent from there.
    under_tmp = [path for path in {PACKAGE_ROOT, Path(sys.prefix).resolve()} if path.is_relative_to("/tmp")]
    return ["bwrap", "--unshare-user", "--uid", "0", "--gid", "0", "--unshare-uts", "--unshare-pid", "--unshare-ipc",
            *network, "--die-with-parent", "--hostname", launch.hardware.hostname,
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--bind", str(tmp), "/tmp",
            *(arg for path in sorted(under_tmp) for arg in ("--ro-bind", str(path), str(path))), "--chdir", "/",
            "--", sys.executable, "-c", AGENT, str(port_fd)]  # fmt: skip


async def _bridge(listener: anyio.abc.SocketListener, port: anyio.abc.SocketStream) -> None:
    """QEMU's socket chardev for the agent port: one host connection at a time, the next accepted
    once it is gone; what the agent writes while none is connected is dropped."""
    connected: list[anyio.abc.SocketStream] = []

    async def from_agent() -> None:
        async for data in port:
            if connected:
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await connected[0].send(data)

    async with anyio.create_task_group() as tg:
        tg.start_soon(from_agent)
        while True:
            async with await listener.accept() as host:
                connected.append(host)
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    async for data in host:
                        await port.send(data)
                connected.clear()


class FakeBackend:
    name = "fake"
    machine_type = "fake"

    def check_installed(self) -> None:
        if shutil.which("bwrap") is None:
            raise BootError("the fake VMM runs its agent under bwrap, which is not installed",
                            code="BOOT_CONFINEMENT_UNAVAILABLE")  # fmt: skip

    def installed_version(self) -> str:
        return f"fake-{__version__}"

    def launch_recipe(self) -> str:
        return "fake-1"

    def choose_accelerator(self, requested: str | None) -> str:
        if requested not in (None, "auto", ACCELERATOR):
            raise BootError(f"the fake VMM has no accelerator {requested!r} (use auto)", code="BOOT_ACCEL_INVALID")
        return ACCELERATOR

    def host_tsc_khz(self) -> int | None:
        return None

    @contextlib.asynccontextmanager
    async def start(self, launch: VmmLaunch) -> AsyncIterator[FakeMachine]:
        if launch.incoming or launch.never_run:
            raise unsupported("start a machine from saved state")
        tmp = launch.ram_file.parent / "fake-tmp"  # the VM's RAM directory: removed with the VM
        tmp.mkdir(mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            launch.agent_socket.unlink()
        port, agent_port = socket.socketpair()
        async with (
            await anyio.create_unix_listener(launch.agent_socket) as listener,
            await anyio.abc.UNIXSocketStream.from_socket(port) as port_stream,
        ):
            output = subprocess.PIPE if launch.logs else subprocess.DEVNULL
            try:
                process = await anyio.open_process(
                    _sandbox(launch, agent_port.fileno(), tmp), stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                    pass_fds=[agent_port.fileno()], env={"PYTHONPATH": str(PACKAGE_ROOT)}, start_new_session=True,
                )  # fmt: skip
            finally:
                agent_port.close()
            async with anyio.create_task_group() as helpers:
                helpers.start_soon(_bridge, listener, port_stream)
                if launch.logs and process.stdout and process.stderr:  # piped exactly then
                    limits = (capped_log.CONSOLE_LOG_LIMIT, capped_log.QEMU_LOG_LIMIT)
                    for stream, path, limit in zip((process.stdout, process.stderr), launch.logs, limits, strict=True):
                        helpers.start_soon(capped_log.copy_into, stream, path, limit)
                try:
                    yield FakeMachine(process)
                finally:
                    with anyio.CancelScope(shield=True):
                        _signal_tree(process.pid, signal.SIGKILL)  # stopped (paused) ones too
                        await process.wait()
                    helpers.cancel_scope.cancel()

    async def create_overlay(self, path: Path, backing: list[str], size: int) -> None:
        """An empty file: the fake machine has no disk (whatever is at ``path`` is replaced)."""
        os.close(paths.create_file(path))

    async def flatten_disk(self, chain: DiskChain, target: Path) -> None:
        raise unsupported("write a disk into a bundle")


BACKEND = FakeBackend()  # what vmm/backend.py's default() looks for in each backend folder
