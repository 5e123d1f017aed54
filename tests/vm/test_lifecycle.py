"""VMs owned by boot(): clean exits, cancellation, failures, typed errors."""

from __future__ import annotations

import os
import signal

import anyio
import pytest
from conftest import SHARED_VM, qemu_processes, runtime_leftovers

from machinen_async import AgentUnavailableError, BootError, MachinenError, RegistryError, boot, connect
from machinen_async.store import paths

pytestmark = pytest.mark.anyio


def _assert_nothing_left(name: str) -> None:
    assert not [p for p in qemu_processes() if f"machinen.hostname={name} " in p]
    assert not (paths.vms_dir() / name).exists()
    assert not [d for d in runtime_leftovers() if d.startswith(f"{name}-")]


async def test_boot_exec_files_and_clean_exit(anyio_backend):
    name = f"own-{anyio_backend}"
    async with boot(memory_mib=256, name=name) as vm:
        result = await vm.exec(["sh", "-c", "echo hi; echo oops >&2; exit 3"])
        assert (result.exit_code, result.stdout, result.stderr) == (3, b"hi\n", b"oops\n")
        async with vm.process(["cat"]) as proc:
            await proc.stdin.send(b"ping\n")
            await proc.stdin.aclose()
            assert b"".join([chunk async for chunk in proc.stdout]) == b"ping\n"
            assert await proc.wait() == 0
        await vm.write_file("/root/x.txt", b"data", mode=0o600)
        assert await vm.read_file("/root/x.txt") == b"data"
        entry = paths.vms_dir() / name
        ram_dir = paths.runtime_dir()
        for path in [entry, *entry.iterdir(), ram_dir, *ram_dir.rglob(f"{name}-*/*")]:
            assert path.stat().st_mode & 0o077 == 0, f"{path} is reachable by other users"
        assert {"supervisor.sock", "agent.sock", "qmp.sock", "console.log", "meta.json"} <= {
            p.name for p in entry.iterdir()
        }
    _assert_nothing_left(name)


@pytest.mark.parametrize("warm", [False, True])
async def test_cancelling_boot_leaves_nothing(anyio_backend, warm):
    name = f"cancel-boot-{anyio_backend}-{'warm' if warm else 'cold'}"
    async with anyio.create_task_group() as tg:

        async def booting() -> None:
            async with boot(name=name, warm=warm):
                raise AssertionError("boot should have been cancelled")

        tg.start_soon(booting)
        with anyio.fail_after(60):
            while not [p for p in qemu_processes() if f"machinen.hostname={name} " in p]:
                await anyio.sleep(0.01)
        if not warm:
            await anyio.sleep(0.5)  # QEMU is up, the guest is still booting (a warm one is resuming)
        tg.cancel_scope.cancel()
    _assert_nothing_left(name)


async def test_cancelling_mid_exec_stream_leaves_no_qemu(anyio_backend):
    name = f"cancel-exec-{anyio_backend}"
    with anyio.CancelScope() as scope:
        async with boot(name=name) as vm:
            async with vm.process(["yes"], stdin=False) as proc:
                await proc.stdout.receive()
                scope.cancel()
                await proc.wait()
    assert scope.cancelled_caught
    _assert_nothing_left(name)


async def test_qemu_killed_gives_agent_unavailable_and_cleanup(anyio_backend):
    name = f"killed-{anyio_backend}"
    async with boot(name=name) as vm:
        os.kill(vm.info["qemu_pid"], signal.SIGKILL)
        with pytest.raises(AgentUnavailableError) as lost:
            with anyio.fail_after(30):
                await vm.exec(["sleep", "10"])
        assert lost.value.code == "EXEC_AGENT_UNAVAILABLE"
    _assert_nothing_left(name)


async def test_boot_timeout_reports_console_and_cleans_up(anyio_backend):
    name = f"timeout-{anyio_backend}"
    with pytest.raises(BootError) as timeout:
        async with boot(name=name, boot_timeout=0.3, warm=False):
            pass
    assert timeout.value.code == "BOOT_TIMEOUT"
    assert "console tail" in timeout.value.message
    _assert_nothing_left(name)


async def test_missing_image(tmp_path):
    with pytest.raises(BootError) as missing:
        async with boot(image=tmp_path / "nope.tar.gz"):
            pass
    assert missing.value.code == "BOOT_IMAGE_NOT_FOUND"


@pytest.mark.parametrize("memory", [0, 32, "256", 10**9])
async def test_invalid_memory(memory):
    with pytest.raises(BootError) as invalid:
        async with boot(memory_mib=memory):
            pass
    assert invalid.value.code == "BOOT_MEMORY_INVALID"


async def test_registry_errors(shared_vm):
    with pytest.raises(RegistryError) as in_use:
        async with boot(name=SHARED_VM):
            pass
    assert in_use.value.code == "REGISTRY_NAME_IN_USE"
    with pytest.raises(RegistryError) as unknown:
        async with connect("no-such-vm"):
            pass
    assert unknown.value.code == "REGISTRY_VM_NOT_FOUND"
    with pytest.raises(RegistryError) as invalid:
        async with boot(name="../escape"):
            pass
    assert invalid.value.code == "REGISTRY_NAME_INVALID"


async def test_invalid_accelerator():
    with pytest.raises(MachinenError) as invalid:
        async with boot(accel="warp"):
            pass
    assert invalid.value.code == "BOOT_ACCEL_INVALID"


async def test_concurrent_boots_on_a_busy_host(anyio_backend):
    # Regression: under TCG a busy host made guest kernels fail TSC calibration and hang at time 0.
    names = [f"together-{anyio_backend}-{i}" for i in range(3)]
    hostnames: dict[str, bytes] = {}

    async def one(name: str) -> None:
        async with boot(name=name) as vm:
            hostnames[name] = (await vm.exec(["hostname"], check=True)).stdout

    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(one, name)
    assert hostnames == {name: f"{name}\n".encode() for name in names}
    for name in names:
        _assert_nothing_left(name)
