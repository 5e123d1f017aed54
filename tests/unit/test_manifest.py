"""The bundle manifest as data: typed, versioned, and read from hostile bytes (no VM)."""

from __future__ import annotations

from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from machinen_async.errors import SnapshotError
from machinen_async.protocol.messages import IncomingState, MountBinding
from machinen_async.protocol.secret import SecretSlot
from machinen_async.store.manifest import (
    FORMAT,
    BootFile,
    FileEntry,
    ImageIdentity,
    Manifest,
    SavedMachine,
)
from machinen_async.vmm.backend import Hardware

DIGEST = "ab" * 32
PLACEHOLDER = "machinen-secret-API_KEY-0123456789abcdef01234567"
SLOT = {"name": "API_KEY", "hosts": ["api.example.com"], "placeholder": PLACEHOLDER}


def manifest_as_written_before() -> dict[str, object]:
    """What ``Capture._seal_bundle`` and ``bundle.seal`` wrote before the manifest had a type: built
    by hand, key by key, as that code did."""
    return {
        "format": 1,
        "created": 1765000000.25,
        "source": "web-1",
        "origin": "0123456789abcdef0123456789abcdef",
        "mounts": [["/home/me/src", "/work", False]],
        "qemu_version": "10.0.3",
        "machine": {
            "type": "microvm",
            "disk_size": 2 << 30,
            "memory_mib": 512,
            "cpus": 2,
            "accel": "tcg",
            "tsc_khz": None,
            "network": True,
        },
        "kernel": {"sha256": "1" * 64},
        "initrd": {"sha256": "2" * 64},
        "image": {"key": "3" * 24, "source": "docker.io/library/python:3.12", "sha256": "4" * 64},
        "files": {
            "state": {"sha256": "5" * 64, "size": 61_000},
            "mem": {"sha256": "6" * 64, "size": 512 << 20},
            "disk.qcow2": {"sha256": "7" * 64, "size": 3 << 20},
        },
    }


def test_a_manifest_written_before_loads_and_is_written_again_byte_for_byte():
    raw = cbor2.dumps(manifest_as_written_before(), canonical=True)
    manifest = Manifest.from_cbor(raw)
    assert manifest.machine == SavedMachine(
        type="microvm", memory_mib=512, cpus=2, accel="tcg", tsc_khz=None, network=True, disk_size=2 << 30
    )
    assert manifest.kernel == BootFile("1" * 64) and manifest.initrd == BootFile("2" * 64)
    assert manifest.image == ImageIdentity(key="3" * 24, sha256="4" * 64, source="docker.io/library/python:3.12")
    assert manifest.files["mem"] == FileEntry(sha256="6" * 64, size=512 << 20) and not manifest.ram_in_state
    assert manifest.mounts == (MountBinding("/home/me/src", "/work", False),)
    assert (manifest.qemu_version, manifest.source, manifest.created) == ("10.0.3", "web-1", 1765000000.25)
    assert manifest.to_cbor() == raw  # same keys, same values, same bytes (its MAC still matches)


def test_older_manifests_load():
    """Written by earlier versions: the image's source was "tarball", and no image sha256, source,
    origin, creation time, mounts or QEMU version (a handoff's RAM travels in the state)."""
    data = manifest_as_written_before()
    for key in ("created", "source", "origin", "mounts", "qemu_version"):
        del data[key]
    data["image"] = {"key": "3" * 24, "tarball": "/srv/rootfs.tar"}
    del data["files"]["mem"]
    manifest = Manifest.from_cbor(cbor2.dumps(data, canonical=True))
    assert manifest.image == ImageIdentity(key="3" * 24, sha256=None, source="/srv/rootfs.tar")
    assert manifest.ram_in_state and manifest.mounts == () and manifest.qemu_version is None


def _manifest() -> Manifest:
    hardware = Hardware(memory_mib=256, cpus=1, accel="kvm", kernel=Path("/k"), initrd=Path("/i"), hostname="a",
                        tsc_khz=2_000_000, network=False)  # fmt: skip
    return Manifest(
        machine=SavedMachine.of(hardware, machine_type="microvm", disk_size=1 << 30),
        kernel=BootFile(DIGEST),
        initrd=BootFile(DIGEST),
        image=ImageIdentity(key="c" * 24, sha256=DIGEST),
        files={"state": FileEntry(DIGEST, 10), "disk.qcow2": FileEntry(DIGEST, 20)},
        mounts=(MountBinding("/srv", "/data", True),),
        source="vm",
        created=5.5,
        secrets=(SecretSlot("API_KEY", ("api.example.com", "*.example.org"), PLACEHOLDER),),
    )


def test_cbor_round_trip():
    manifest = _manifest()
    assert Manifest.from_cbor(manifest.to_cbor()) == manifest
    assert manifest.machine.tsc_khz == 2_000_000 and manifest.machine.accel == "kvm"  # from the VMM's Hardware
    assert cbor2.loads(manifest.to_cbor())["format"] == FORMAT


def test_a_bundle_keeps_its_secrets_placeholders_never_a_value():
    """Names, hosts and placeholders, in the manifest and in a fork sibling's incoming state; an
    older manifest has none."""
    manifest = _manifest()
    assert cbor2.loads(manifest.to_cbor())["secrets"] == [
        {"name": "API_KEY", "hosts": ["api.example.com", "*.example.org"], "placeholder": PLACEHOLDER}
    ]
    assert Manifest.from_cbor(cbor2.dumps(manifest_as_written_before())).secrets == ()
    incoming = IncomingState(chain=[["/i", "raw"]], disk_size=1, holds=[], ram_in_state=False, secrets=manifest.secrets)
    assert IncomingState.from_wire(incoming.to_wire()) == incoming


def test_keys_a_reader_does_not_know_are_ignored():
    """A field added without a new format: an older reader reads the rest."""
    data = {**cbor2.loads(_manifest().to_cbor()), "balloon": {"target_mib": 128}}
    data["machine"]["numa_nodes"] = 1
    assert Manifest.from_cbor(cbor2.dumps(data)) == _manifest()


@pytest.mark.parametrize("found", [FORMAT + 1, 99])
def test_a_newer_format_is_refused_as_incompatible_and_says_so(found):
    data = {**cbor2.loads(_manifest().to_cbor()), "format": found, "files": "laid out otherwise"}
    with pytest.raises(SnapshotError) as refused:
        Manifest.from_cbor(cbor2.dumps(data))
    assert refused.value.code == "SNAPSHOT_INCOMPATIBLE"
    assert f"bundle format {found} (written by a newer machinen)" in refused.value.message


@pytest.mark.parametrize("found", [0, -1, None, "1", 1.0, True])
def test_a_format_that_is_not_one_this_machinen_wrote_is_refused(found):
    data = {**cbor2.loads(_manifest().to_cbor()), "format": found}
    with pytest.raises(SnapshotError) as refused:
        Manifest.from_cbor(cbor2.dumps(data))
    assert refused.value.code == "SNAPSHOT_INCOMPATIBLE" and "newer" not in refused.value.message


def _malformed(**changes: object) -> bytes:
    return cbor2.dumps({**manifest_as_written_before(), **changes})


MACHINE = manifest_as_written_before()["machine"]
MALFORMED = {
    "no files": _malformed(files=None),
    "an unknown file": _malformed(
        files={
            "state": {"sha256": DIGEST, "size": 1},
            "disk.qcow2": {"sha256": DIGEST, "size": 1},
            "../escape": {"sha256": DIGEST, "size": 1},
        }
    ),
    "no state": _malformed(files={"disk.qcow2": {"sha256": DIGEST, "size": 1}}),
    "a file without its size": _malformed(
        files={"state": {"sha256": DIGEST}, "disk.qcow2": {"sha256": DIGEST, "size": 1}}
    ),
    "a kernel named by path": _malformed(kernel={"sha256": "/boot/vmlinuz"}),
    "no initrd": _malformed(initrd=None),
    "an image key that is a path": _malformed(image={"key": "../../etc/passwd"}),
    "an image sha256 of null": _malformed(image={"key": "3" * 24, "sha256": None}),
    "an image source that is not text": _malformed(image={"key": "3" * 24, "source": 7}),
    "no machine": _malformed(machine=None),
    "a boolean CPU count": _malformed(machine={**MACHINE, "cpus": True}),
    "a machine type of a kilobyte": _malformed(machine={**MACHINE, "type": "x" * 1000}),
    "a relative mount": _malformed(mounts=[["home", "/work", False]]),
    "a thousand mounts": _malformed(mounts=[["/a", "/b", False]] * 1000),
    "a QEMU version that is a number": _malformed(qemu_version=10),
    "a source that is a map": _malformed(source={"name": "x"}),
    "a creation time as text": _malformed(created="yesterday"),
    "a creation time of NaN": _malformed(created=float("nan")),
    "secrets that are not a list": _malformed(secrets={"API_KEY": PLACEHOLDER}),
    "a secret with a value": _malformed(secrets=[{**SLOT, "value": "sk-1"}]),
    "a secret named as no variable": _malformed(secrets=[{**SLOT, "name": "A B"}]),
    "a secret for an address": _malformed(secrets=[{**SLOT, "hosts": ["10.0.0.1"]}]),
    "a secret for no host": _malformed(secrets=[{**SLOT, "hosts": []}]),
    "a short placeholder": _malformed(secrets=[{**SLOT, "placeholder": "x"}]),
    "a placeholder with a newline": _malformed(secrets=[{**SLOT, "placeholder": PLACEHOLDER + "\r\nX: y"}]),
    "a secret twice": _malformed(secrets=[SLOT, SLOT]),
    "a thousand secrets": _malformed(secrets=[{**SLOT, "name": f"S{i}"} for i in range(1000)]),
    "a list, not a map": cbor2.dumps([1, 2, 3]),
    "not CBOR": b"\xff\xff\xff",
    "nested too deeply": _malformed(extra=[[[[[[[[[["deep"]]]]]]]]]]),
}


@pytest.mark.parametrize("what", MALFORMED)
def test_a_malformed_manifest_is_corrupt(what):
    with pytest.raises(SnapshotError) as refused:
        Manifest.from_cbor(MALFORMED[what])
    assert refused.value.code == "SNAPSHOT_CORRUPT", what


PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30) | st.binary(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
KEYS = st.sampled_from(list(manifest_as_written_before()))


@st.composite
def near_manifests(draw: st.DrawFn) -> dict[object, object]:
    """A manifest as written with some of its values (at any depth) replaced, removed or added to."""
    data = manifest_as_written_before()
    for _ in range(draw(st.integers(0, 4))):
        target = data
        path = draw(st.lists(st.text(max_size=12) | KEYS, min_size=1, max_size=3))
        for key in path[:-1]:
            if not isinstance(target.get(key), dict):
                break
            target = target[key]
        if draw(st.booleans()):
            target.pop(path[-1], None)
        else:
            target[path[-1]] = draw(PLAIN)
    return data


@settings(max_examples=300, deadline=None)
@given(st.one_of(near_manifests(), st.dictionaries(st.text(max_size=12) | KEYS, PLAIN, max_size=8)))
def test_any_cbor_map_is_a_manifest_or_a_typed_error(data):
    raw = cbor2.dumps(data)
    try:
        manifest = Manifest.from_cbor(raw)
    except SnapshotError as error:
        assert error.code in ("SNAPSHOT_CORRUPT", "SNAPSHOT_INCOMPATIBLE")
        return
    assert Manifest.from_cbor(manifest.to_cbor()) == manifest  # what it read, it writes back readable


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_a_manifest_or_a_typed_error(raw):
    with pytest.raises(SnapshotError):  # random bytes are never a whole manifest
        Manifest.from_cbor(raw)
