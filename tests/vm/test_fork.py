"""Fork: siblings of a running VM, from one instant, copy-on-write (real VMs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import anyio
import pytest
from conftest import qemu_of, qemu_processes, runtime_leftovers

from machinen_async import VM, MachinenError, boot
from machinen_async.store import layers

pytestmark = pytest.mark.anyio

# An in-memory counter: each poke increments a shell variable and replies with it.
COUNTER = (
    "mkfifo /tmp/poke /tmp/reply; "
    "nohup sh -c 'i=0; while :; do read x < /tmp/poke; i=$((i+1)); echo $i > /tmp/reply; done' "
    ">/dev/null 2>&1 &"
)


async def poke(vm: VM) -> int:
    result = await vm.exec(["sh", "-c", "echo > /tmp/poke; cat /tmp/reply"], check=True, timeout=30)
    return int(result.stdout)


async def snapshot_of(vm: VM) -> dict:
    script = "hostname; cat /root/state; cat /proc/sys/kernel/random/uuid; date +%s"
    hostname, state, uuid, clock = (await vm.exec(["sh", "-c", script], check=True)).stdout.decode().split()
    return {"hostname": hostname, "state": state, "uuid": uuid, "clock": int(clock)}


def copied_ram_mib(qemu_pid: int) -> float:
    """Pages of the fork-template RAM mapping this QEMU copied on write ("Anonymous"), in MiB."""
    private_kib, mapped, inside = 0, False, False
    with open(f"/proc/{qemu_pid}/smaps") as smaps:
        for line in smaps:
            if "-" in line.split()[0] and len(line.split()) >= 5:
                inside = "/templates/" in line and line.rstrip().endswith("/mem")
                mapped = mapped or inside
            elif inside and line.startswith("Anonymous:"):
                private_kib += int(line.split()[1])
    assert mapped, "this QEMU does not map a fork template"
    return private_kib / 1024


# Rewrites a buffer in guest RAM page by page, generation after generation, until its hostname
# changes (in a fork sibling); then checks the buffer against where the loop was: pages before
# the loop's position hold this generation, the rest the one before.  A sibling whose RAM was
# taken at more than one instant fails that.
REWRITER = """
import mmap, os, socket
PAGE, PAGES = 4096, 2048
buffer = mmap.mmap(-1, PAGE * PAGES)
me = socket.gethostname()
generation = 0
open("/tmp/rewriting", "w").close()
while True:
    generation += 1
    stamp = generation.to_bytes(8, "little")
    for page in range(PAGES):
        if os.uname().nodename != me:
            want = [generation if p < page else generation - 1 for p in range(PAGES)]
            seen = [int.from_bytes(buffer[p * PAGE:p * PAGE + 8], "little") for p in range(PAGES)]
            torn = sum(a != b for a, b in zip(want, seen))
            open("/tmp/verdict", "w").write(f"torn {torn} at generation {generation}" if torn else "consistent")
            raise SystemExit
        buffer[page * PAGE:page * PAGE + 8] = stamp
"""


async def test_siblings_diverge_from_one_instant(anyio_backend):
    async with boot(name=f"fsrc-{anyio_backend}") as source:
        await source.exec(["sh", "-c", f"echo 41 > /root/state; {COUNTER}"], check=True)
        assert [await poke(source), await poke(source)] == [1, 2]
        async with source.fork(n=3, name=f"fsib-{anyio_backend}") as forks:
            assert len(forks) == 3 and forks.source_pause_ms > 0
            # every sibling continues from count = 2, as does the source
            assert await forks.map(lambda vm, i: poke(vm)) == [3, 3, 3]
            assert await poke(source) == 3
            assert await poke(forks[0]) == 4
            assert [await poke(forks[1]), await poke(source)] == [4, 4]
            # disk: same contents at the fork, then independent
            await forks[0].exec(["sh", "-c", "echo changed > /root/state"], check=True)
            states = await forks.map(lambda vm, i: snapshot_of(vm))
            source_state = await snapshot_of(source)
            assert [s["state"] for s in states] == ["changed", "41", "41"] and source_state["state"] == "41"
            # identity: own hostname, own RNG stream, clock set to now
            assert [s["hostname"] for s in states] == [f"fsib-{anyio_backend}-{i}" for i in range(3)]
            uuids = {s["uuid"] for s in states} | {source_state["uuid"]}
            assert len(uuids) == 4, "siblings share RNG state"
            assert all(abs(s["clock"] - time.time()) < 5 for s in states)
            assert {vm.info["forked_from"] for vm in forks} == {f"fsrc-{anyio_backend}"}
    assert not qemu_of(f"fsib-{anyio_backend}-0")
    assert not layers.collect_garbage(dry_run=True), "layers or templates outlived every VM using them"


async def test_memory_is_shared_copy_on_write():
    async with boot(name="fmem", memory_mib=256) as source:
        async with source.fork(n=2, name="fmem-sib") as forks:
            await forks.map(lambda vm, i: vm.exec(["true"]))
            for vm in forks:
                private = copied_ram_mib((await vm.describe())["qemu_pid"])
                assert private < 0.08 * 256, f"sibling copied {private:.1f} MiB of guest RAM"


async def test_single_fork_closed_with_aclose(anyio_backend):
    async with boot(name=f"fone-{anyio_backend}") as source:
        child = await source.fork(name=f"fone-child-{anyio_backend}")
        try:
            assert (await child.exec(["hostname"])).stdout.decode().strip() == f"fone-child-{anyio_backend}"
        finally:
            await child.aclose()
        assert not qemu_of(f"fone-child-{anyio_backend}")
        assert (await source.exec(["true"])).exit_code == 0


LONG_SLEEPS = "for c in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $c; echo; done | grep -c '^sleep 300' || true"


async def test_siblings_race_as_completed_and_first(anyio_backend):
    """Results in finishing order; ``first`` takes the quick sibling, cancels the others' calls (their
    guest processes are gone soon after) and, with ``stop_losers``, stops the other siblings."""
    name = f"frace-{anyio_backend}"
    async with boot(name=name) as source, source.fork(n=3, name=f"{name}-sib") as forks:
        delays = [2, 0, 1]
        finished = [i async for i, _ in forks.as_completed(lambda vm, i: vm.exec(["sleep", str(delays[i])]))]
        assert finished == [1, 2, 0]

        def quick_one(index: int):
            return lambda vm, i: vm.exec(["sh", "-c", f"sleep {0 if i == index else 300}; echo {i}"], check=True)

        index, result = await forks.first(quick_one(1))
        assert (index, result.stdout) == (1, b"1\n")
        for loser in (forks[0], forks[2]):
            with anyio.fail_after(30):
                while int((await loser.exec(["sh", "-c", LONG_SLEEPS])).stdout):
                    await anyio.sleep(0.2)

        index, _ = await forks.first(quick_one(2), accept=lambda result: result.stdout == b"2\n", stop_losers=True)
        assert index == 2
        assert not qemu_of(f"{name}-sib-0") and not qemu_of(f"{name}-sib-1")
        assert (await forks[2].exec(["true"])).exit_code == 0


async def test_killed_sibling_leaves_the_others_running():
    async with boot(name="fkill") as source:
        async with source.fork(n=3, name="fkill-sib") as forks:
            os.kill(forks[1].info["qemu_pid"], signal.SIGKILL)
            results = await forks.map(lambda vm, i: vm.exec(["echo", str(i)]), return_exceptions=True)
            assert results[0].stdout == b"0\n" and results[2].stdout == b"2\n"
            assert isinstance(results[1], MachinenError) and results[1].code == "EXEC_AGENT_UNAVAILABLE"
            assert (await source.exec(["true"])).exit_code == 0


@pytest.mark.parametrize("cancel_after_s", [0.02, 0.3, 1.0, 2.5])
async def test_cancelling_a_fork_of_16_leaves_nothing(cancel_after_s):
    # From "still capturing" through "some siblings up, some starting" to "all up".
    async with boot(name="fcan") as source:
        with anyio.move_on_after(cancel_after_s) as scope:
            async with source.fork(n=16, name="fcan-sib", boot_timeout=120):
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        assert not [p for p in qemu_processes() if "fcan-sib" in p]
        assert not [d for d in runtime_leftovers() if d.startswith("fcan-sib")]
        assert (await source.exec(["true"])).exit_code == 0
    assert not [d for d in runtime_leftovers() if d.startswith("fcan")]
    assert not layers.collect_garbage(dry_run=True), "a template or layer leaked"


async def test_fork_errors():
    async with boot(name="ferr") as source:
        with pytest.raises(MachinenError) as bad_count:
            await source.fork(n=0)
        assert bad_count.value.code == "FORK_COUNT_INVALID"
        with pytest.raises(MachinenError) as too_many:
            await source.fork(n=100_000)
        assert too_many.value.code == "FORK_MEMORY_BACKPRESSURE"


async def test_fork_of_a_fork(anyio_backend):
    async with boot(name=f"fff-{anyio_backend}") as source:
        await source.exec(["sh", "-c", COUNTER], check=True)
        assert await poke(source) == 1
        async with source.fork(name=f"fff-child-{anyio_backend}") as child:
            assert await poke(child) == 2
            async with child.fork(n=2, name=f"fff-grand-{anyio_backend}") as grandchildren:
                assert "stream_ram" in grandchildren.source_pause_steps_ms  # the child's RAM is private
                assert await grandchildren.map(lambda vm, i: poke(vm)) == [3, 3]
                assert await poke(child) == 3
                assert await poke(grandchildren[0]) == 4
                assert [vm.info["forked_from"] for vm in grandchildren] == [f"fff-child-{anyio_backend}"] * 2
                async with grandchildren[1].fork(name=f"fff-great-{anyio_backend}") as great:
                    assert await poke(great) == 4
            assert await poke(source) == 2
    assert not layers.collect_garbage(dry_run=True)


async def rewrite_and_check_forks(source: VM) -> dict[str, float]:
    """Fork ``source`` while the guest rewrites memory: each sibling must find one instant."""
    await source.exec(["sh", "-c", 'nohup python3 -c "$0" >/dev/null 2>&1 &', REWRITER], check=True)
    await source.exec(["sh", "-c", "while [ ! -e /tmp/rewriting ]; do sleep 0.1; done"], check=True, timeout=60)
    await source.exec(["sh", "-c", "echo before > /root/disk; sync"], check=True)
    async with source.fork(n=2) as forks:
        verdicts = await forks.map(lambda vm, i: vm.exec(
            ["sh", "-c", "while [ ! -s /tmp/verdict ]; do sleep 0.1; done; cat /tmp/verdict"], timeout=60
        ))  # fmt: skip
        assert [v.stdout.decode() for v in verdicts] == ["consistent", "consistent"]
        await forks.map(lambda vm, i: vm.exec(["sh", "-c", f"echo {i} >> /root/disk; sync"], check=True))
        disks = await forks.map(lambda vm, i: vm.exec(["cat", "/root/disk"], check=True))
        assert [d.stdout for d in disks] == [b"before\n0\n", b"before\n1\n"]  # each its own layer
        steps = forks.source_pause_steps_ms
    assert (await source.exec(["test", "-e", "/tmp/verdict"])).exit_code == 1  # the source goes on rewriting
    assert (await source.exec(["cat", "/root/disk"], check=True)).stdout == b"before\n"
    return steps


@pytest.mark.parametrize("capture", ["copy", "stream"])
async def test_a_guest_rewriting_memory_forks_at_one_instant(capture, monkeypatch):
    monkeypatch.setenv("MACHINEN_FORK_CAPTURE", capture)
    async with boot(name=f"rewrite-{capture}", warm=False) as source:  # cold: its RAM is a file of its own
        steps = await rewrite_and_check_forks(source)
        assert ("stream_ram" if capture == "stream" else "copy_ram") in steps


async def test_a_sibling_rewriting_memory_forks_at_one_instant():
    async with boot(name="rewrite-parent") as parent, parent.fork(name="rewrite-child") as child:
        assert "stream_ram" in await rewrite_and_check_forks(child)  # a sibling's RAM is private: it streams


@pytest.mark.parametrize("cancel_after_s", [0.05, 0.25, 0.6])
async def test_cancelling_a_streamed_capture_leaves_nothing_and_the_source_running(cancel_after_s, monkeypatch):
    # Starting the helper, streaming (the guest stopped for it under QEMU 7.2 TCG), loading.
    monkeypatch.setenv("MACHINEN_FORK_CAPTURE", "stream")
    async with boot(name="scan") as source:
        with anyio.move_on_after(cancel_after_s) as scope:
            async with source.fork(n=2, name="scan-sib"):
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        assert (await source.exec(["true"], timeout=30)).exit_code == 0  # not left stopped
        assert not [p for p in qemu_processes() if "scan-sib" in p]
        async with source.fork(name="scan-again") as sibling:  # the capture lock and QMP still work
            assert (await sibling.exec(["true"])).exit_code == 0
    assert not [d for d in runtime_leftovers() if d.startswith("scan")]
    assert not layers.collect_garbage(dry_run=True), "a template or layer leaked"


def test_a_large_fork_raises_the_open_file_limit_or_says_why():
    script = """
import resource
from machinen_async.errors import MachinenError
from machinen_async.hosts.local import ensure_descriptors_for
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096))
ensure_descriptors_for(100)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
assert 800 <= soft <= hard == 4096, soft
try:
    ensure_descriptors_for(1000)
except MachinenError as error:
    print(error.code)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout == "FORK_FILE_LIMIT\n", result.stderr
