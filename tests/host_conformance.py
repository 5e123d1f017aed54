"""The ``HostDriver`` contract as one check, run against each driver (trio's
``testing/_check_streams.py`` is the model): ``check_host_driver(driver, name)``.

A driver boots a VM and hands back an owned ``Connection``; ``list`` shows it; the VM runs
commands; ``connect`` reaches it again without owning it; ``stop`` and closing an owned
connection each end it; what a caller gets wrong fails
with a registered ``MachinenError``; ``aclose`` leaves nothing running.  Under
``MACHINEN_VMM=fake`` (the unit tier) it takes seconds; under QEMU it is the same check.

Also ``LoopbackDriver``: a ``RemoteDriver`` whose transport runs ``machinen _peer`` as a
subprocess of this machine (no sshd), so the remote path (peer protocol, owned VMs held by the
peer, errors crossing it) is tested in the unit tier.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Awaitable
from pathlib import Path

import anyio
import anyio.abc
from anyio.streams.stapled import StapledByteStream

from machinen_async import Host
from machinen_async.errors import ERRORS, MachinenError, TransferError
from machinen_async.hosts.base import HostDriver
from machinen_async.hosts.remote import RemoteDriver
from machinen_async.protocol.messages import BootRequest
from machinen_async.version import __version__


class LoopbackTransport:
    """``machinen _peer`` as a local subprocess; a VM's socket is reached where it is."""

    def __init__(self) -> None:
        self.process: anyio.abc.Process | None = None

    async def open(self) -> anyio.abc.ByteStream:
        self.process = await anyio.open_process(
            [sys.executable, "-m", "machinen_async", "_peer"], stderr=subprocess.DEVNULL
        )
        return StapledByteStream(self.process.stdin, self.process.stdout)

    async def why_lost(self) -> MachinenError:
        return TransferError("the loopback peer exited", code="HOST_CONNECTION_LOST")

    async def forward(self, remote_socket: str, local_dir: Path) -> str:
        return remote_socket

    async def close(self) -> None:
        if self.process is None:
            return
        await self.process.stdin.aclose()  # the peer's end of input: it stops its owned VMs and exits
        with anyio.move_on_after(30):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


class LoopbackDriver(RemoteDriver):
    def __init__(self) -> None:
        super().__init__("loopback")

    def new_transport(self) -> LoopbackTransport:
        return LoopbackTransport()


async def _names(driver: HostDriver) -> list[str]:
    return [row["name"] for row in await driver.list()]


async def _fails_with(code: str, call: Awaitable[object]) -> None:
    """Awaiting ``call`` raises the ``MachinenError`` of ``code`` (the same class on every driver)."""
    try:
        await call
    except MachinenError as error:
        assert [row.cls for row in ERRORS if code in row.codes] == [type(error)] and error.code == code, error
    else:
        raise AssertionError(f"no {code}")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


async def check_host_driver(driver: HostDriver, name: str) -> None:
    """Everything a ``HostDriver`` promises, in one run; ``name``: a prefix no other VM has."""
    host = Host(driver)
    try:
        assert (await driver.info())["version"] == __version__

        stopped_by_name = host.vm(await driver.boot(BootRequest(name=f"{name}-a", warm=False)))
        closed_by_owner = host.vm(await driver.boot(BootRequest(name=f"{name}-b", warm=False)))
        pids = [vm.info["qemu_pid"] for vm in (stopped_by_name, closed_by_owner)]
        assert {f"{name}-a", f"{name}-b"} <= set(await _names(driver))
        ran = await stopped_by_name.exec(["sh", "-c", "hostname; echo out; echo err >&2; exit 3"])
        assert (ran.exit_code, ran.stdout, ran.stderr) == (3, f"{name}-a\nout\n".encode(), b"err\n")
        visitor = host.vm(await driver.connect(f"{name}-b"))  # not owned: closing it only disconnects
        assert (await visitor.exec(["hostname"])).stdout == f"{name}-b\n".encode()
        await visitor.aclose()
        assert (await closed_by_owner.exec(["true"])).exit_code == 0

        await _fails_with("REGISTRY_NAME_IN_USE", driver.boot(BootRequest(name=f"{name}-a", warm=False)))
        await _fails_with("REGISTRY_NAME_INVALID", driver.boot(BootRequest(name="../escape", warm=False)))
        await _fails_with("REGISTRY_VM_NOT_FOUND", driver.connect(f"{name}-unknown"))
        await _fails_with("REGISTRY_VM_NOT_FOUND", driver.stop(f"{name}-unknown"))

        assert await driver.stop(f"{name}-a") == "stopped"
        await stopped_by_name.aclose()
        await closed_by_owner.aclose()  # owned: closing the connection stops the VM
        assert not {f"{name}-a", f"{name}-b"} & set(await _names(driver))
        assert all(_gone(pid) for pid in pids)
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(MachinenError):
            await driver.aclose()
