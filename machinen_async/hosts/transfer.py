"""Moving a bundle to a host as content-addressed chunks: the sending half (``send_bundle``,
over any ``call``) and the receiving half the peer serves (``lacking``, ``put``, ``assemble_bundle``).

Only chunks the host lacks cross the wire (zlib level 1 when it helps).  The
sender sends the manifest bytes whose MAC it checked, from files it opened once
and hashed as it read them (``bundle.open_checked``), so a bundle directory
swapped meanwhile sends nothing it did not verify; the host checks each chunk's
sha256 on arrival and every file's sha256 against those manifest bytes when it
assembles them, and then vouches for the bundle under its own key, as received.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

import anyio

from ..errors import BootError, SnapshotError, TransferError, plain_errors
from ..store import assets, bundle, chunks, paths, sparse
from ..store.manifest import Manifest
from .base import Progress, TransferReport

PUTS_IN_FLIGHT = 8
MISSING_BATCH = 4096

Call = Callable[[str, dict[str, Any]], Awaitable[Any]]


async def send_bundle(
    call: Call,
    destination: str,
    opened: bundle.Opened,
    report: Progress,
    recipes: dict[str, chunks.Recipe] | None = None,
) -> TransferReport:
    """Send a bundle ``bundle.open_checked`` opened (and any kernel, initrd or image the host lacks)
    as the chunks the host lacks: the manifest bytes it verified, and what its open files hold, hashed
    as they are read (``recipes``: those of ``checked_recipes``, if the caller made them already).
    Closes ``opened`` whatever happens."""
    files: dict[str, BinaryIO] = {}
    try:
        started = time.monotonic()
        manifest = opened.checked.manifest
        if recipes is None:
            recipes = await anyio.to_thread.run_sync(checked_recipes, opened)
        recipes = dict(recipes)
        lacking = await call(
            "lacking",
            {"kernel": manifest.kernel.sha256, "initrd": manifest.initrd.sha256,
             "image_key": manifest.image.key, "image_sha256": manifest.image.sha256},
        )  # fmt: skip
        files.update(opened.files)
        extras = [key for key in ("kernel", "initrd", "image") if lacking[key]]
        for key in extras:
            files[key], digest = await anyio.to_thread.run_sync(_open_asset, key, manifest)
            recipes[key] = await anyio.to_thread.run_sync(_checked_recipe, files[key], digest, None, f"the {key}")
        where: dict[bytes, tuple[str, int]] = {}
        for key, recipe in recipes.items():
            for index, digest in enumerate(recipe["chunks"]):
                if digest is not None:
                    where.setdefault(digest, (key, index))
        unique = list(where)
        wanted: list[bytes] = []
        for start in range(0, len(unique), MISSING_BATCH):
            wanted += await call("missing", {"digests": unique[start : start + MISSING_BATCH]})
        total_bytes = len(unique) * chunks.CHUNK_SIZE
        sent = {"bytes": 0, "chunks": 0}
        report(f"sending {len(wanted)} of {len(unique)} chunks to {destination}")
        limiter = anyio.CapacityLimiter(PUTS_IN_FLIGHT)

        async def put(digest: bytes) -> None:
            async with limiter:
                key, index = where[digest]
                data, compressed = await anyio.to_thread.run_sync(_read_compressed, files[key], index, digest, key)
                await call("put", {"digest": digest, "data": data, "compressed": compressed})
                sent["bytes"] += len(data)
                sent["chunks"] += 1
                if sent["chunks"] % 64 == 0 or sent["chunks"] == len(wanted):
                    report(f"sent {sent['chunks']}/{len(wanted)} chunks, {sent['bytes'] / 2**20:.1f} MiB")

        with plain_errors():
            async with anyio.create_task_group() as tg:
                for digest in wanted:
                    tg.start_soon(put, digest)
        remote_bundle = await call(
            "assemble",
            {"manifest": opened.raw, "files": {name: recipes[name] for name in manifest.files},
             **{key: recipes[key] for key in extras}},
        )  # fmt: skip
    finally:
        for key, file in files.items():
            if key not in opened.files:
                file.close()
        opened.close()
    return TransferReport(
        remote_bundle=remote_bundle,
        bytes_total=total_bytes,
        bytes_sent=sent["bytes"],
        chunks_total=len(unique),
        chunks_sent=sent["chunks"],
        seconds=round(time.monotonic() - started, 3),
    )


def checked_recipes(opened: bundle.Opened) -> dict[str, chunks.Recipe]:
    """The recipe of each of a bundle's open files, each read once and hashed in the same pass:
    SNAPSHOT_CORRUPT unless every file is what the verified manifest says."""
    return {
        name: _checked_recipe(opened.files[name], expected.sha256, expected.size, f"{name} in {opened.bundle}")
        for name, expected in opened.checked.manifest.files.items()
    }


def _checked_recipe(file: BinaryIO, sha256: str, size: int | None, what: str) -> chunks.Recipe:
    """``chunks.recipe`` of an open file, with the sha256 (and size) of its whole content checked."""
    fd = file.fileno()
    length = os.fstat(fd).st_size
    if size is not None and length != size:
        raise SnapshotError(f"{what} does not match its manifest size", code="SNAPSHOT_CORRUPT")
    count = -(-length // chunks.CHUNK_SIZE)
    with_data = set()
    for start, end in sparse.data_regions(fd, length):
        with_data.update(range(start // chunks.CHUNK_SIZE, -(-end // chunks.CHUNK_SIZE)))
    digest = hashlib.sha256()
    zeros = bytes(chunks.CHUNK_SIZE)
    found: list[bytes | None] = [None] * count
    for index in range(count):
        piece = min(chunks.CHUNK_SIZE, length - index * chunks.CHUNK_SIZE)
        if index not in with_data:  # a hole: zeros, nothing to read
            digest.update(zeros[:piece])
            continue
        data = os.pread(fd, piece, index * chunks.CHUNK_SIZE)
        if len(data) != piece:
            raise SnapshotError(f"{what} shrank while it was read", code="SNAPSHOT_CORRUPT")
        digest.update(data)
        if data.count(0) != len(data):
            found[index] = hashlib.sha256(data).digest()
    if digest.hexdigest() != sha256:
        raise SnapshotError(f"{what} does not match its manifest hash", code="SNAPSHOT_CORRUPT")
    return {"size": length, "chunks": found}


def _read_compressed(file: BinaryIO, index: int, digest: bytes, what: str) -> tuple[bytes, bool]:
    """A chunk of an open file, which must still be the one hashed (files can change in place)."""
    data = os.pread(file.fileno(), chunks.CHUNK_SIZE, index * chunks.CHUNK_SIZE)
    if hashlib.sha256(data).digest() != digest:
        raise SnapshotError(f"{what} changed while it was sent", code="SNAPSHOT_CORRUPT")
    packed = zlib.compress(data, 1)
    return (packed, True) if len(packed) < len(data) else (data, False)


def _open_asset(key: str, manifest: Manifest) -> tuple[BinaryIO, str]:
    path, digest = _local_asset(key, manifest)
    return open(path, "rb", buffering=0), digest


def _local_asset(key: str, manifest: Manifest) -> tuple[Path, str]:
    """This host's copy of a bundle's kernel, initrd or image, found by content, and its sha256."""
    if key == "image":
        digest = manifest.image.sha256
        found = assets.find_image(manifest.image.key, digest) if digest else None
        if found is None or digest is None:
            raise BootError("this host does not have the bundle's image to send", code="BOOT_IMAGE_NOT_FOUND")
        return found, digest
    boot_file = manifest.kernel if key == "kernel" else manifest.initrd
    found = assets.find_boot_file(boot_file.sha256)
    if found is None:
        raise SnapshotError(f"this host does not have the bundle's {key} to send", code="SNAPSHOT_INCOMPATIBLE")
    return found, boot_file.sha256


def bundles_dir() -> Path:
    """Bundles received from other hosts, named by the sha256 of their manifest."""
    return paths.private_dir(paths.private_dir(paths.home()) / "bundles")


def lacking(params: dict[str, Any]) -> dict[str, bool]:
    """Which boot files and image of a bundle this host would need sent."""
    return {
        "kernel": assets.find_boot_file(params["kernel"]) is None,
        "initrd": assets.find_boot_file(params["initrd"]) is None,
        "image": assets.find_image(params["image_key"], params.get("image_sha256")) is None,
    }


def _install_verified(recipe: chunks.Recipe, digest: str, target: Path, mode: int) -> None:
    """Assemble a received file next to ``target`` and move it there only if its sha256 matches."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        chunks.assemble(recipe, partial)
        if assets.sha256_file(partial) != digest:
            raise TransferError(f"{target.name} does not match its manifest hash", code="TRANSFER_CORRUPT")
        partial.chmod(mode)
        partial.rename(target)
        assets.remember_digest(target, digest)
    finally:
        partial.unlink(missing_ok=True)


def _inflate_chunk(packed: bytes) -> bytes:
    """Decompress a chunk, refusing to expand past a chunk's size (a zlib bomb costs nothing)."""
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(packed, chunks.CHUNK_SIZE)
    except zlib.error as exc:
        raise TransferError(f"a chunk does not decompress: {exc}", code="TRANSFER_CORRUPT") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise TransferError("a chunk decompresses beyond a chunk's size", code="TRANSFER_CORRUPT", retryable=False)
    return data


def assemble_bundle(params: dict[str, Any]) -> str:
    """Build a received bundle (and any boot file or image it lacked) from stored chunks."""
    manifest_bytes: bytes = params["manifest"]
    bundle_id = hashlib.sha256(manifest_bytes).hexdigest()[:32]
    target = bundles_dir() / bundle_id
    if target.is_dir():
        bundle.verify(target)  # ours: signed when it was assembled
        os.utime(target)  # used again: kept by gc
        return str(target)
    manifest = Manifest.from_cbor(manifest_bytes)
    files: dict[str, chunks.Recipe] = params["files"]
    if set(files) != set(manifest.files):
        raise TransferError("the files sent are not the bundle's files", code="TRANSFER_CORRUPT", retryable=False)
    for key, boot_file in (("kernel", manifest.kernel), ("initrd", manifest.initrd)):
        digest = boot_file.sha256
        if params.get(key) is not None and assets.find_boot_file(digest) is None:
            _install_verified(params[key], digest, assets.objects_dir() / digest, 0o600)
    image = manifest.image
    if params.get("image") is not None and assets.find_image(image.key, image.sha256) is None:
        if image.sha256 is None:
            raise TransferError("the bundle does not name its image's hash", code="TRANSFER_CORRUPT", retryable=False)
        _install_verified(params["image"], image.sha256, assets.objects_dir() / image.sha256, 0o444)
    partial = bundles_dir() / f".{bundle_id}.{os.getpid()}.partial"
    partial.mkdir(mode=0o700)
    try:
        for name in files:  # the manifest's names, which Manifest.from_cbor limited to bundle.DATA_FILES
            chunks.assemble(files[name], partial / name)
        (partial / bundle.MANIFEST).write_bytes(manifest_bytes)
        (partial / bundle.MANIFEST).chmod(0o600)
        bundle.verify(partial, trust=True)  # it came over the user's own SSH login: vouch for it here,
        bundle.sign(partial, manifest_bytes, received=True)  # as received: its recorded mounts bind nothing
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def remove_bundle(bundle_path: str) -> None:
    """Delete a received bundle; only ever one directly inside bundles_dir()."""
    path = Path(bundle_path)
    if path.parent != bundles_dir() or path.name.startswith("."):
        raise SnapshotError(f"{bundle_path} is not a received bundle", code="SNAPSHOT_DIR_INVALID")
    shutil.rmtree(path, ignore_errors=True)


def store_chunk(params: dict[str, Any]) -> None:
    """Keep one sent chunk (it is checked against its digest before it is kept)."""
    data = _inflate_chunk(params["data"]) if params.get("compressed") else params["data"]
    chunks.put(params["digest"], data)
