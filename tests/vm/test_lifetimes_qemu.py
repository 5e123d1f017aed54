"""Lifetimes in real VMs: the supervisor stops a VM at its deadline, its owner long gone, or once it
is idle (after a snapshot of it, with on_idle)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from conftest import machinen, qemu_of

from machinen_async import boot, restore

TTL_S = 20  # counted from the supervisor's start, so it covers a cold boot under TCG
LATE_BOUND_S = 2.0  # the promise: gone within 2 s of the deadline
GONE_WITHIN_S = 30.0  # a bound on an idle VM's stop (its idle time, a look, QEMU's exit)
PARKED_WITHIN_S = 180.0  # the same with a snapshot first (RAM and disk written out under TCG)


def _listed(name: str) -> bool:
    rows = json.loads(machinen("ls", "--json").stdout)
    return any(row["name"] == name for row in rows)


def test_ttl_stops_a_detached_vm_whose_owner_was_killed() -> None:
    name = "ttl-owner-killed"
    owner = subprocess.Popen(
        [sys.executable, "-m", "machinen_async", "boot", "--name", name, "--detach", "--ttl", str(TTL_S), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        info = json.loads(owner.stdout.readline())  # printed once the VM is up
        owner.send_signal(signal.SIGKILL)  # whatever it was still doing
        owner.wait(timeout=30)
        deadline = info["deadline"]
        assert deadline is not None and time.time() < deadline, "booted after its deadline: raise TTL_S"
        assert _listed(name) and qemu_of(name)  # it outlives its owner ...
        while True:
            asked = time.time()
            if not _listed(name):
                break
            assert asked < deadline + LATE_BOUND_S, f"still running {asked - deadline:.1f} s after its deadline"
            time.sleep(0.2)
        assert asked >= deadline - 0.5  # not before its time (one clock: this machine's)
        assert not qemu_of(name)  # ... and its QEMU ended with it
    finally:
        if owner.poll() is None:
            owner.kill()
        machinen("stop", name, check=False)


@pytest.mark.anyio
async def test_idle_timeout_stops_a_vm_once_its_calls_are_done() -> None:
    name = "idle-qemu"
    try:
        async with boot(name=name, detached=True, idle_timeout=3) as vm:
            ran = await vm.exec(["sh", "-c", "sleep 6; echo done"], check=True)  # longer than idle: in use
            assert ran.stdout == b"done\n"
        with anyio.fail_after(GONE_WITHIN_S):
            while _listed(name):
                await anyio.sleep(0.5)
        assert not qemu_of(name)
    finally:
        machinen("stop", name, check=False)


@pytest.mark.anyio
async def test_on_idle_snapshot_parks_a_vm_that_restore_continues(anyio_backend: str, tmp_path: Path) -> None:
    """An idle VM's supervisor writes a bundle of it, then stops it; restoring the bundle brings back
    its disk and its memory (a tmpfs file, a running process)."""
    name, parked = f"idle-park-{anyio_backend}", tmp_path / "parked"
    state = "echo on-disk > /root/note; echo in-ram > /dev/shm/note; nohup sleep 86400 >/dev/null 2>&1 & echo $!"
    try:
        async with boot(name=name, detached=True, idle_timeout=10, on_idle=f"snapshot:{parked}") as vm:
            assert vm.info["on_idle"] == f"snapshot:{parked}"
            sleeper = int((await vm.exec(["sh", "-c", state], check=True)).stdout)  # one call: not idle midway
        with anyio.fail_after(PARKED_WITHIN_S):
            while _listed(name):
                await anyio.sleep(0.5)
        assert not qemu_of(name)
        async with restore(parked, name=name) as back:
            disk = await back.exec(["cat", "/root/note"], check=True)
            ram = await back.exec(["cat", "/dev/shm/note"], check=True)
            process = await back.exec(["cat", f"/proc/{sleeper}/cmdline"], check=True)
        assert (disk.stdout, ram.stdout) == (b"on-disk\n", b"in-ram\n")
        assert process.stdout == b"sleep\x0086400\x00"
    finally:
        machinen("stop", name, check=False)
