"""Snapshot bundles and restore (real VMs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cbor2
import pytest
from conftest import qemu_processes
from test_fork import COUNTER, copied_ram_mib, poke

from machinen_async import BootError, SnapshotError, boot, connect, restore
from machinen_async.store import assets
from machinen_async.store import bundle as bundle_format

pytestmark = pytest.mark.anyio


async def test_snapshot_stop_restore_twice_keeps_state(anyio_backend, tmp_path):
    snap = tmp_path / "counter.snap"
    async with boot(name=f"snap-{anyio_backend}") as vm:
        await vm.exec(["sh", "-c", f"echo 41 > /root/state; {COUNTER}"], check=True)
        assert [await poke(vm), await poke(vm)] == [1, 2]
        info = await vm.snapshot(snap)
        assert info.path == snap and info.pause_ms > 0 and info.size_bytes > 0
        assert await poke(vm) == 3  # non-destructive: the source keeps running
    for attempt in range(2):
        async with restore(snap, name=f"again-{anyio_backend}-{attempt}") as again:
            assert await poke(again) == 3  # the in-memory counter continues from 2
            assert (await again.exec(["cat", "/root/state"])).stdout == b"41\n"
            assert (await again.exec(["hostname"])).stdout.decode().strip() == f"again-{anyio_backend}-{attempt}"
            await again.exec(["sh", "-c", "echo 99 > /root/state"], check=True)  # never reaches the bundle


async def test_snapshot_of_a_fork_restores(tmp_path):
    async with boot(name="snapfork") as vm:
        await vm.exec(["sh", "-c", COUNTER], check=True)
        assert await poke(vm) == 1
        async with vm.fork(name="snapfork-child") as child:
            assert await poke(child) == 2
            await child.snapshot(tmp_path / "child.snap")
    assert (tmp_path / "child.snap" / bundle_format.MEM).exists()  # its RAM streamed into a file of its own
    async with restore(tmp_path / "child.snap", name="snapfork-back") as back:
        assert await poke(back) == 3
    async with restore(tmp_path / "child.snap", n=2) as siblings:  # so it restores as siblings too
        assert [await poke(sibling) for sibling in siblings] == [3, 3]


async def test_bundle_is_private_and_verified_before_boot(shared_vm, tmp_path):
    snap = tmp_path / "shared.snap"
    async with connect(shared_vm) as vm:
        await vm.snapshot(snap)
    assert snap.stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in snap.iterdir()} == {
        name: 0o600 for name in ("state", "mem", "disk.qcow2", "manifest.cbor", "manifest.mac")
    }
    manifest = cbor2.loads((snap / "manifest.cbor").read_bytes())
    assert manifest["format"] == 1 and manifest["machine"]["memory_mib"] == 256
    assert set(manifest["files"]) == {"state", "mem", "disk.qcow2"}
    assert manifest["machine"]["accel"] in ("kvm", "tcg") and manifest["qemu_version"]
    assert cbor2.dumps(manifest, canonical=True) == (snap / "manifest.cbor").read_bytes()

    for name, offset in (("state", 100), ("mem", 1 << 20)):
        corrupt = tmp_path / f"corrupt-{name}"
        subprocess.run(["cp", "-r", "--sparse=always", str(snap), str(corrupt)], check=True)
        with open(corrupt / name, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))
        before = len(qemu_processes())
        with pytest.raises(SnapshotError) as refused:
            async with restore(corrupt):
                pass
        assert refused.value.code == "SNAPSHOT_CORRUPT"
        assert len(qemu_processes()) == before  # refused before QEMU started

    incompatible = tmp_path / "incompatible"
    subprocess.run(["cp", "-r", "--sparse=always", str(snap), str(incompatible)], check=True)
    (incompatible / "manifest.cbor").write_bytes(cbor2.dumps({**manifest, "qemu_version": "1.0.0"}, canonical=True))
    with pytest.raises(SnapshotError) as mismatch:
        async with restore(incompatible, trust=True):  # a rewritten manifest is untrusted first
            pass
    assert mismatch.value.code == "SNAPSHOT_INCOMPATIBLE"

    escape = tmp_path / "escape"
    subprocess.run(["cp", "-r", "--sparse=always", str(snap), str(escape)], check=True)
    files = {**manifest["files"], "../../etc/passwd": manifest["files"]["state"]}
    (escape / "manifest.cbor").write_bytes(cbor2.dumps({**manifest, "files": files}, canonical=True))
    with pytest.raises(SnapshotError) as hostile:
        async with restore(escape, trust=True):
            pass
    assert hostile.value.code == "SNAPSHOT_CORRUPT"
    # Kernel, initrd and image are found in caches by digest: a digest that is a path is refused.
    image = {**manifest["image"], "key": "../../../../tmp/evil"}
    (escape / "manifest.cbor").write_bytes(cbor2.dumps({**manifest, "image": image}, canonical=True))
    with pytest.raises(SnapshotError) as hostile_key:
        async with restore(escape, trust=True):
            pass
    assert hostile_key.value.code == "SNAPSHOT_CORRUPT" and "malformed key" in hostile_key.value.message


async def test_snapshot_and_restore_errors(shared_vm, tmp_path):
    with pytest.raises(BootError) as missing:
        async with restore(tmp_path / "nothing-here"):
            pass
    assert missing.value.code == "BOOT_SNAPSHOT_NOT_FOUND"
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    async with connect(shared_vm) as vm:
        with pytest.raises(SnapshotError) as not_empty:
            await vm.snapshot(occupied)
        assert not_empty.value.code == "SNAPSHOT_DIR_NOT_EMPTY"
        assert (occupied / "keep.txt").read_text() == "mine"
        with pytest.raises(SnapshotError) as no_parent:
            await vm.snapshot(Path(tmp_path / "no" / "such" / "parent"))
        assert no_parent.value.code == "SNAPSHOT_DIR_INVALID"


async def test_restore_n_siblings_share_the_bundle_ram(anyio_backend, tmp_path):
    async with boot(name=f"rsrc-{anyio_backend}") as vm:
        await vm.exec(["sh", "-c", f"echo 7 > /root/state; {COUNTER}"], check=True)
        assert await poke(vm) == 1
        await vm.snapshot(tmp_path / "snap")
    async with restore(tmp_path / "snap", n=3, name=f"rsib-{anyio_backend}") as siblings:
        assert [vm.name for vm in siblings] == [f"rsib-{anyio_backend}-{i}" for i in range(3)]
        assert await siblings.map(lambda vm, i: poke(vm)) == [2, 2, 2]  # each continues the counter
        hostnames = await siblings.map(lambda vm, i: vm.exec(["hostname"]))
        assert [h.stdout.decode().strip() for h in hostnames] == [vm.name for vm in siblings]
        await siblings[0].exec(["sh", "-c", "echo 8 > /root/state"], check=True)
        assert (await siblings[1].exec(["cat", "/root/state"])).stdout == b"7\n"  # disks are their own
        for vm in siblings:
            assert copied_ram_mib((await vm.describe())["qemu_pid"]) < 0.08 * 256


async def test_restore_refuses_an_image_rebuilt_from_the_same_tarball(tmp_path):
    """A disk layer only fits the exact ext4 image under it; a rebuild differs byte-wise."""
    async with boot(name="rebuilt") as vm:
        await vm.snapshot(tmp_path / "snap")
        image = Path(vm.info["image"])
    tarball = assets.ensure_base().rootfs_tarball
    aside = image.with_name(image.name + ".aside")
    image.rename(aside)  # running VMs keep their open file; the next image_for builds anew
    try:
        with pytest.raises(SnapshotError) as rebuilt:
            async with restore(tmp_path / "snap", image=tarball):
                pass
        assert rebuilt.value.code == "SNAPSHOT_INCOMPATIBLE" and "byte-identical" in rebuilt.value.message
    finally:
        image.unlink(missing_ok=True)
        aside.rename(image)
