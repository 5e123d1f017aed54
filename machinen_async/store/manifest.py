"""A snapshot bundle's manifest (``manifest.cbor``): what its files are and what they were taken on.

One frozen, typed ``Manifest`` made of typed parts, each checked by its own ``from_map``: a
manifest comes from wherever the bundle was copied from, so ``Manifest.from_cbor`` treats its
bytes as hostile and answers a ``Manifest`` or a ``SnapshotError`` (SNAPSHOT_CORRUPT: malformed;
SNAPSHOT_INCOMPATIBLE: a ``format`` this machinen does not read), never anything else.

Compatibility (docs/internals.md, "The manifest and its format"): ``format`` is one integer,
bumped by a breaking change; a reader reads the formats in ``READS`` and refuses the others (a
newer one names itself as such).  A field an older reader may ignore without restoring the VM
wrongly is added without a bump (readers ignore keys they do not know); anything else (a field
removed, renamed, retyped or given another meaning, a new data file, a field a reader must not
ignore) is a new format.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Self

import cbor2

from ..errors import BootError, SnapshotError
from ..protocol.messages import Ancestor, MountBinding, descend, is_lineage
from ..protocol.mounts import is_mount_entry
from ..protocol.secret import SecretSlot
from ..vmm.backend import Hardware
from .assets import is_hex_digest

FORMAT = 1  # what this machinen writes
READS = range(1, FORMAT + 1)  # what it reads: every format it wrote
MAX_BYTES, MAX_DEPTH = 1 << 20, 8
MAX_MOUNTS = 64
MAX_TEXT = 4096  # a version, a VM name, an image's source: text for people, bounded
# The data files: fixed names (nothing read from a manifest is ever used as a path).
STATE, MEM, DISK = "state", "mem", "disk.qcow2"
DATA_FILES = (STATE, MEM, DISK)


def _corrupt(message: str) -> SnapshotError:
    return SnapshotError(message, code="SNAPSHOT_CORRUPT")


def _is_count(value: object, limit: int, low: int = 0) -> bool:
    return type(value) is int and low <= value <= limit


def _is_text(value: object) -> bool:
    return type(value) is str and len(value) <= MAX_TEXT


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and type(value) is not bool and math.isfinite(value)


def _map(value: object) -> dict[Any, Any]:
    """A decoded map, or an empty one (whose fields are then all missing: malformed)."""
    return value if isinstance(value, dict) else {}


def _optional(data: dict[Any, Any], key: str, valid: Callable[[object], bool]) -> Any:
    """``data[key]`` if ``valid``, None if absent (older manifests lack some fields)."""
    value = data.get(key)
    if value is not None and not valid(value):
        raise _corrupt(f"manifest has a malformed {key} {value!r:.80}")
    return value


@dataclass(frozen=True)
class FileEntry:
    """One data file of the bundle, as sealed: checked against every byte read of it."""

    sha256: str
    size: int

    @classmethod
    def from_map(cls, value: object, name: str) -> Self:
        entry = _map(value)
        if not (_is_count(entry.get("size"), 1 << 50) and is_hex_digest(entry.get("sha256"), 64)):
            raise _corrupt(f"manifest has a malformed entry for {name}")
        return cls(sha256=entry["sha256"], size=entry["size"])

    def to_map(self) -> dict[str, object]:
        return {"sha256": self.sha256, "size": self.size}


def files_from_map(value: object) -> dict[str, FileEntry]:
    """The data files: some of ``DATA_FILES``, at least the state and the disk (RAM may travel in the state)."""
    if not isinstance(value, dict):
        raise _corrupt(f"manifest has malformed files {value!r:.80}")
    files: dict[Any, Any] = value
    unknown = set(files) - set(DATA_FILES)
    if unknown or STATE not in files or DISK not in files:
        raise _corrupt(f"manifest lists unexpected files {sorted(map(str, unknown))}")
    return {name: FileEntry.from_map(entry, name) for name, entry in files.items()}


def files_to_map(files: Mapping[str, FileEntry]) -> dict[str, object]:
    return {name: entry.to_map() for name, entry in files.items()}


# What a restore takes from a manifest's machine, and what is plausible there.
MACHINE_FIELDS: dict[str, Callable[[object], bool]] = {
    "type": lambda v: isinstance(v, str) and len(v) <= 32,
    "memory_mib": lambda v: _is_count(v, 1 << 20, 16),
    "cpus": lambda v: _is_count(v, 1024, 1),
    "accel": lambda v: v in ("kvm", "tcg"),
    "tsc_khz": lambda v: v is None or _is_count(v, 100_000_000, 1),
    "network": lambda v: type(v) is bool,
    "disk_size": lambda v: _is_count(v, 1 << 50, 1),
}


@dataclass(frozen=True)
class SavedMachine:
    """The virtual hardware the state was saved on (the VMM's machine type, and the disk's size):
    device state loads only into the same."""

    type: str
    memory_mib: int
    cpus: int
    accel: str
    tsc_khz: int | None
    network: bool
    disk_size: int

    @classmethod
    def of(cls, hardware: Hardware, *, machine_type: str, disk_size: int) -> Self:
        """The one conversion from the VMM's ``Hardware`` (a restore rebuilds it from these fields)."""
        return cls(
            type=machine_type, memory_mib=hardware.memory_mib, cpus=hardware.cpus, accel=hardware.accel,
            tsc_khz=hardware.tsc_khz, network=hardware.network, disk_size=disk_size,
        )  # fmt: skip

    @classmethod
    def from_map(cls, value: object) -> Self:
        machine = _map(value)
        for field, valid in MACHINE_FIELDS.items():
            if not valid(machine.get(field)):
                raise _corrupt(f"manifest has a malformed machine {field} {machine.get(field)!r:.80}")
        checked: dict[str, Any] = {field: machine.get(field) for field in MACHINE_FIELDS}
        return cls(**checked)

    def to_map(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BootFile:
    """The kernel or the initrd, by content (found in this host's caches by its sha256, never by a path)."""

    sha256: str

    @classmethod
    def from_map(cls, value: object, what: str) -> Self:
        digest: Any = _map(value).get("sha256")
        if not is_hex_digest(digest, 64):
            raise _corrupt(f"manifest has a malformed {what} sha256 {digest!r}")
        return cls(digest)

    def to_map(self) -> dict[str, object]:
        return {"sha256": self.sha256}


@dataclass(frozen=True)
class ImageIdentity:
    """The base image the disk lies on: its content key, its file's sha256 (every ext4 build
    differs; older bundles lack it) and, for people, what it was built from."""

    key: str
    sha256: str | None = None
    source: str = ""

    @classmethod
    def from_map(cls, value: object) -> Self:
        image = _map(value)
        if not is_hex_digest(image.get("key"), 24):
            raise _corrupt(f"manifest has a malformed key {image.get('key')!r}")
        if "sha256" in image and not is_hex_digest(image["sha256"], 64):
            raise _corrupt(f"manifest has a malformed sha256 {image['sha256']!r}")
        source = image.get("source", image.get("tarball", ""))  # older manifests: "tarball"
        if not _is_text(source):
            raise _corrupt(f"manifest has a malformed image source {source!r:.80}")
        return cls(key=image["key"], sha256=image.get("sha256"), source=source)

    def to_map(self) -> dict[str, object]:
        return {"key": self.key, "source": self.source, **({"sha256": self.sha256} if self.sha256 else {})}


def mounts_from_list(value: object) -> tuple[MountBinding, ...]:
    """The live mounts the guest had (their host directories bind only where ``taken_here``)."""
    if not (isinstance(value, list) and len(value) <= MAX_MOUNTS and all(map(is_mount_entry, value))):
        raise _corrupt("manifest has malformed mounts")
    return tuple(MountBinding(*entry) for entry in value)


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.cbor`` holds (format ``FORMAT``); ``bundle.seal`` writes it, ``from_cbor`` reads it."""

    machine: SavedMachine
    kernel: BootFile
    initrd: BootFile
    image: ImageIdentity
    files: Mapping[str, FileEntry]  # names from DATA_FILES; filled in by ``bundle.seal``
    qemu_version: str | None = None  # device state loads only into the version that saved it
    mounts: tuple[MountBinding, ...] = ()
    source: str | None = None  # the name of the VM it was taken of
    origin: str | None = None  # ``bundle.origin()`` of the machine and user that took it
    created: float | None = None  # seconds since the epoch: the instant captured
    lineage: tuple[Ancestor, ...] = ()  # the ancestors of the VM it was taken of (``source``), root first
    secrets: tuple[SecretSlot, ...] = ()  # its secrets' names, hosts and placeholders: never a value

    @property
    def restored_lineage(self) -> list[Ancestor]:
        """The lineage of a VM restored from this bundle: its VM's ancestors, then that VM at the snapshot."""
        if self.source is None or self.created is None:  # an older bundle: what it says
            return list(self.lineage)
        return descend(self.lineage, self.source, self.created)

    @property
    def ram_in_state(self) -> bool:
        """The RAM travels inside the device state (a handoff's or a fork sibling's older snapshot)."""
        return MEM not in self.files

    @classmethod
    def from_cbor(cls, raw: bytes, *, where: object = "the bundle") -> Self:
        """Decode and check a manifest (hostile input): only plain data, a format this machinen
        reads, each part well formed.  Keys it does not know are ignored (see the module's rule)."""
        try:
            if len(raw) > MAX_BYTES:
                raise ValueError(f"{len(raw)} bytes")
            data = cbor2.loads(raw)
            _check_plain(data, MAX_DEPTH)
            if not isinstance(data, dict):
                raise TypeError("not a manifest map")
        except (ValueError, TypeError, RecursionError, cbor2.CBORDecodeError) as exc:
            raise _corrupt(f"unreadable manifest in {where}: {exc}") from None
        return cls.from_map(data)

    @classmethod
    def from_map(cls, data: dict[Any, Any]) -> Self:
        """The parts of a decoded manifest of a format this machinen reads, each checked."""
        _check_format(data.get("format"))
        return cls(
            machine=SavedMachine.from_map(data.get("machine")),
            kernel=BootFile.from_map(data.get("kernel"), "kernel"),
            initrd=BootFile.from_map(data.get("initrd"), "initrd"),
            image=ImageIdentity.from_map(data.get("image")),
            files=files_from_map(data.get("files")),
            qemu_version=_optional(data, "qemu_version", _is_text),
            mounts=mounts_from_list(data.get("mounts", [])),
            source=_optional(data, "source", _is_text),
            origin=_optional(data, "origin", _is_text),
            created=_optional(data, "created", _is_time),
            lineage=tuple(
                {"name": ancestor["name"], "taken_at": float(ancestor["taken_at"])}
                for ancestor in _optional(data, "lineage", is_lineage) or ()
            ),
            secrets=_secret_slots(data.get("secrets", [])),
        )

    def to_map(self) -> dict[str, object]:
        present = {"qemu_version": self.qemu_version, "source": self.source, "origin": self.origin,
                   "created": self.created}  # fmt: skip
        return {
            "format": FORMAT,
            "machine": self.machine.to_map(),
            "kernel": self.kernel.to_map(),
            "initrd": self.initrd.to_map(),
            "image": self.image.to_map(),
            "files": files_to_map(self.files),
            "mounts": [mount.to_wire() for mount in self.mounts],
            **{key: value for key, value in present.items() if value is not None},
            **({"lineage": [dict(ancestor) for ancestor in self.lineage]} if self.lineage else {}),
            **({"secrets": [slot.to_map() for slot in self.secrets]} if self.secrets else {}),
        }

    def to_cbor(self) -> bytes:
        """Canonical CBOR: the same manifest is the same bytes (its MAC and a push's bundle id are of them)."""
        return cbor2.dumps(self.to_map(), canonical=True)


def _secret_slots(entries: object) -> tuple[SecretSlot, ...]:
    try:
        return SecretSlot.all_from(entries)
    except BootError as exc:
        raise _corrupt(f"manifest has malformed secrets: {exc.message}") from None


def _check_format(found: object) -> None:
    if type(found) is int and found in READS:
        return
    newer = type(found) is int and found > FORMAT
    raise SnapshotError(
        f"bundle format {found!r:.40}{' (written by a newer machinen)' if newer else ''}; this machinen reads "
        f"format{'s' if len(READS) > 1 else ''} {', '.join(map(str, READS))}",
        code="SNAPSHOT_INCOMPATIBLE",
    )


def _check_plain(value: object, depth: int) -> None:
    """Only what ``to_cbor`` writes: maps, lists, text, bytes, numbers, booleans, null.  CBOR tags
    (dates, bignums, sets, shared references that build cycles...) decode to other types: refused."""
    if depth < 0:
        raise ValueError("nested too deeply")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"a {type(key).__name__} key")
            _check_plain(item, depth - 1)
    elif isinstance(value, list):
        for item in value:
            _check_plain(item, depth - 1)
    elif not (value is None or type(value) in (str, bytes, int, float, bool)) or (
        type(value) is int and not -(2**64) < value < 2**64
    ):
        raise ValueError(f"a {type(value).__name__} value (a CBOR tag?)")
