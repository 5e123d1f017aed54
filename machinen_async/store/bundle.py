"""Snapshot bundles: a directory with device state, frozen RAM, disk and a manifest.

    <bundle>/state          device state (QEMU migration stream; holds RAM too when ram_in_state)
    <bundle>/mem            guest RAM image (sparse), unless the RAM travels in ``state``
    <bundle>/disk.qcow2     every disk change above the base image, flattened
    <bundle>/manifest.cbor  canonical CBOR (``store/manifest.py`` ``Manifest``): format, QEMU version,
                            machine, kernel/initrd/image identities, sha256 and size of every file
    <bundle>/manifest.mac   HMAC-SHA256 of the manifest under this user's bundle key

The file names are fixed here: nothing read from a manifest is ever used as a
path.  Directories are 0700 and files 0600.

The hashes detect corruption, not tampering: whoever can write a bundle can
rewrite its manifest.  The MAC says "machinen, as this user, wrote this"
(``seal``), or "received it over an authenticated push and checked it" (a MAC
under another context, ``sign(received=True)``); a bundle without a valid one
is restored only with an explicit ``trust``, because its device state is
parsed by QEMU's migration loader, which is not hardened against hostile
input.  Only a bundle sealed here may bind the host directories its manifest
records as live mounts (``Checked.taken_here``): a foreign or received one
binds what the restore's ``mounts=`` names.  A restore reads each file once,
copying it into a private place while hashing exactly the bytes it writes, so
what QEMU opens is what was checked, whatever happens to the bundle directory
meanwhile; a push likewise reads the manifest once and sends the bytes it
verified, from files it opened once (``open_checked``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Self

from ..errors import BootError, MachinenError, SnapshotError
from . import paths, qcow2, sparse
from .assets import sha256_file
from .manifest import DATA_FILES, DISK, MAX_BYTES, MEM, STATE, FileEntry, Manifest

# With the data files' names, which readers of bundles take from here.
__all__ = [
    "DATA_FILES", "DISK", "MAC", "MANIFEST", "MEM", "STATE", "Checked", "Opened", "copy_verified", "create_dir",
    "inspect", "is_signed", "open_checked", "origin", "remove_partial", "seal", "sign", "signature", "verify",
]  # fmt: skip

MANIFEST = "manifest.cbor"
MAC = "manifest.mac"
MAC_CONTEXT = b"machinen bundle manifest v1\0"  # sealed here, by a snapshot of this user's machinen
RECEIVED_CONTEXT = b"machinen received bundle manifest v1\0"  # received by a push and checked
COPY_BLOCK = 1 << 20


@dataclass(frozen=True)
class Checked:
    """A bundle's manifest, and how this user's key vouched for its bytes: "sealed" (a snapshot here
    wrote it), "received" (a push brought it), None (accepted with ``trust``, or not checked)."""

    manifest: Manifest
    signature: str | None = None

    @property
    def sealed(self) -> bool:
        return self.signature == "sealed"

    @property
    def taken_here(self) -> bool:
        """Whether this machine's user wrote it, so its host directories mean something here: sealed
        under this user's key (``origin`` alone is a digest of public facts anyone can copy)."""
        return self.sealed and self.manifest.origin == origin()


def seal(bundle: Path, manifest: Manifest) -> Checked:
    """Hash the data files, then write ``manifest`` with them as its files (whatever it listed is
    replaced), last: its presence means complete."""
    files = {}
    for name in DATA_FILES:
        path = bundle / name
        if path.exists():
            path.chmod(0o600)
            files[name] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    manifest = dataclasses.replace(manifest, files=files)
    raw = manifest.to_cbor()
    sign(bundle, raw)
    partial = bundle / f".{MANIFEST}.partial"
    partial.write_bytes(raw)
    partial.chmod(0o600)
    partial.rename(bundle / MANIFEST)
    return Checked(manifest, signature="sealed")


def _signing_key() -> bytes:
    """This user's bundle key (32 random bytes, 0600), created on first use."""
    keys = paths.private_dir(paths.home() / "keys")
    path = keys / "bundle"
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    partial = keys / f".bundle.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(32))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(partial, path)  # atomic and never replaces: a racing creator's key wins, whole
    except FileExistsError:
        pass
    finally:
        partial.unlink()
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise MachinenError(f"{path} must be a 0600 file of this user's", code="PATH_NOT_PRIVATE")
        key = os.read(fd, 64)
    finally:
        os.close(fd)
    if len(key) != 32:
        raise MachinenError(f"{path} is not a bundle key (remove it to make a new one)", code="PATH_NOT_PRIVATE")
    return key


def _mac(raw_manifest: bytes, context: bytes = MAC_CONTEXT) -> str:
    return hmac.new(_signing_key(), context + raw_manifest, hashlib.sha256).hexdigest()


def sign(bundle: Path, raw_manifest: bytes, *, received: bool = False) -> None:
    """Vouch for a manifest under this user's key: written here, or (``received``) received and verified."""
    partial = bundle / f".{MAC}.partial"
    partial.write_text(_mac(raw_manifest, RECEIVED_CONTEXT if received else MAC_CONTEXT))
    partial.chmod(0o600)
    partial.rename(bundle / MAC)


def signature(bundle: Path, raw_manifest: bytes) -> str | None:
    """How this user's key vouches for these manifest bytes: "sealed" (a snapshot here wrote them),
    "received" (a push brought them and they were checked), or None."""
    try:
        recorded = (bundle / MAC).read_text()[:64]
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    for how, context in (("sealed", MAC_CONTEXT), ("received", RECEIVED_CONTEXT)):
        if hmac.compare_digest(recorded, _mac(raw_manifest, context)):
            return how
    return None


def is_signed(bundle: Path, raw_manifest: bytes) -> bool:
    return signature(bundle, raw_manifest) is not None


def origin() -> str:
    """Who writes a bundle here: this machine and user, as a digest (a bundle names no host)."""
    try:
        machine = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine = os.uname().nodename
    return hashlib.sha256(f"{machine}:{os.getuid()}".encode()).hexdigest()[:32]


def _read_manifest(bundle: Path, trust: bool) -> tuple[bytes, Checked]:
    """The manifest's bytes, read once, and what they say; unless ``trust``, this user's key must
    vouch for exactly those bytes (``Manifest.sealed`` tells whether a snapshot here wrote them)."""
    if not (bundle / MANIFEST).is_file():
        raise BootError(f"no snapshot bundle at {bundle}", code="BOOT_SNAPSHOT_NOT_FOUND")
    with open(bundle / MANIFEST, "rb") as f:
        raw = f.read(MAX_BYTES + 1)  # a bigger one is refused unread
    manifest = Manifest.from_cbor(raw, where=bundle)
    how = signature(bundle, raw)
    if how is None and not trust:
        raise SnapshotError(
            f"{bundle} was not written by machinen as this user (nor received by `machinen push`), or was "
            "modified since: restoring it lets its author feed QEMU device state; pass trust=True "
            "(--trust) only for a bundle from a source you trust",
            code="SNAPSHOT_UNTRUSTED",
        )
    return raw, Checked(manifest, signature=how)


def inspect(bundle: Path, *, trust: bool = False) -> Checked:
    """Everything about a bundle that is cheap to check: its manifest (and, unless
    ``trust``, that this user's key signed it), its files' presence and sizes and
    its disk's header.  The contents are hashed by ``copy_verified`` as they are used."""
    _, checked = _read_manifest(bundle, trust)
    for name, expected in checked.manifest.files.items():
        path = bundle / name
        if path.is_symlink() or not path.is_file():
            raise SnapshotError(f"{name} is missing from {bundle}", code="SNAPSHOT_CORRUPT")
        if path.stat().st_size != expected.size:
            raise SnapshotError(f"{name} in {bundle} does not match its manifest size", code="SNAPSHOT_CORRUPT")
    qcow2.check_image(bundle / DISK)
    return checked


def verify(bundle: Path, *, trust: bool = False) -> Checked:
    """``inspect`` and hash every file (each opened once): for bundles checked without being used."""
    with open_checked(bundle, trust=trust) as opened:
        for name, expected in opened.checked.manifest.files.items():
            digest = hashlib.sha256()
            fd = opened.files[name].fileno()
            offset = 0
            while block := os.pread(fd, COPY_BLOCK, offset):
                digest.update(block)
                offset += len(block)
            if digest.hexdigest() != expected.sha256:
                raise SnapshotError(f"{name} in {bundle} does not match its manifest hash", code="SNAPSHOT_CORRUPT")
    return opened.checked


@dataclass
class Opened:
    """A bundle as ``open_checked`` found it: the manifest's bytes (the ones whose MAC was checked),
    what they say, and each data file opened once.  Whoever reads the files hashes what it reads
    against ``manifest`` (a file can still change in place); ``close`` when done (idempotent)."""

    bundle: Path
    raw: bytes
    checked: Checked
    files: dict[str, BinaryIO] = dataclasses.field(default_factory=dict)

    def close(self) -> None:
        for file in self.files.values():
            file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_checked(bundle: Path, *, trust: bool = False) -> Opened:
    """``inspect`` for a bundle about to be sent: the manifest is read once and its MAC checked on
    those bytes (unless ``trust``), then each data file is opened once (no symlink, a regular file
    of the manifest's size) and its disk's header checked through that descriptor.  Swapping files
    or the manifest in the directory afterwards changes nothing of what the caller reads."""
    raw, checked = _read_manifest(bundle, trust)
    opened = Opened(bundle, raw, checked)
    try:
        for name, expected in checked.manifest.files.items():
            try:
                fd = os.open(bundle / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                raise SnapshotError(f"{name} is missing from {bundle}", code="SNAPSHOT_CORRUPT") from None
            opened.files[name] = os.fdopen(fd, "rb", buffering=0)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SnapshotError(f"{name} is missing from {bundle}", code="SNAPSHOT_CORRUPT")
            if info.st_size != expected.size:
                raise SnapshotError(f"{name} in {bundle} does not match its manifest size", code="SNAPSHOT_CORRUPT")
        try:
            qcow2.check_image(Path(f"/proc/self/fd/{opened.files[DISK].fileno()}"))
        except SnapshotError as exc:  # it names the descriptor: name the file
            raise SnapshotError(
                f"{DISK} in {bundle} is not a disk this machinen opens: {exc.message.partition(': ')[2]}",
                code=exc.code,
            ) from None
    except BaseException:
        opened.close()
        raise
    return opened


def copy_verified(source: Path, target: Path, expected: FileEntry) -> None:
    """Copy a bundle file to ``target`` (new, 0600), holes as holes, checking the size
    and sha256 of exactly the bytes written; a disk's header is checked on the copy.

    On a mismatch ``target`` is removed and SNAPSHOT_CORRUPT raised."""
    digest = hashlib.sha256()
    zeros = bytes(COPY_BLOCK)

    def hash_zeros(count: int) -> None:  # a hole: zeros to hash, nothing to write
        for _ in range(count // COPY_BLOCK):
            digest.update(zeros)
        digest.update(zeros[: count % COPY_BLOCK])

    try:
        with open(source, "rb") as src, open(target, "xb", opener=sparse.private_opener) as dst:
            size = os.fstat(src.fileno()).st_size
            if size != expected.size:
                raise SnapshotError(f"{source.name} does not match its manifest size", code="SNAPSHOT_CORRUPT")
            hashed = 0
            for start, end in sparse.data_regions(src.fileno(), size):
                hash_zeros(start - hashed)
                offset = start
                while offset < end:
                    block = os.pread(src.fileno(), min(COPY_BLOCK, end - offset), offset)
                    if not block:
                        raise SnapshotError(f"{source.name} shrank while it was read", code="SNAPSHOT_CORRUPT")
                    digest.update(block)
                    if block != zeros[: len(block)]:
                        os.pwrite(dst.fileno(), block, offset)
                    offset += len(block)
                hashed = end
            hash_zeros(size - hashed)
            dst.truncate(size)
        if digest.hexdigest() != expected.sha256:
            raise SnapshotError(f"{source.name} does not match its manifest hash", code="SNAPSHOT_CORRUPT")
        if source.name == DISK:
            qcow2.check_image(target)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


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
    for name in (*DATA_FILES, MANIFEST, f".{MANIFEST}.partial", MAC, f".{MAC}.partial"):
        (bundle / name).unlink(missing_ok=True)
    try:
        os.rmdir(bundle)
    except OSError:
        pass
