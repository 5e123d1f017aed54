"""Snapshot bundles: a directory with device state, frozen RAM, disk and a manifest.

    <bundle>/state          device state (QEMU migration stream; holds RAM too when ram_in_state)
    <bundle>/mem            guest RAM image (sparse), unless the RAM travels in ``state``
    <bundle>/disk.qcow2     every disk change above the base image, flattened
    <bundle>/manifest.cbor  canonical CBOR: format, QEMU version, machine, accelerator,
                            kernel/initrd/image identities, sha256 and size of every file

The file names are fixed here: nothing read from a manifest is ever used as a
path.  Directories are 0700 and files 0600.  ``verify`` checks every hash
before anything is started from a bundle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2

from ..errors import BootError, SnapshotError
from .assets import is_hex_digest, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.cbor"
STATE, MEM, DISK = "state", "mem", "disk.qcow2"
DATA_FILES = (STATE, MEM, DISK)


@dataclass(frozen=True)
class Manifest:
    data: dict[str, Any]

    @property
    def machine(self) -> dict[str, Any]:
        return self.data["machine"]

    @property
    def ram_in_state(self) -> bool:
        return MEM not in self.data["files"]


def seal(bundle: Path, fields: dict[str, Any]) -> Manifest:
    """Hash the data files and write the manifest last (its presence means complete)."""
    files = {}
    for name in DATA_FILES:
        path = bundle / name
        if path.exists():
            path.chmod(0o600)
            files[name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    data = {"format": FORMAT_VERSION, **fields, "files": files}
    partial = bundle / f".{MANIFEST}.partial"
    partial.write_bytes(cbor2.dumps(data, canonical=True))
    partial.chmod(0o600)
    partial.rename(bundle / MANIFEST)
    return Manifest(data)


def parse_manifest(raw: bytes, where: object = "the bundle") -> dict[str, Any]:
    """Decode and check a manifest's shape; its files are checked by ``verify``."""
    try:
        data = cbor2.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise ValueError("not a manifest map")
    except (ValueError, cbor2.CBORDecodeError) as exc:
        raise SnapshotError(f"unreadable manifest in {where}: {exc}", code="SNAPSHOT_CORRUPT") from None
    if data.get("format") != FORMAT_VERSION:
        raise SnapshotError(
            f"bundle format {data.get('format')!r}; this machinen reads format {FORMAT_VERSION}",
            code="SNAPSHOT_INCOMPATIBLE",
        )
    unknown = set(data["files"]) - set(DATA_FILES)
    if unknown or STATE not in data["files"] or DISK not in data["files"]:
        raise SnapshotError(f"manifest lists unexpected files {sorted(unknown)}", code="SNAPSHOT_CORRUPT")
    # These name files in caches (by content): only well-formed digests, never a path.
    identities = [
        (data.get("kernel"), "sha256", 64),
        (data.get("initrd"), "sha256", 64),
        (data.get("image"), "key", 24),
    ]
    if isinstance(data.get("image"), dict) and "sha256" in data["image"]:
        identities.append((data["image"], "sha256", 64))
    for entry, field, length in identities:
        value = entry.get(field) if isinstance(entry, dict) else None
        if not is_hex_digest(value, length):
            raise SnapshotError(f"manifest has a malformed {field} {value!r}", code="SNAPSHOT_CORRUPT")
    return data


def verify(bundle: Path) -> Manifest:
    """Read and check a bundle; raises typed errors, starts nothing."""
    if not (bundle / MANIFEST).is_file():
        raise BootError(f"no snapshot bundle at {bundle}", code="BOOT_SNAPSHOT_NOT_FOUND")
    data = parse_manifest((bundle / MANIFEST).read_bytes(), bundle)
    for name, expected in data["files"].items():
        path = bundle / name
        if path.is_symlink() or not path.is_file():
            raise SnapshotError(f"{name} is missing from {bundle}", code="SNAPSHOT_CORRUPT")
        if path.stat().st_size != expected.get("size") or sha256_file(path) != expected.get("sha256"):
            raise SnapshotError(f"{name} in {bundle} does not match its manifest hash", code="SNAPSHOT_CORRUPT")
    return Manifest(data)


def create_dir(bundle: Path) -> Path:
    """A new, empty bundle directory (0700); refuses to overwrite anything."""
    bundle = bundle.expanduser().resolve()
    try:
        bundle.mkdir(mode=0o700, parents=False)
    except FileExistsError:
        if any(bundle.iterdir()):
            raise SnapshotError(f"{bundle} exists and is not empty", code="SNAPSHOT_DIR_NOT_EMPTY") from None
        bundle.chmod(0o700)
    except FileNotFoundError:
        raise SnapshotError(f"parent directory of {bundle} does not exist", code="SNAPSHOT_DIR_INVALID") from None
    return bundle


def remove_partial(bundle: Path) -> None:
    """Undo a failed snapshot: only the files we write, then the directory if empty."""
    for name in (*DATA_FILES, MANIFEST, f".{MANIFEST}.partial"):
        (bundle / name).unlink(missing_ok=True)
    try:
        os.rmdir(bundle)
    except OSError:
        pass
