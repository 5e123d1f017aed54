"""Handoff and fork across hosts over SSH: real sshd servers on loopback, real VMs on both sides."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
from conftest import ls_json, machinen
from net import free_port
from test_fork import COUNTER, copied_ram_mib, poke
from test_oci_boot import busybox_layers, write_layout
from test_ports import http_get, serve_http

from machinen_async import (
    ExecResult,
    HandoffError,
    Host,
    HostError,
    MachinenError,
    NetworkPolicy,
    TransferError,
    boot,
    connect,
    restore,
)
from machinen_async.sdk import handoff as handoff_module
from machinen_async.sdk.spread import place

pytestmark = pytest.mark.anyio


async def remote_names(host) -> list[str]:
    return sorted(row["name"] for row in await host.list())


async def test_handoff_carries_a_running_process_on(remote_host, anyio_backend):
    async with Host.from_spec(remote_host.alias) as hostb:
        async with boot(name=f"mover-{anyio_backend}") as vm:
            await vm.exec(["sh", "-c", f"echo 41 > /root/state; {COUNTER}"], check=True)
            assert [await poke(vm), await poke(vm)] == [1, 2]
            moved = await vm.handoff(hostb)
            assert moved.host is hostb and moved.name == vm.name
            assert await poke(moved) == 3  # the same process, its memory intact
            assert (await moved.exec(["cat", "/root/state"])).stdout == b"41\n"
            async with moved.fork(n=2) as forks:  # on the host it runs on, from its template there
                assert [sibling.host for sibling in forks] == [hostb, hostb]
                assert [await poke(sibling) for sibling in forks] == [4, 4]
                assert await remote_names(hostb) == sorted([vm.name, *(sibling.name for sibling in forks)])
            assert vm.name not in [row["name"] for row in ls_json()]  # the source stopped here
            assert await remote_names(hostb) == [vm.name]
            report = moved.handoff_report
            assert report.precopy is not None and report.paused_ms > 0
            # The precopy sent nearly everything (image and kernel too: the host had nothing).
            assert report.precopy.bytes_sent > 20 * report.final.bytes_sent
            assert report.final.chunks_sent < report.final.chunks_total
        # An owned VM moved with its owner's lifetime: closing the connection stops it.
    async with Host.from_spec(remote_host.alias) as hostb:
        assert await remote_names(hostb) == []


async def test_handoff_cut_mid_transfer_leaves_the_source_running(remote_host):
    async with Host.from_spec(remote_host.alias) as hostb, boot(name="cut") as vm:
        await vm.exec(["sh", "-c", COUNTER], check=True)
        assert await poke(vm) == 1
        peer_pid = (await hostb.info())["pid"]
        # The sshd process serving this connection: killing it drops the TCP connection.
        sshd_pid = int(next(line.split()[1] for line in open(f"/proc/{peer_pid}/status") if line.startswith("PPid:")))
        assert "sshd" in open(f"/proc/{sshd_pid}/cmdline").read()
        cut = []

        def kill_the_connection(message: str) -> None:
            if message.startswith("sent ") and not cut:
                cut.append(message)
                os.kill(sshd_pid, signal.SIGKILL)

        # No precopy: the VM is paused during this transfer, so it must be resumed.
        with pytest.raises(TransferError) as failure:
            await vm.handoff(hostb, precopy=False, progress=kill_the_connection)
        assert cut and failure.value.code == "HOST_CONNECTION_LOST" and failure.value.retryable
        assert await poke(vm) == 2  # still here, running
        assert await remote_names(hostb) == []  # the host reconnects on its own; nothing started there
        # Retrying resumes: chunks that landed before the cut are not sent again.
        moved = await vm.handoff(hostb, precopy=False)
        assert moved.handoff_report.final.chunks_sent < moved.handoff_report.final.chunks_total
        assert await poke(moved) == 3
        described = await moved.describe()
        assert (described["deadline"], described["idle_timeout"]) == (None, None)  # no end here, none there
        await moved.aclose()


async def test_a_handoff_carries_the_deadline_and_idle_timeout(remote_host, anyio_backend):
    """The deadline is an instant: what crosses is the time left to it, taken as the VM moves (so
    an extended deadline moves as it stands, not the ttl the VM booted with), the idle timeout and
    the network policy as it is now."""
    async with (
        Host.from_spec(remote_host.alias) as hostb,
        boot(name=f"mortal-{anyio_backend}", ttl=600, idle_timeout=300) as vm,
    ):
        deadline = await vm.extend(3000)
        await vm.set_network(NetworkPolicy(allow=["pypi.org"], deny=["10.9.0.0/16"]))
        before = time.time()
        moved = await vm.handoff(hostb, precopy=False)
        after = time.time()
        described = await moved.describe()
        # The same instant, up to how late in the handoff the destination counted the time left from.
        assert deadline - 0.01 <= described["deadline"] <= deadline + (after - before)
        assert 3000 < described["deadline"] - time.time() <= 3600
        assert described["idle_timeout"] == 300
        assert moved.network == NetworkPolicy(allow=["pypi.org"], deny=["10.9.0.0/16"])
        assert [row["deadline"] for row in await hostb.list()] == [described["deadline"]]
        await moved.aclose()


async def test_second_transfer_sends_only_what_changed(remote_host, tmp_path):
    async with Host.from_spec(remote_host.alias) as hostb, boot(name="delta") as vm:
        await vm.snapshot(tmp_path / "one")
        first = await hostb.push(tmp_path / "one")
        again = await hostb.push(tmp_path / "one")
        assert (again.bytes_sent, again.chunks_sent) == (0, 0)
        assert again.remote_bundle == first.remote_bundle
        await vm.exec(["sh", "-c", "head -c 3000000 /dev/urandom > /root/blob; sync"], check=True)
        await vm.snapshot(tmp_path / "two")
        second = await hostb.push(tmp_path / "two")
        assert 3_000_000 < second.bytes_sent < first.bytes_sent / 5
        await serve_http(vm)
        await vm.exec(["cp", "/root/blob", "/srv/blob"], check=True)
        port = free_port()
        moved = await vm.handoff(hostb, precopy=False, ports=[f"{port}:8000"])
        assert moved.handoff_report.bytes_sent < first.bytes_sent / 5
        assert (await moved.exec(["wc", "-c", "/root/blob"])).stdout.split()[0] == b"3000000"
        # The server process moved too, and the host forwards its own port to it.
        assert len(await http_get(port, "/blob")) == 3_000_000
        # A snapshot taken there (on the image it received) restores here again.
        await moved.snapshot(tmp_path / "from-b")
        await moved.aclose()
    # Written by host B's machinen (its own key) onto a directory this host shares: not ours, so trusted
    # explicitly (pushed back, it would be signed here on arrival).
    async with restore(tmp_path / "from-b", name="back-home", trust=True) as back:
        assert (await back.exec(["wc", "-c", "/root/blob"])).stdout.split()[0] == b"3000000"


async def test_an_image_booted_vm_moves_by_digest_and_its_image_crosses_once(remote_host, tmp_path):
    """An OCI image's disk reaches a host once: a second VM of the same image hands off sending
    its memory and disk layer only; the image's config applies there, and both ends name the
    image by reference and manifest digest."""
    write_layout(tmp_path / "layout", busybox_layers(), {"config": {"Env": ["PATH=/bin", "GREETING=moved"]}})
    reference = f"oci:{tmp_path / 'layout'}:1"
    async with Host.from_spec(remote_host.alias) as hostb:
        async with boot(reference, network=False) as first:
            await first.snapshot(tmp_path / "first")
            source = (await first.describe())["image_source"]
        assert source.startswith(f"{reference}@sha256:")
        pushed = await hostb.push(tmp_path / "first")
        async with boot(reference, network=False, name="image-mover") as vm:
            await vm.exec(["sh", "-c", "echo state > /tmp/state"], check=True)
            moved = await vm.handoff(hostb, precopy=False)
            assert moved.handoff_report.final.bytes_sent < pushed.bytes_sent / 3  # no image this time
            assert await moved.exec(["sh", "-c", 'cat /tmp/state; echo "$GREETING"'], check=True) == ExecResult(
                0, b"state\nmoved\n", b""
            )
            assert (await moved.describe())["image_source"] == source
            assert [row["image_source"] for row in await hostb.list()] == [source]
            await moved.aclose()


async def test_a_host_boots_there_and_warm_after_its_first(remote_host, tmp_path, anyio_backend):
    """``Host.boot`` over SSH: the VM starts on that host from what it builds itself (its cache
    starts empty), and a second boot there resumes the template the first one captured.  A copied
    mount comes from this machine; ports and the workload are set up there as on a local boot;
    that host's refusals arrive typed."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "note").write_text("from the caller\n")
    port = free_port()
    async with Host.from_spec(remote_host.alias) as hostb:
        async with hostb.boot(name=f"rb-{anyio_backend}", memory_mib=192) as first:
            assert first.host is hostb and (await first.describe())["start"] == "cold"
        assert list((remote_host.cache / "boot-templates").glob("*/lock"))  # that host's own template
        launch = hostb.boot(
            name=f"rb2-{anyio_backend}", memory_mib=192, ports=[f"{port}:8000"], env={"GREETING": "hi"},
            mounts=[f"{tmp_path / 'data'}:/data:ro"], cmd=["sh", "-c", 'echo "$GREETING" > /tmp/workload'],
        )  # fmt: skip
        async with launch as vm:
            assert (await vm.describe())["start"] == "warm"
            assert (await vm.exec(["cat", "/data/note"])).stdout == b"from the caller\n"
            wait_for_it = "for i in $(seq 100); do [ -s /tmp/workload ] && break; sleep 0.1; done; cat /tmp/workload"
            waited = await vm.exec(["sh", "-c", wait_for_it])
            assert waited.stdout == b"hi\n"
            await serve_http(vm)
            assert await http_get(port, "/index.html") == b"hello\n"  # the port of that host (loopback here)
            assert await remote_names(hostb) == [vm.name]
        for options, code in (({"image": "/nowhere/rootfs.tar"}, "BOOT_IMAGE_NOT_FOUND"),
                              ({"memory_mib": 1 << 30}, "BOOT_MEMORY_INVALID")):  # fmt: skip
            with pytest.raises(MachinenError) as refused:
                await hostb.boot(name="refused", **options)
            assert refused.value.code == code
        assert await remote_names(hostb) == []
    if anyio_backend == "asyncio":  # the CLI, once
        booted = json.loads(machinen("boot", "--host", remote_host.alias, "--name", "clib", "--memory", "192",
                                     "-d", "--json", timeout=300).stdout)  # fmt: skip
        assert booted["name"] == f"{remote_host.alias}:clib" and booted["start"] == "warm"
        assert machinen("exec", f"{remote_host.alias}:clib", "--", "hostname").stdout == b"clib\n"
        machinen("stop", f"{remote_host.alias}:clib")


async def test_a_handoff_that_takes_too_long_resumes_the_source(remote_host, anyio_backend, monkeypatch):
    monkeypatch.setattr(handoff_module, "PAUSE_LIMIT_S", 0.3)  # the destination cannot take over this fast
    async with Host.from_spec(remote_host.alias) as hostb, boot(name=f"slow-move-{anyio_backend}") as vm:
        await vm.exec(["sh", "-c", COUNTER], check=True)
        assert await poke(vm) == 1
        with pytest.raises(HandoffError) as too_slow:
            await vm.handoff(hostb, precopy=False)
        assert too_slow.value.code == "HANDOFF_TIMEOUT" and too_slow.value.retryable
        assert await poke(vm) == 2  # runs on here, where it was
        assert vm.name not in await remote_names(hostb)


async def test_fork_across_two_hosts(remote_host, anyio_backend):
    async with Host.from_spec(remote_host.alias) as hostb, boot(name=f"spread-{anyio_backend}") as vm:
        await vm.exec(["sh", "-c", f"echo 10 > /root/state; {COUNTER}"], check=True)
        assert await poke(vm) == 1
        async with vm.fork(n=4, hosts=[Host.local(), hostb], name=f"sp-{anyio_backend}") as forks:
            assert set(forks.placement.values()) == {"local", remote_host.alias}
            assert [sibling.host is hostb for sibling in forks] == [
                forks.placement[sibling.name] == remote_host.alias for sibling in forks
            ]
            assert await forks.map(lambda sibling, i: poke(sibling)) == [2, 2, 2, 2]  # all from one instant
            hostnames = await forks.map(lambda sibling, i: sibling.exec(["hostname"]))
            assert [h.stdout.decode().strip() for h in hostnames] == [f"sp-{anyio_backend}-{i}" for i in range(4)]
            assert await poke(vm) == 2  # the source went on too
            for sibling in forks:  # on every host the siblings share one template copy-on-write
                assert copied_ram_mib((await sibling.describe())["qemu_pid"]) < 0.08 * 256
            assert len(await remote_names(hostb)) == list(forks.placement.values()).count(remote_host.alias)
        assert await remote_names(hostb) == []


def test_placement_balances_cpu_and_respects_memory():
    def facts(cpus: int, vms: int, free_mib: int) -> dict:
        return {"cpus": cpus, "vms": vms, "mem_available_mib": free_mib, "accel": "tcg"}

    roomy = [facts(2, 2, 20000), facts(4, 0, 20000)]
    assert place(6, roomy, 256) == [1, 1, 1, 1, 0, 1]
    # The second host has memory for its template and one sibling only.
    tight = [facts(2, 0, 20000), facts(8, 0, 600)]
    assert place(3, tight, 256) == [0, 1, 0]
    with pytest.raises(MachinenError) as refused:
        place(2, [facts(2, 0, 500)], 256)
    assert refused.value.code == "FORK_MEMORY_BACKPRESSURE"


async def test_host_errors_are_typed(ssh_hosts, shared_vm, anyio_backend):
    with pytest.raises(HostError) as unreachable:
        async with Host.ssh("127.0.0.1", port=1, connect_timeout=5):
            pass
    assert unreachable.value.code == "HOST_UNREACHABLE"

    alias = ssh_hosts.add(f"errs-{anyio_backend}").alias
    with pytest.raises(HostError) as missing:
        async with Host.ssh(alias, machinen="/nonexistent/machinen"):
            pass
    assert missing.value.code == "HOST_MACHINEN_NOT_FOUND"

    other_version = (
        f'{sys.executable} -c \'import machinen_async.version; machinen_async.version.__version__ = "9.9.9"; '
        "from machinen_async.cli import main; main()'"
    )
    with pytest.raises(HostError) as mismatch:
        async with Host.ssh(alias, machinen=other_version):
            pass
    assert mismatch.value.code == "HOST_VERSION_MISMATCH" and "9.9.9" in mismatch.value.message

    kvm_only = ssh_hosts.add(f"kvm-{anyio_backend}", extra_env={"MACHINEN_ACCEL": "kvm"}).alias
    async with Host.from_spec(kvm_only) as host, connect(shared_vm) as vm:
        with pytest.raises(HostError) as incompatible:
            await vm.handoff(host)
        assert incompatible.value.code == "HOST_INCOMPATIBLE" and "accelerator" in incompatible.value.message
        assert (await vm.exec(["true"])).exit_code == 0  # the source is untouched

    with pytest.raises(HostError) as bad_spec:
        Host.from_spec("user@host:22")
    assert bad_spec.value.code == "HOST_SPEC_INVALID"


def test_cli_handoff_push_restore_and_remote_addressing(remote_host, tmp_path):
    alias = remote_host.alias
    machinen("boot", "--name", "clihand", "--detach", timeout=300)
    machinen("exec", "clihand", "--", "sh", "-c", f"echo 5 > /root/state; {COUNTER}")
    machinen("exec", "clihand", "--", "sh", "-c", "echo > /tmp/poke; cat /tmp/reply")
    moved = json.loads(machinen("handoff", "clihand", alias, "--json", timeout=300).stdout)
    assert moved["name"] == f"{alias}:clihand" and moved["bytes_sent"] > 0 and moved["paused_ms"] > 0
    assert "clihand" not in [row["name"] for row in ls_json()]
    # The moved VM is detached on the host and addressed as HOST:NAME.
    poked = machinen("exec", f"{alias}:clihand", "--", "sh", "-c", "echo > /tmp/poke; cat /tmp/reply")
    assert poked.stdout == b"2\n"
    rows = json.loads(machinen("ls", "--host", alias, "--json").stdout)
    assert [row["name"] for row in rows] == [f"{alias}:clihand"]
    failed = machinen("exec", f"{alias}:clihand", "--", "sh", "-c", "exit 3", check=False)
    assert failed.returncode == 3
    # push + restore --host: a second VM on the host from a bundle made here.
    machinen("boot", "--name", "clipush", "--detach", timeout=300)
    machinen("exec", "clipush", "--", "sh", "-c", "echo pushed > /root/state")
    machinen("snapshot", "clipush", str(tmp_path / "snap"))
    # fork --host: detached siblings placed over this host and the other one.
    forked = json.loads(
        machinen("fork", "clipush", "-n", "3", "--new-name", "cf", "--host", "local", "--host", alias, "-d", "--json",
                 timeout=300).stdout
    )  # fmt: skip
    names = [sibling["name"] for sibling in forked]
    assert sorted(name.rpartition(":")[2] for name in names) == ["cf-0", "cf-1", "cf-2"]
    for name in names:
        assert machinen("exec", name, "--", "cat", "/root/state").stdout == b"pushed\n"
        machinen("stop", name)
    machinen("stop", "clipush")
    pushed = json.loads(machinen("push", str(tmp_path / "snap"), alias, "--json").stdout)
    assert pushed["bytes_sent"] < pushed["bytes_total"]  # the image and kernel are there already
    again = json.loads(machinen("push", str(tmp_path / "snap"), alias, "--json").stdout)
    assert again["bytes_sent"] == 0 and again["remote_bundle"] == pushed["remote_bundle"]
    restored = json.loads(
        machinen("restore", str(tmp_path / "snap"), "--host", alias, "--name", "clipush", "-d", "--json").stdout
    )
    assert restored["name"] == "clipush"
    assert machinen("exec", f"{alias}:clipush", "--", "cat", "/root/state").stdout == b"pushed\n"
    # restore -n: siblings sharing the bundle's RAM, on the host and here.
    for where, prefix in ((["--host", alias], "rn"), ([], "ln")):
        restored = json.loads(
            machinen("restore", str(tmp_path / "snap"), *where, "-n", "2", "--name", prefix, "-d", "--json").stdout
        )
        assert [vm["name"] for vm in restored] == [f"{prefix}-0", f"{prefix}-1"]
        for vm in restored:
            address = f"{alias}:{vm['name']}" if where else vm["name"]
            assert machinen("exec", address, "--", "cat", "/root/state").stdout == b"pushed\n"
            machinen("stop", address)
    for name in ("clihand", "clipush"):
        assert json.loads(machinen("stop", f"{alias}:{name}", "--json").stdout)["stopped"] is True
    assert json.loads(machinen("ls", "--host", alias, "--json").stdout) == []
