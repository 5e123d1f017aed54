"""Issue 24, items 3 and 6: what a bundle may make this host do.

Item 3: a bundle's manifest records the host directories of its live mounts, and its ``origin`` is a
digest of public facts (machine-id, uid). Only a bundle this user's machinen sealed here binds them;
one accepted with ``trust=True`` (or received by a push) binds only what ``mounts=`` names.

Item 6: a push reads the manifest once, checks its MAC on those bytes and sends those bytes, from
files it opened once and hashes as it reads them: a bundle directory swapped between the check and
the sending sends what was checked, or fails with a typed error, never the swapped content.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio
import cbor2
import pytest
from conftest import machinen, qemu_processes

from machinen_async import Host, MachinenError, SnapshotError, restore
from machinen_async.hosts import transfer
from machinen_async.hosts.remote import RemoteDriver
from machinen_async.protocol.messages import MountBinding
from machinen_async.sdk.mounts import Mount
from machinen_async.store import bundle, chunks
from machinen_async.store.manifest import BootFile, ImageIdentity, Manifest, SavedMachine

VM_NAME = "trust-mount"


async def sh(vm, script: str) -> str:
    result = await vm.exec(["sh", "-c", script], timeout=120)
    assert result.exit_code == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode()


def _copy_bundle(source: Path, target: Path) -> Path:
    subprocess.run(["cp", "-r", "--sparse=always", str(source), str(target)], check=True)
    return target


def _rewrite_manifest(bundle_dir: Path, **changes) -> bytes:
    """What anyone who can write a bundle can do: a new manifest (its MAC no longer matches)."""
    manifest = cbor2.loads((bundle_dir / bundle.MANIFEST).read_bytes())
    raw = cbor2.dumps({**manifest, **changes}, canonical=True)
    (bundle_dir / bundle.MANIFEST).write_bytes(raw)
    return raw


def _sign_with_another_key(bundle_dir: Path) -> None:
    """Another user's (or host's) machinen vouching for the bundle: a valid MAC, under its key."""
    raw = (bundle_dir / bundle.MANIFEST).read_bytes()
    mac = hmac.new(secrets.token_bytes(32), bundle.MAC_CONTEXT + raw, hashlib.sha256).hexdigest()
    (bundle_dir / bundle.MAC).write_text(mac)


@dataclass
class Mounted:
    bundle: Path  # a bundle of a VM with a live mount of ``shared`` at /work, sealed by this user
    shared: Path
    victim: Path  # a directory of this host a forged manifest names
    chosen: Path  # a directory the user binds explicitly


@pytest.fixture(scope="module")
def mounted(tmp_path_factory) -> Mounted:
    root = tmp_path_factory.mktemp("trust")
    shared, victim, chosen = root / "shared", root / "victim", root / "chosen"
    for directory, content in ((shared, "from-host"), (victim, "secret"), (chosen, "chosen")):
        directory.mkdir()
        (directory / content).write_text(f"{content}\n")
    machinen("boot", "--name", VM_NAME, "--detach", "--mount-live", f"{shared}:/work", "--json", timeout=600)
    try:
        machinen("snapshot", VM_NAME, str(root / "own.snap"), timeout=300)
    finally:
        machinen("stop", VM_NAME, check=False)
    return Mounted(root / "own.snap", shared, victim, chosen)


# --- item 3: recorded mounts bind only from a bundle sealed here ---------------------------------------


def test_only_a_bundle_sealed_here_counts_as_taken_here(mounted, tmp_path):
    own = bundle.inspect(mounted.bundle)
    assert own.signature == "sealed" and own.taken_here
    assert own.manifest.mounts == (MountBinding(str(mounted.shared), "/work", False),)
    received = _copy_bundle(mounted.bundle, tmp_path / "received.snap")
    bundle.sign(received, (received / bundle.MANIFEST).read_bytes(), received=True)
    as_received = bundle.inspect(received)  # restores without trust: a push brought it and checked it
    assert as_received.signature == "received" and not as_received.taken_here
    foreign = _copy_bundle(mounted.bundle, tmp_path / "foreign.snap")
    _sign_with_another_key(foreign)
    with pytest.raises(SnapshotError) as untrusted:
        bundle.inspect(foreign)
    assert untrusted.value.code == "SNAPSHOT_UNTRUSTED"
    trusted = bundle.inspect(foreign, trust=True)
    # Its origin is this machine's and user's (a digest anyone here can compute), its MAC is not ours.
    assert trusted.manifest.origin == bundle.origin() and trusted.signature is None and not trusted.taken_here


def _forge(mounted: Mounted, target: Path, how: str) -> Path:
    """The attack: a bundle made elsewhere whose manifest says it was taken here, with a live mount
    of a directory of this host the victim never shared."""
    forged = _copy_bundle(mounted.bundle, target)
    _rewrite_manifest(forged, mounts=[[str(mounted.victim), "/work", False]], origin=bundle.origin())
    if how == "unsigned":
        (forged / bundle.MAC).unlink()
    else:
        _sign_with_another_key(forged)
    return forged


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["unsigned", "another key"])
async def test_a_foreign_bundle_binds_no_directory_its_manifest_records(mounted, tmp_path, how, anyio_backend):
    forged = _forge(mounted, tmp_path / "forged.snap", how)
    before = len(qemu_processes())
    for launch in (restore(forged, trust=True), restore(forged, n=2, trust=True)):
        with pytest.raises(MachinenError) as refused:
            async with launch:
                pass
        assert refused.value.code == "MOUNT_SOURCE_NOT_FOUND"
        message = refused.value.message
        assert "/work" in message and str(mounted.victim) in message and "mounts=" in message
        assert "trust=True" in message  # why: this user's machinen did not write it
    assert len(qemu_processes()) == before  # refused before any QEMU started
    # Bound explicitly, it is an ordinary (trusted) bundle; the recorded directory stays out.
    name = f"forged-{anyio_backend}-{how.replace(' ', '-')}"
    async with restore(forged, name=name, trust=True, mounts=[Mount(str(mounted.chosen), "/work", live=True)]) as vm:
        assert await sh(vm, "ls /work") == "chosen\n"
    async with restore(forged, name=name, trust=True, mounts=[Mount.drop("/work")]) as vm:
        assert await sh(vm, "grep -c fuse.machinen /proc/mounts || true; ls /work") == "0\n"
    assert sorted(os.listdir(mounted.victim)) == ["secret"]


@pytest.mark.anyio
async def test_a_bundle_received_by_push_binds_no_directory_its_manifest_records(mounted, tmp_path, anyio_backend):
    # What a host that received a push (maybe of a bundle pushed with trust=True) holds: our key's MAC,
    # as received; the manifest claims this origin and a directory of this host.
    received = _copy_bundle(mounted.bundle, tmp_path / "received.snap")
    raw = _rewrite_manifest(received, mounts=[[str(mounted.victim), "/work", False]])
    bundle.sign(received, raw, received=True)
    before = len(qemu_processes())
    with pytest.raises(MachinenError) as refused:
        async with restore(received):
            pass
    assert refused.value.code == "MOUNT_SOURCE_NOT_FOUND"
    assert str(mounted.victim) in refused.value.message and "received by a push" in refused.value.message
    assert len(qemu_processes()) == before


@pytest.mark.anyio
async def test_the_users_own_bundle_still_binds_its_recorded_directory(mounted, anyio_backend):
    async with restore(mounted.bundle, name=f"own-{anyio_backend}") as vm:
        assert await sh(vm, "cat /work/from-host") == "from-host\n"
        await sh(vm, f"echo {anyio_backend} > /work/back-{anyio_backend}")
    assert (mounted.shared / f"back-{anyio_backend}").read_text() == f"{anyio_backend}\n"


# --- item 6: a push sends the bundle it verified ------------------------------------------------------


def _synthetic_bundle(target: Path) -> Path:
    """A small sealed bundle (no VM): random state, a sparse mem, a blank qcow2 disk."""
    bundle.create_dir(target)
    (target / bundle.STATE).write_bytes(os.urandom(600_000))
    with open(target / bundle.MEM, "wb") as f:
        f.write(os.urandom(300_000))
        f.seek(3 << 20)
        f.write(os.urandom(70_000))
        f.truncate(4 << 20)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target / bundle.DISK), "1M"], check=True)
    bundle.seal(target, Manifest(
        qemu_version="test",
        machine=SavedMachine(type="microvm", memory_mib=256, cpus=1, accel="tcg", tsc_khz=None,
                                      network=False, disk_size=1 << 20),
        kernel=BootFile("1" * 64), initrd=BootFile("2" * 64),
        image=ImageIdentity(key="3" * 24, sha256="4" * 64),
        files={}, origin=bundle.origin(),
    ))  # fmt: skip
    return target


def _swap(bundle_dir: Path, what: str) -> None:
    """Replace, in the bundle directory, what a writer of it could (none of it validly signed)."""
    other = os.urandom((bundle_dir / bundle.STATE).stat().st_size)
    evil = {"source": "evil", "mounts": [["/root", "/work", False]]}
    if what == "directory":  # another bundle where the checked one was
        bundle_dir.rename(bundle_dir.with_name(bundle_dir.name + ".checked"))
        _copy_bundle(bundle_dir.with_name(bundle_dir.name + ".checked"), bundle_dir)
        what = "file and manifest"
    if what in ("file", "file and manifest"):  # renamed over: a new inode at the old name
        (bundle_dir / "new-state").write_bytes(other)
        (bundle_dir / "new-state").rename(bundle_dir / bundle.STATE)
    if what in ("manifest", "file and manifest"):
        manifest = cbor2.loads((bundle_dir / bundle.MANIFEST).read_bytes())
        files = {**manifest["files"], bundle.STATE: {"sha256": hashlib.sha256(other).hexdigest(), "size": len(other)}}
        (bundle_dir / "new-manifest").write_bytes(cbor2.dumps({**manifest, **evil, "files": files}, canonical=True))
        (bundle_dir / "new-manifest").rename(bundle_dir / bundle.MANIFEST)
    if what == "in place":  # the same inode, written over
        with open(bundle_dir / bundle.STATE, "r+b") as f:
            f.write(other[:4096])


def _in_process_host(on_round_trip):
    """A ``call`` serving the receiving half here (this home's chunk store and bundles), as the peer
    does; ``on_round_trip`` runs when the first request arrives."""
    served = {
        "missing": lambda params: chunks.missing(params["digests"]),
        "put": transfer.store_chunk,
        "assemble": transfer.assemble_bundle,
    }

    async def call(method: str, params: dict):
        if method == "lacking":
            on_round_trip()
            return {"kernel": False, "initrd": False, "image": False}  # boot files: not part of this test
        return await anyio.to_thread.run_sync(served[method], params)

    return call


def _received(remote_bundle: str | Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in Path(remote_bundle).iterdir()}


SIGNATURE_THERE = (
    "import sys; from pathlib import Path; from machinen_async.store import bundle; "
    "p = Path(sys.argv[1]); print(bundle.signature(p, (p / bundle.MANIFEST).read_bytes()))"
)
SWAPS = ["directory", "manifest", "file", "file and manifest", "in place"]


@pytest.mark.anyio
@pytest.mark.parametrize("when", ["after opening", "after hashing"])
@pytest.mark.parametrize("what", SWAPS)
async def test_a_push_sends_the_bundle_it_verified_or_nothing(tmp_path, what, when, anyio_backend):
    source = _synthetic_bundle(tmp_path / "b.snap")
    checked = {name: (source / name).read_bytes() for name in (*bundle.DATA_FILES, bundle.MANIFEST)}
    opened = await anyio.to_thread.run_sync(bundle.open_checked, source)
    assert opened.raw == checked[bundle.MANIFEST]
    recipes = None
    if when == "after opening":
        _swap(source, what)
        call = _in_process_host(lambda: None)
    else:
        recipes = await anyio.to_thread.run_sync(transfer.checked_recipes, opened)
        call = _in_process_host(lambda: _swap(source, what))  # the round trip after the check
    try:
        report = await transfer.send_bundle(call, "in-process", opened, lambda message: None, recipes)
    except SnapshotError as refused:
        # Only a file written over in place can make the sender stop: what it reads is no longer
        # what it hashed (or, swapped before hashing, not what the manifest says).
        assert what == "in place" and refused.code == "SNAPSHOT_CORRUPT"
        assert not (transfer.bundles_dir() / hashlib.sha256(checked[bundle.MANIFEST]).hexdigest()[:32]).exists()
    else:
        assert what != "in place" or when == "after hashing"  # hashed after the write: refused above
        assert Path(report.remote_bundle).name == hashlib.sha256(checked[bundle.MANIFEST]).hexdigest()[:32]
        arrived = _received(report.remote_bundle)
        assert {name: arrived[name] for name in checked} == checked  # exactly the checked bundle
        assert bundle.signature(Path(report.remote_bundle), arrived[bundle.MANIFEST]) == "received"
    assert all(file.closed for file in opened.files.values())


def test_a_push_refuses_an_unsigned_bundle_before_opening_anything(tmp_path):
    source = _synthetic_bundle(tmp_path / "b.snap")
    _rewrite_manifest(source, source_name="edited")
    with pytest.raises(SnapshotError) as refused:
        bundle.open_checked(source)
    assert refused.value.code == "SNAPSHOT_UNTRUSTED"
    (source / bundle.MEM).unlink()
    (source / bundle.MEM).symlink_to(source / bundle.STATE)
    with pytest.raises(SnapshotError) as linked:
        bundle.open_checked(source, trust=True)
    assert linked.value.code == "SNAPSHOT_CORRUPT"


@pytest.mark.anyio
async def test_a_push_over_ssh_sends_what_it_verified(mounted, remote_host, tmp_path, monkeypatch, anyio_backend):
    source = _copy_bundle(mounted.bundle, tmp_path / "push.snap")
    checked = {name: (source / name).read_bytes() for name in (*bundle.DATA_FILES, bundle.MANIFEST)}
    original = RemoteDriver._check_compatible
    swapped = []

    async def swap_then_check(self, manifest):  # the round trip between verifying and sending
        _swap(source, "directory")
        swapped.append(True)
        return await original(self, manifest)

    monkeypatch.setattr(RemoteDriver, "_check_compatible", swap_then_check)
    async with Host.from_spec(remote_host.alias) as hostb:
        report = await hostb.push(source)
        assert swapped
        remote_dir = Path(report.remote_bundle)
        assert remote_dir.parent == remote_host.home / "bundles"  # a fake host: its files are here to read
        assert remote_dir.name == hashlib.sha256(checked[bundle.MANIFEST]).hexdigest()[:32]
        arrived = _received(remote_dir)
        assert {name: arrived[name] for name in checked} == checked
        signed_there = await anyio.run_process(
            [sys.executable, "-c", SIGNATURE_THERE, str(remote_dir)], env={**os.environ, **remote_host.env()}
        )
        assert signed_there.stdout.decode().strip() == "received"  # under the key of that host
        # There it is a received bundle: the directory it records (a path of this machine, the same
        # machine-id and uid as the fake host's) is bound only if named.
        with pytest.raises(MachinenError) as refused:
            await hostb.restore(report.remote_bundle, name=f"pushed-{anyio_backend}")
        assert refused.value.code == "MOUNT_SOURCE_NOT_FOUND" and "received by a push" in refused.value.message
    shutil.rmtree(source.with_name(source.name + ".checked"))
