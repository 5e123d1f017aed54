"""No call on a VM waits for another: the real VM, the real agent, the real supervisor.

The fast, exhaustive version of these promises (random interleavings,
cancellation, a dying peer) is test_channel.py against a fake agent.  The
1 s bounds below are what the issue asks of calls that answer in tens of
milliseconds; head-of-line blocking made them wait for the long call (8 s
and more).
"""

from __future__ import annotations

import subprocess
import sys
import time

import anyio
import pytest

from machinen_async import connect

pytestmark = pytest.mark.anyio

QUICK_S = 1.0


async def _one_by_one_quick_calls(vm) -> list[float]:
    """32 short execs, describe() and read_file, one after another; each one's seconds."""
    took = []

    async def timed(call) -> None:
        started = time.monotonic()
        with anyio.fail_after(30):  # a hung call fails here rather than at the test timeout
            await call()
        took.append(time.monotonic() - started)

    for i in range(32):

        async def short_exec(i: int = i) -> None:
            assert (await vm.exec(["echo", str(i)])).stdout == f"{i}\n".encode()

        await timed(short_exec)

    async def describe() -> None:
        assert (await vm.describe())["agent"]["hostname"] == vm.name

    async def read_file() -> None:
        assert b"root" in await vm.read_file("/etc/passwd")

    await timed(describe)
    await timed(read_file)
    return took


async def test_short_calls_return_while_a_stream_and_a_sleep_run(shared_vm):
    async with connect(shared_vm) as vm, anyio.create_task_group() as tg:
        streamed = 0

        async def stream() -> None:
            nonlocal streamed
            script = "i=0; while :; do echo line-$i; i=$((i+1)); sleep 0.005; done"
            async with vm.process(["sh", "-c", script], stdin=False) as proc:
                async for chunk in proc.stdout:
                    streamed += len(chunk)

        tg.start_soon(stream)
        tg.start_soon(vm.exec, ["sleep", "30"])
        with anyio.fail_after(30):
            while streamed == 0:
                await anyio.sleep(0.05)
        took = await _one_by_one_quick_calls(vm)
        before = streamed
        await anyio.sleep(0.3)
        assert streamed > before, "the stream stalled"
        tg.cancel_scope.cancel()
    assert max(took) < QUICK_S, sorted(took)[-5:]


async def test_unread_output_does_not_slow_other_calls(shared_vm):
    total = 10 * 1024 * 1024
    async with connect(shared_vm) as vm, vm.process(["head", "-c", str(total), "/dev/zero"], stdin=False) as flood:
        await anyio.sleep(0.5)  # it fills its credit window, then blocks in the guest
        took = await _one_by_one_quick_calls(vm)
        received = 0
        async for chunk in flood.stdout:  # still all there, in order, once read
            received += len(chunk)
        assert await flood.wait() == 0
    assert received == total
    assert max(took) < QUICK_S, sorted(took)[-5:]


async def test_cli_exec_from_another_process_during_a_long_exec(shared_vm):
    async with connect(shared_vm) as vm, anyio.create_task_group() as tg:
        long_done = anyio.Event()

        async def long_exec() -> None:
            await vm.exec(["sleep", "30"])
            long_done.set()

        tg.start_soon(long_exec)
        await anyio.sleep(0.3)
        for _ in range(3):
            with anyio.fail_after(60):
                result = await anyio.run_process(
                    [sys.executable, "-m", "machinen_async", "exec", shared_vm, "--", "echo", "other"],
                    stdin=subprocess.DEVNULL,
                )
            assert result.stdout == b"other\n"
        assert not long_done.is_set()  # the CLI calls ran beside it, not after it
        assert (await vm.ping())["pong"]
        tg.cancel_scope.cancel()


async def test_an_upload_nobody_reads_stalls_neither_its_client_nor_others(shared_vm):
    async with connect(shared_vm) as vm, connect(shared_vm) as other, anyio.create_task_group() as tg:

        async def stuck_upload() -> None:
            async with vm.process(["sleep", "30"]) as proc:  # never reads its stdin
                await proc.stdin.send(b"z" * (8 * 1024 * 1024))  # waits for credit that never comes

        tg.start_soon(stuck_upload)
        await anyio.sleep(0.5)
        took = await _one_by_one_quick_calls(vm) + await _one_by_one_quick_calls(other)
        tg.cancel_scope.cancel()
    assert max(took) < QUICK_S, sorted(took)[-5:]
