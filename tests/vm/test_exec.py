"""Exec, streaming, files and signals against the shared detached VM."""

from __future__ import annotations

import os
import signal

import anyio
import pytest

from machinen_async import AgentUnavailableError, ExecError, ExecTimeoutError, GuestFileError, connect

pytestmark = pytest.mark.anyio


def _rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_exit_codes_and_stream_separation(shared_vm):
    async with connect(shared_vm) as vm:
        result = await vm.exec(["sh", "-c", "echo hi; echo oops >&2; exit 3"])
        assert (result.exit_code, result.stdout, result.stderr) == (3, b"hi\n", b"oops\n")
        assert (await vm.exec("true")).exit_code == 0
        killed = await vm.exec(["sh", "-c", "kill -9 $$"])
        assert (killed.exit_code, killed.signal) == (128 + 9, 9)
        with pytest.raises(ExecError) as failure:
            await vm.exec(["false"], check=True)
        assert failure.value.code == "EXEC_NONZERO_EXIT"
        assert failure.value.result.exit_code == 1


async def test_env_cwd_and_input(shared_vm):
    async with connect(shared_vm) as vm:
        result = await vm.exec(
            ["sh", "-c", 'echo "$GREETING"; pwd; cat'], env={"GREETING": "hey"}, cwd="/tmp", input=b"piped"
        )
        assert result.stdout == b"hey\n/tmp\npiped"


async def test_missing_command_and_cwd_are_typed_errors(shared_vm):
    async with connect(shared_vm) as vm:
        with pytest.raises(ExecError) as missing:
            await vm.exec(["/no/such/binary"])
        assert missing.value.code == "EXEC_COMMAND_NOT_FOUND"
        with pytest.raises(ExecError) as bad_cwd:
            await vm.exec(["true"], cwd="/no/such/dir")
        assert bad_cwd.value.code == "EXEC_CWD_NOT_FOUND"


async def test_stdin_streaming_is_interactive(shared_vm):
    async with connect(shared_vm) as vm:
        async with vm.process(["cat"]) as proc:
            for word in (b"ping\n", b"pong\n"):
                await proc.stdin.send(word)
                assert await proc.stdout.receive() == word  # echoed before we send more
            await proc.stdin.aclose()
            assert [chunk async for chunk in proc.stdout] == []
            assert await proc.wait() == 0


async def test_large_output_streams_with_bounded_host_memory(shared_vm):
    total = 64 * 1024 * 1024
    async with connect(shared_vm) as vm:
        supervisor_pid = vm.info["supervisor_pid"]
        rss_before = _rss_mib(), _rss_mib(supervisor_pid)
        rss_peak = list(rss_before)
        received = 0
        async with vm.process(["head", "-c", str(total), "/dev/zero"], stdin=False) as proc:
            async for chunk in proc.stdout:
                received += len(chunk)
                if received % (8 * 1024 * 1024) < len(chunk):
                    rss_peak = [max(rss_peak[0], _rss_mib()), max(rss_peak[1], _rss_mib(supervisor_pid))]
            assert await proc.wait() == 0
    assert received == total
    # Flow control keeps both hops to about one credit window per stream.
    assert rss_peak[0] - rss_before[0] < 32, (rss_before, rss_peak)
    assert rss_peak[1] - rss_before[1] < 32, (rss_before, rss_peak)


async def test_32_concurrent_execs(shared_vm):
    async with connect(shared_vm) as vm:
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            result = await vm.exec(["sh", "-c", f"sleep 0.2; echo {i}; echo err{i} >&2"], check=True)
            assert result.stderr == f"err{i}\n".encode()
            results[i] = result.stdout

        async with anyio.create_task_group() as tg:
            for i in range(32):
                tg.start_soon(one, i)
    assert results == {i: f"{i}\n".encode() for i in range(32)}


async def test_exec_timeout_kills_the_guest_process(shared_vm):
    async with connect(shared_vm) as vm:
        with pytest.raises(ExecTimeoutError) as timeout:
            await vm.exec(["sh", "-c", "echo $$ > /tmp/timeout.pid; echo started; sleep 300"], timeout=1)
        assert timeout.value.code == "EXEC_AGENT_TIMEOUT"
        assert timeout.value.result.stdout == b"started\n"
        pid = (await vm.read_file("/tmp/timeout.pid")).decode().strip()
        assert (await vm.exec(["test", "-e", f"/proc/{pid}"])).exit_code == 1


async def test_signal_delivery(shared_vm):
    script = "trap 'echo got-term; exit 5' TERM; echo ready; while :; do sleep 0.05; done"
    async with connect(shared_vm) as vm:
        async with vm.process(["sh", "-c", script], stdin=False) as proc:
            assert await proc.stdout.receive() == b"ready\n"
            await proc.send_signal(signal.SIGTERM)
            assert await proc.stdout.receive() == b"got-term\n"
            assert await proc.wait() == 5
        async with vm.process(["sleep", "300"], stdin=False) as proc:
            await proc.kill()
            assert await proc.wait() == 128 + signal.SIGKILL
            assert proc.signal == signal.SIGKILL


async def test_cancelled_exec_kills_the_guest_process(shared_vm):
    async with connect(shared_vm) as vm:
        with anyio.move_on_after(30):
            async with vm.process(["sh", "-c", "echo $$; exec yes"], stdin=False) as proc:
                pid = (await proc.stdout.receive()).split(b"\n")[0].decode()
                received = 0
                with anyio.CancelScope() as scope:
                    async for chunk in proc.stdout:
                        received += len(chunk)
                        if received > 4 * 1024 * 1024:
                            scope.cancel()
        gone = await vm.exec(
            ["sh", "-c", f"for i in $(seq 50); do test -e /proc/{pid} || exit 0; sleep 0.1; done; exit 1"]
        )
        assert gone.exit_code == 0, f"guest process {pid} survived the cancelled exec"


async def test_background_child_does_not_hang_exec(shared_vm):
    async with connect(shared_vm) as vm:
        with anyio.fail_after(20):
            result = await vm.exec(["sh", "-c", "sleep 30 & echo started"])
        assert result.stdout == b"started\n"


async def test_file_round_trip(shared_vm):
    payload = os.urandom(10 * 1024 * 1024)
    async with connect(shared_vm) as vm:
        await vm.write_file("/root/blob.bin", payload, mode=0o600)
        assert await vm.read_file("/root/blob.bin") == payload
        assert (await vm.exec(["stat", "-c", "%a %s", "/root/blob.bin"])).stdout == f"600 {len(payload)}\n".encode()
        await vm.write_file("/root/log.txt", b"a\n")
        await vm.write_file("/root/log.txt", b"b\n", append=True)
        assert await vm.read_file("/root/log.txt") == b"a\nb\n"
        await vm.write_file("/root/deep/er/x", b"x", parents=True)
        assert await vm.read_file("/root/deep/er/x") == b"x"
        with pytest.raises(GuestFileError) as missing:
            await vm.read_file("/no/such/file")
        assert missing.value.code == "FILE_NOT_FOUND"
        with pytest.raises(GuestFileError) as no_dir:
            await vm.write_file("/no/such/dir/file", b"x")
        assert no_dir.value.code == "FILE_NOT_FOUND"


async def test_ping_and_describe(shared_vm):
    async with connect(shared_vm) as vm:
        assert (await vm.ping())["pong"] is True
        info = await vm.describe()
        assert info["name"] == shared_vm
        assert info["agent"]["hostname"] == shared_vm
        assert info["accel"] in ("kvm", "tcg")


async def test_agent_channel_reset_reconnects(shared_vm):
    async with connect(shared_vm) as vm:
        async with vm.process(["sh", "-c", "echo $$; exec sleep 300"], stdin=False) as proc:
            pid = (await proc.stdout.receive()).decode().strip()
            info = await vm.reset_agent_channel()
            assert info["agent"]["hostname"] == shared_vm
            with pytest.raises(AgentUnavailableError) as reset:
                await proc.wait()
            assert reset.value.retryable
        assert (await vm.exec(["echo", "after"])).stdout == b"after\n"
        # The call's process outlives the session that started it, as in a fork.
        assert (await vm.exec(["test", "-e", f"/proc/{pid}"])).exit_code == 0
        await vm.exec(f"kill {pid}", check=True)


async def test_output_beyond_max_output_is_a_typed_error(shared_vm):
    async with connect(shared_vm) as vm:
        with pytest.raises(ExecError) as big:
            await vm.exec(["sh", "-c", "echo $$ > /tmp/big.pid; exec head -c 3000000 /dev/zero"], max_output=1_000_000)
        assert big.value.code == "EXEC_OUTPUT_TOO_LARGE"
        pid = (await vm.read_file("/tmp/big.pid")).decode().strip()
        gone = f"for i in $(seq 50); do test -e /proc/{pid} || exit 0; sleep 0.1; done; exit 1"
        assert (await vm.exec(["sh", "-c", gone])).exit_code == 0, "the process outlived its exec"
        assert len((await vm.exec(["head", "-c", "3000000", "/dev/zero"], max_output=None)).stdout) == 3000000
        with pytest.raises(GuestFileError) as large:
            await vm.read_file("/etc/passwd", max_output=10)
        assert large.value.code == "FILE_TOO_LARGE"
        assert b"root" in await vm.read_file("/etc/passwd")
