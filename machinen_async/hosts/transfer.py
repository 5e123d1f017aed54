"""Moving a bundle to a host as content-addressed chunks: the sending half (``send_bundle``,
over any ``call``) and the receiving half the peer serves (``lacking``, ``put``, ``assemble_bundle``).

Only chunks the host lacks cross the wire (zlib level 1 when it helps); the
host checks each chunk's sha256 on arrival and every file's sha256 when it
assembles them, and then vouches for the bundle under its own key.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from ..errors import SnapshotError, TransferError, plain_errors
from ..store import assets, bundle, chunks, paths
from .base import Progress, TransferReport

PUTS_IN_FLIGHT = 8
MISSING_BATCH = 4096

Call = Callable[[str, dict[str, Any]], Awaitable[Any]]


async def send_bundle(call: Call, destination: str, bundle_dir: Path, report: Progress) -> TransferReport:
    """Send a bundle (and any kernel, initrd or image the host lacks) as the chunks it lacks."""
    started = time.monotonic()
    raw_manifest = (bundle_dir / bundle.MANIFEST).read_bytes()
    manifest = bundle.parse_manifest(raw_manifest, bundle_dir)
    lacking = await call(
        "lacking",
        {"kernel": manifest["kernel"]["sha256"], "initrd": manifest["initrd"]["sha256"],
         "image_key": manifest["image"]["key"], "image_sha256": manifest["image"].get("sha256")},
    )  # fmt: skip
    sources = {name: bundle_dir / name for name in manifest["files"]}
    extras = {key: _local_asset(key, manifest) for key in ("kernel", "initrd", "image") if lacking[key]}
    recipes: dict[str, chunks.Recipe] = {}
    where: dict[bytes, tuple[Path, int]] = {}
    for key, path in {**sources, **extras}.items():
        recipes[key] = await anyio.to_thread.run_sync(chunks.recipe, path)
        for index, digest in enumerate(recipes[key]["chunks"]):
            if digest is not None:
                where.setdefault(digest, (path, index))
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
            path, index = where[digest]
            data, compressed = await anyio.to_thread.run_sync(_read_compressed, path, index)
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
        {"manifest": raw_manifest, "files": {name: recipes[name] for name in sources},
         **{key: recipes[key] for key in extras}},
    )  # fmt: skip
    return TransferReport(
        remote_bundle=remote_bundle,
        bytes_total=total_bytes,
        bytes_sent=sent["bytes"],
        chunks_total=len(unique),
        chunks_sent=sent["chunks"],
        seconds=round(time.monotonic() - started, 3),
    )


def _read_compressed(path: Path, index: int) -> tuple[bytes, bool]:
    data = chunks.read_chunk(path, index)
    packed = zlib.compress(data, 1)
    return (packed, True) if len(packed) < len(data) else (data, False)


def _local_asset(key: str, manifest: dict[str, Any]) -> Path:
    """This host's copy of a bundle's kernel, initrd or image, found by content."""
    if key == "image":
        digest = manifest["image"].get("sha256")
        found = assets.find_image(manifest["image"]["key"], digest) if digest else None
        if found is None:
            raise SnapshotError("this host does not have the bundle's image to send", code="BOOT_IMAGE_NOT_FOUND")
        return found
    found = assets.find_boot_file(manifest[key]["sha256"])
    if found is None:
        raise SnapshotError(f"this host does not have the bundle's {key} to send", code="SNAPSHOT_INCOMPATIBLE")
    return found


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
    manifest = bundle.parse_manifest(manifest_bytes)
    files: dict[str, chunks.Recipe] = params["files"]
    if set(files) != set(manifest["files"]):
        raise TransferError("the files sent are not the bundle's files", code="TRANSFER_CORRUPT", retryable=False)
    for key in ("kernel", "initrd"):
        digest = manifest[key]["sha256"]
        if params.get(key) is not None and assets.find_boot_file(digest) is None:
            _install_verified(params[key], digest, assets.objects_dir() / digest, 0o600)
    image = manifest["image"]
    if params.get("image") is not None and assets.find_image(image["key"], image.get("sha256")) is None:
        if "sha256" not in image:
            raise TransferError("the bundle does not name its image's hash", code="TRANSFER_CORRUPT", retryable=False)
        _install_verified(params["image"], image["sha256"], assets.objects_dir() / image["sha256"], 0o444)
    partial = bundles_dir() / f".{bundle_id}.{os.getpid()}.partial"
    partial.mkdir(mode=0o700)
    try:
        for name in files:  # the manifest's names, which parse_manifest limited to bundle.DATA_FILES
            chunks.assemble(files[name], partial / name)
        (partial / bundle.MANIFEST).write_bytes(manifest_bytes)
        (partial / bundle.MANIFEST).chmod(0o600)
        bundle.verify(partial, trust=True)  # it came over the user's own SSH login: vouch for it here
        bundle.sign(partial, manifest_bytes)
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
