"""The far end of an SSH link: ``machinen _peer``, serving one client on stdin/stdout.

Requests are frames ``[id, method, params]``; replies ``[id, True, result]``
or ``[id, False, code, message]`` (the framing of ``protocol/wire.py``).
Requests are served concurrently, so a client can keep several chunk uploads
in flight.  VMs restored for the client without ``detached`` belong to this
process: when the SSH connection goes (stdin reaches EOF) they are stopped,
the same lifeline rule as a local ``boot()``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.file import FileReadStream, FileWriteStream
from anyio.streams.stapled import StapledByteStream

from .. import __version__
from ..errors import MachinenError, SnapshotError, TransferError
from ..protocol import wire
from ..protocol.framing import FrameStream
from ..store import assets, bundle, chunks, paths, registry
from ..vm import VM, restore, stop_vm
from ..vmm import backend

PEER_PROTOCOL = 1


def bundles_dir() -> Path:
    """Bundles received from other hosts, named by the sha256 of their manifest."""
    return paths.private_dir(paths.private_dir(paths.home()) / "bundles")


def host_facts() -> dict[str, Any]:
    """What a client needs to decide whether and how much to place here."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return {
        "version": __version__,
        "protocol": PEER_PROTOCOL,
        "arch": platform.machine(),
        "qemu_version": backend.default().installed_version(),
        "accel": backend.default().choose_accelerator(None),
        "cpus": os.cpu_count() or 1,
        "load_1m": os.getloadavg()[0],
        "mem_available_mib": int(meminfo["MemAvailable"].split()[0]) // 1024,
        "vms": len(registry.live_vms()),
        "pid": os.getpid(),
    }


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


class Peer:
    def __init__(self, frames: FrameStream) -> None:
        self.frames = frames
        self.owned: dict[str, VM] = {}

    async def handle(self, request: list) -> None:
        request_id, method, params = request[0], request[1], request[2] if len(request) > 2 else {}
        try:
            result = await self.dispatch(method, params)
        except MachinenError as exc:
            await self.frames.send([request_id, False, exc.code, exc.message])
        except Exception as exc:  # report, don't die: the client decides what to do
            await self.frames.send([request_id, False, "HOST_PEER_FAILED", f"{type(exc).__name__}: {exc}"])
        else:
            await self.frames.send([request_id, True, result])

    async def dispatch(self, method: str, params: dict[str, Any]) -> Any:
        run = anyio.to_thread.run_sync
        if method == "hello":
            return await run(host_facts)
        if method == "missing":
            return await run(chunks.missing, params["digests"])
        if method == "put":
            data = _inflate_chunk(params["data"]) if params.get("compressed") else params["data"]
            return await run(chunks.put, params["digest"], data)
        if method == "lacking":
            return await run(lacking, params)
        if method == "assemble":
            return await run(assemble_bundle, params)
        if method == "remove_bundle":
            return await run(remove_bundle, params["bundle"])
        if method == "restore":
            return await self.restore(params)
        if method == "locate":
            entry = registry.find(params["name"])
            return {"socket": str(entry.supervisor_socket), "owned": params["name"] in self.owned}
        if method == "list":
            return await run(registry.list_rows)
        if method == "stop":
            owned = self.owned.pop(params["name"], None)
            if owned is not None:
                await owned.aclose()
                how = "stopped"
            else:
                how = await stop_vm(params["name"], force=bool(params.get("force")))
            return {"name": params["name"], "stopped": True, "how": how}
        raise MachinenError(f"unknown peer method {method!r}", code="HOST_PROTOCOL")

    async def restore(self, params: dict[str, Any]) -> dict[str, Any]:
        """One VM, or with ``n``/``names`` siblings sharing the bundle's RAM copy-on-write."""
        n, names = params.get("n"), params.get("names")
        started = await restore(
            params["bundle"],
            name=params.get("name"),
            n=n,
            names=names,
            detached=bool(params.get("detached")),
            ports=params.get("ports"),
            boot_timeout=params.get("boot_timeout", 60.0),
        )
        vms = list(started) if n is not None or names is not None else [started]
        for vm in vms:
            if params.get("detached"):
                await vm.aclose()  # only disconnects
            else:
                self.owned[vm.name] = vm
        return {"vms": [{"name": vm.name, "socket": str(registry.vm_dir(vm.name).supervisor_socket)} for vm in vms]}

    async def serve(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                while True:
                    try:
                        request = await self.frames.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, wire.ProtocolError):
                        break
                    tg.start_soon(self.handle, request)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                for vm in self.owned.values():
                    await vm.aclose()


async def amain() -> None:
    stdin = FileReadStream(open(os.dup(0), "rb", buffering=0))  # noqa: SIM115 - the stream owns it
    stdout = FileWriteStream(open(os.dup(1), "wb", buffering=0))  # noqa: SIM115
    # Nothing else may write to the protocol stream.
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    await Peer(FrameStream(StapledByteStream(stdout, stdin))).serve()
