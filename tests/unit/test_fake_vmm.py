"""The SDK through real supervisors on the fake VMM (``MACHINEN_VMM=fake``: the real guest agent
under bubblewrap, no VM): fast checks of the host side. That a feature works in a VM is for
tests/vm/."""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import pytest

from machinen_async import boot
from machinen_async.errors import BootError, SnapshotError
from machinen_async.vmm import backend

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("fake_vmm")]


async def test_boot_exec_files_stop(anyio_backend: str) -> None:
    async with boot(name=f"fake-sdk-{anyio_backend}", warm=False) as vm:
        assert vm.info["accel"] == "fake"
        ran = await vm.exec(["sh", "-c", "hostname; cat"], input=b"typed")
        assert ran.stdout == f"fake-sdk-{anyio_backend}\ntyped".encode()
        await vm.write_file("/tmp/note", b"kept")
        assert await vm.read_file("/tmp/note") == b"kept"
        assert (await vm.ping())["pong"]
        await vm.reset_agent_channel()  # the supervisor drops agent.sock and connects again
        assert (await vm.read_file("/tmp/note")) == b"kept"
        assert await vm.stop() == "stopped"


async def test_what_it_cannot_do_fails_typed(tmp_path: Path, anyio_backend: str) -> None:
    async with boot(name=f"fake-nostate-{anyio_backend}") as vm:  # warm: its template capture fails, the boot does not
        with pytest.raises(SnapshotError) as snapshot:
            await vm.snapshot(tmp_path / "bundle")
        assert (await vm.exec(["true"])).exit_code == 0  # still running
    assert snapshot.value.code == "SNAPSHOT_VMM_UNSUPPORTED"


def test_never_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MACHINEN_VMM")
    assert backend.default().name == "qemu"
    assert "fake" in backend.available()


async def test_no_accelerator_but_its_own() -> None:
    with pytest.raises(BootError) as bad:
        async with boot(name="fake-kvm", accel="kvm"):
            pass
    assert bad.value.code == "BOOT_ACCEL_INVALID"


async def test_pause_stops_the_guest_processes(tmp_path: Path) -> None:
    """pause/resume stop and continue the agent and what it started (the capture path's promise)."""
    from machinen_async.vmm.fake.backend import BACKEND

    hardware = backend.Hardware(memory_mib=64, cpus=1, accel="fake", kernel=Path("-"), initrd=Path("-"),
                                hostname="fake-pause")  # fmt: skip
    launch = backend.VmmLaunch(hardware=hardware, ram_file=tmp_path / "mem", ram_shared=True, disk_chain=[],
                            agent_socket=tmp_path / "agent.sock", control_socket=tmp_path / "control.sock")  # fmt: skip
    async with BACKEND.start(launch) as machine:
        await machine.pause()
        assert not await machine.is_running()
        await _until_state(machine.pid, stopped=True)  # a signal lands when the kernel delivers it
        await machine.resume()
        assert await machine.is_running()
        await _until_state(machine.pid, stopped=False)
        with pytest.raises(SnapshotError):
            await machine.save_state(socket.socket(), ram=False)


async def _until_state(pid: int, *, stopped: bool) -> None:
    while (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T") != stopped:
        await anyio.sleep(0.01)
