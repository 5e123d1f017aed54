"""Warm start (issue 26): boot() resumes a boot template captured by the first boot of its start key,
and a warm pool hands over VMs resumed ahead of time (real VMs, both backends).

Every test starts with no template (its own template directory), so its first boot builds one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import anyio
import pytest
from conftest import machinen, qemu_processes
from test_ports import free_port, http_get, serve_http
from test_qemu_confined import _mounts

from machinen_async import Host, MachinenError, Mount, boot, restore, warm_pool
from machinen_async.store import assets, boot_templates, bundle, layers, paths
from machinen_async.store.manifest import BootFile, ImageIdentity, Manifest, SavedMachine

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def own_templates(tmp_path, monkeypatch):
    """Boots of this process keep their templates here (supervisors are told the path); removed
    after the test (~130 MiB each: pytest keeps the tmp_path of its last sessions)."""
    monkeypatch.setattr(boot_templates, "templates_dir", lambda: paths.private_dir(tmp_path / "boot-templates"))
    yield
    shutil.rmtree(tmp_path / "boot-templates", ignore_errors=True)


IDENTITY = "hostname; cat /etc/machine-id; head -c 128 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s"


def templates() -> set[str]:
    return {path.name for path in boot_templates.templates_dir().iterdir() if path.is_dir() and path.name[0] != "."}


async def start_of(vm) -> str:
    return (await vm.describe())["start"]


async def test_warm_vms_answer_as_cold_ones_with_identities_of_their_own(anyio_backend):
    memory = 264 if anyio_backend == "asyncio" else 268
    same = "cat /etc/os-release | head -2; uname -r; id; ls /"
    async with boot(memory_mib=memory, network=False, warm=False) as cold:
        assert await start_of(cold) == "cold"
        expected = (await cold.exec(same, check=True)).stdout
    async with boot(memory_mib=memory, network=False) as first:  # no template yet: cold, and captures one
        assert await start_of(first) == "cold"
    identities = []
    for _ in range(2):
        async with boot(memory_mib=memory, network=False) as vm:
            assert await start_of(vm) == "warm"
            hostname, machine_id, random, clock = (await vm.exec(IDENTITY, check=True)).stdout.decode().split()
            identities.append((hostname, machine_id, random))
            assert hostname == vm.name and len(machine_id) == 32
            assert abs(int(clock) - time.time()) < 5  # stepped to the host's time on resume
            assert (await vm.exec(same, check=True)).stdout == expected
    for column in zip(*identities, strict=True):
        assert len(set(column)) == len(column), identities  # hostname, machine-id, RNG output: all differ


async def test_a_warm_boot_applies_cmd_env_mounts_and_ports_as_a_cold_one(tmp_path, anyio_backend):
    memory = 272 if anyio_backend == "asyncio" else 276
    shared, copied = tmp_path / "shared", tmp_path / "copied"
    shared.mkdir()
    copied.mkdir()
    (copied / "note").write_text("copied in\n")
    async with boot(memory_mib=memory, network=False):
        pass  # builds the template
    port = free_port()
    workload = [
        "sh",
        "-c",
        'echo "$GREETING from $(pwd)" > /work/started; cat /copied/note >> /work/started; sleep 1000',
    ]
    async with boot(
        memory_mib=memory, network=False, cmd=workload, env={"GREETING": "hello"}, cwd="/tmp",
        mounts=[Mount(str(shared), "/work", live=True), f"{copied}:/copied"], ports=[f"{port}:8000"],
    ) as vm:  # fmt: skip
        assert await start_of(vm) == "warm"
        for _ in range(100):
            if (shared / "started").exists() and (shared / "started").read_text().count("\n") == 2:
                break
            await anyio.sleep(0.1)
        assert (shared / "started").read_text() == "hello from /tmp\ncopied in\n"
        await serve_http(vm)
        await vm.exec(["sh", "-c", "echo served > /srv/page"], check=True)
        assert await http_get(port, "/page") == b"served\n"


async def test_a_new_start_key_makes_a_new_template(monkeypatch):
    before = templates()
    async with boot(memory_mib=280, network=False) as vm:
        assert await start_of(vm) == "cold"
    async with boot(memory_mib=284, network=False) as other:  # another memory size: another key
        assert await start_of(other) == "cold"
    assert len(templates() - before) == 2
    # Another agent: its code is in the image, so the image and the key change.
    sources = assets._read_agent_sources()
    monkeypatch.setattr(assets, "_read_agent_sources", lambda: {**sources, "agent_marker.py": b"# another\n"})
    async with boot(memory_mib=280, network=False) as changed:
        assert await start_of(changed) == "cold"
    async with boot(memory_mib=280, network=False) as again:
        assert await start_of(again) == "warm"
    assert len(templates() - before) == 3


async def test_concurrent_first_boots_build_one_template(anyio_backend):
    memory = 288 if anyio_backend == "asyncio" else 292
    before = templates()
    starts: list[str] = []

    async def one() -> None:
        async with boot(memory_mib=memory, network=False) as vm:
            starts.append(await start_of(vm))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(one)
    assert sorted(starts) == ["cold", "warm", "warm", "warm"]
    assert len(templates() - before) == 1


async def test_a_damaged_template_is_discarded_and_rebuilt(anyio_backend):
    memory = 296 if anyio_backend == "asyncio" else 300
    before = templates()
    async with boot(memory_mib=memory, network=False):
        pass
    (key,) = templates() - before
    mem = boot_templates.templates_dir() / key / "mem"
    os.truncate(mem, mem.stat().st_size // 2)
    async with boot(memory_mib=memory, network=False) as vm:
        assert await start_of(vm) == "cold"  # never resumed from the damaged one
    async with boot(memory_mib=memory, network=False) as vm:
        assert await start_of(vm) == "warm"  # rebuilt by the boot before
    assert not [path for path in boot_templates.templates_dir().iterdir() if path.name.startswith(".discarded-")]


async def test_a_template_that_cannot_be_written_costs_only_the_warm_start(monkeypatch, tmp_path):
    """Its directory is gone when the capture writes (a gc, a full disk): the boot goes on, cold,
    and nothing is published, so the next boot of the key builds one."""
    monkeypatch.setattr(boot_templates, "new_partial", lambda: tmp_path / "gone" / ".partial-x")
    before = templates()
    async with boot(memory_mib=324, network=False) as vm:
        assert await start_of(vm) == "cold"
        assert (await vm.exec(["echo", "on"], check=True)).stdout == b"on\n"
    assert templates() == before


async def test_a_warm_pool_hands_over_distinct_fresh_vms_and_leaves_nothing(anyio_backend):
    memory = 304 if anyio_backend == "asyncio" else 308
    others = set(qemu_processes())  # VMs of other tests (the shared detached one)
    seen = set()
    async with warm_pool(size=2, memory_mib=memory, network=False) as pool:
        for _ in range(3):
            vm = await pool.acquire()
            assert await start_of(vm) in ("cold", "warm")
            hostname, machine_id, _, _ = (await vm.exec(IDENTITY, check=True)).stdout.decode().split()
            seen.add((vm.name, hostname, machine_id))
            await vm.aclose()
        kept = await pool.acquire()  # not given back: the pool stops it on leaving
        assert kept.name not in {name for name, _, _ in seen}
    assert len(seen) == 3 and len({machine_id for _, _, machine_id in seen}) == 3
    assert set(qemu_processes()) <= others
    with pytest.raises(MachinenError) as closed:
        await pool.acquire()
    assert closed.value.code == "POOL_CLOSED"


@pytest.mark.parametrize(
    ("options", "code"),
    [({"size": 0}, "POOL_SIZE_INVALID"), ({"size": True}, "POOL_SIZE_INVALID"), ({"name": "x"}, "POOL_OPTION_INVALID"),
     ({"warm": False}, "POOL_OPTION_INVALID"), ({"host": Host.local()}, "POOL_OPTION_INVALID")],
)  # fmt: skip
async def test_a_pool_refuses_what_it_cannot_honour(options, code):
    with pytest.raises(MachinenError) as refused:
        async with warm_pool(**options):
            pass
    assert refused.value.code == code


async def test_leaving_a_warm_pool_early_or_cancelled_leaves_no_qemu(anyio_backend):
    others = set(qemu_processes())
    with anyio.move_on_after(3):  # cancelled while its VMs are still booting
        async with warm_pool(size=2, memory_mib=312, network=False) as pool:
            await pool.acquire()
    assert set(qemu_processes()) <= others


def test_a_template_serves_other_processes():
    """Each CLI boot is a process of its own: the second resumes what the first (or an earlier run)
    captured, so nothing measured per process (the TCG guest's TSC rate) may be in the key."""
    starts = []
    for _ in range(2):
        done = machinen("boot", "--no-network", "--memory", "320", "--json", "--", "true")
        starts.append(json.loads(done.stdout.splitlines()[0])["start"])  # the description, then CMD's output
    assert starts[-1] == "warm", starts


def test_the_cli_boots_cold_when_asked():
    done = machinen("boot", "--no-network", "--memory", "316", "--cold", "--json", "--detach", "--name", "cli-cold")
    try:
        assert b'"start": "cold"' in done.stdout
    finally:
        machinen("stop", "cli-cold")


async def test_a_warm_vm_forks_and_its_snapshot_restores_as_siblings(tmp_path, anyio_backend):
    async with boot(network=False):
        pass  # builds the template
    async with boot(network=False) as vm:
        assert await start_of(vm) == "warm"
        await vm.exec(["sh", "-c", "echo before > /root/state"], check=True)
        async with vm.fork(n=2) as forks:
            await forks.map(lambda sibling, i: sibling.exec(["sh", "-c", f"echo {i} > /root/state"], check=True))
            assert [(await sibling.exec(["cat", "/root/state"])).stdout for sibling in forks] == [b"0\n", b"1\n"]
        await vm.snapshot(tmp_path / "warm.snap")
    assert (tmp_path / "warm.snap" / "mem").is_file()  # its RAM in a file of its own, not in the state
    async with restore(tmp_path / "warm.snap", n=2) as restored:
        assert [(await sibling.exec(["cat", "/root/state"])).stdout for sibling in restored] == [b"before\n"] * 2


# --- the template store, without VMs ---------------------------------------------------------


def fake_template(tmp_path, key: str, *, image_sha256: str = "0" * 64) -> Path:
    """A sealed bundle with a lock, as ``publish`` leaves one (its files are not a real VM's)."""
    partial = boot_templates.new_partial()
    (partial / "state").write_bytes(b"state")
    (partial / "mem").write_bytes(bytes(4096))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(partial / "disk.qcow2"), "1M"], check=True)
    machine = SavedMachine(type="q35", memory_mib=256, cpus=1, accel="tcg", tsc_khz=None, network=False,
                                    disk_size=1 << 20)  # fmt: skip
    bundle.seal(partial, Manifest(
        machine=machine, kernel=BootFile("1" * 64), initrd=BootFile("2" * 64),
        image=ImageIdentity(key="3" * 24, sha256=image_sha256), files={},
    ))  # fmt: skip
    assert boot_templates.publish(partial, key)
    return boot_templates.templates_dir() / key


def test_a_template_whose_state_changed_is_discarded(tmp_path):
    path = fake_template(tmp_path, "a" * 32)
    assert boot_templates.find("a" * 32) is not None
    (path / "state").write_bytes(b"STATE")  # same size, other bytes
    assert boot_templates.find("a" * 32) is None
    assert not path.exists() and not list(boot_templates.templates_dir().glob(".discarded-*"))


def test_gc_keeps_held_and_fresh_partial_templates_and_removes_the_rest(tmp_path):
    held, stale = fake_template(tmp_path, "b" * 32), fake_template(tmp_path, "c" * 32)
    reference = layers.Shared(held).hold()
    partial = boot_templates.new_partial()
    stray_lock = boot_templates.templates_dir() / f"{'e' * 32}.lock"  # a build of a key that left no template
    stray_lock.touch()
    try:
        # Neither kernel, initrd nor image of these fakes is cached: no boot can use them.
        removed = boot_templates.collect_unused()
        assert removed == [stale, stray_lock] and held.exists() and partial.exists()
    finally:
        layers.close_quietly(reference)
    assert boot_templates.collect_unused() == [held]


async def test_template_builds_of_one_key_take_turns(tmp_path):
    inside, most = 0, 0

    async def build() -> None:
        nonlocal inside, most
        async with boot_templates.building("d" * 32):
            inside += 1
            most = max(most, inside)
            await anyio.sleep(0.05)
            inside -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(build)
    assert most == 1


async def test_a_warm_vm_sees_its_template_read_only(anyio_backend):
    async with boot(network=False):
        pass  # builds the template
    async with boot(network=False) as vm:
        mounts = _mounts((await vm.describe())["qemu_pid"])
        template = [path for path in mounts if Path(path).parent.parent == boot_templates.templates_dir()]
        assert sorted(Path(path).name for path in template) == ["disk.qcow2", "mem"], mounts
        assert {mounts[path] for path in template} == {"ro"}
