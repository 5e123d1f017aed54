"""An OCI / Docker image as a bootable root filesystem: its layers flattened (``oci_flatten``), then
what the agent needs added, as one tarball that ``assets.image_for`` turns into the VM's disk.

Added: the agent's runtime at ``RUNTIME_DIR`` (``guest_runtime``: the image may have no Python
or libc), the image config's Env, WorkingDir and User at ``EXEC_DEFAULTS`` (the defaults of every
command), and the directories init and the agent mount on or write to, where the image has none
(a distroless image has no ``/proc``).  Cached by (manifest digest, runtime), so a second boot of
the same image neither pulls nor flattens.  Blocking: call from a worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..protocol.guest_abi import EXEC_DEFAULTS, RUNTIME_DIR
from . import assets, guest_runtime, oci_flatten, oci_pull, paths

if TYPE_CHECKING:
    from .oci_pull import PulledImage

TARBALL_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.zst")
# Mount points and directories PID 1 and the agent use (init.py, workload.py, the initramfs /init).
# What an image's files may take once flattened (IMAGE_TOO_LARGE beyond): a bound on what a layer
# that decompresses without end (a gzip bomb) costs the cache's disk before it is refused.
MAX_IMAGE_BYTES = 64 << 30
ROOT_DIRECTORIES = {"proc": 0o555, "sys": 0o555, "dev": 0o755, "tmp": 0o1777, "run": 0o755, "etc": 0o755,
                    "root": 0o700, "var": 0o755, "var/log": 0o755}  # fmt: skip


@dataclass(frozen=True)
class Rootfs:
    """What a VM boots from: the tarball, and what it is for people (and manifests): the tarball's
    path, or an OCI image by reference and manifest digest (``team/agent:1@sha256:...``)."""

    tarball: Path
    source: str


def rootfs_of(
    image: str | os.PathLike[str],
    report: assets.Report = lambda message: None,
    *,
    pull: str = "missing",
    credentials: tuple[str, str] | None = None,
    insecure: Sequence[str] = (),
) -> Rootfs:
    """The rootfs tarball ``image`` names: a tarball's path, or else an OCI image reference
    (``python:3.12-slim``, ``registry:5000/team/agent@sha256:...``, ``oci:DIR[:TAG]``,
    ``docker-archive:FILE``), pulled (``pull``: "missing", "always" or "never", as
    ``oci_pull.pull``'s policy; ``insecure``: registries reached over plain HTTP) and flattened."""
    path = Path(image).expanduser()
    text = str(image)
    if path.exists() or text.startswith(("/", "./", "../", "~")) or text.endswith(TARBALL_SUFFIXES):
        resolved = path.resolve()  # a missing one is BOOT_IMAGE_NOT_FOUND when its disk is built
        return Rootfs(resolved, str(resolved))
    pulled = oci_pull.pull(text, policy=pull, credentials=credentials, insecure=insecure, progress=report)
    return Rootfs(rootfs_tarball(pulled, report), f"{pulled.reference}@{pulled.manifest_digest}")


def rootfs_tarball(pulled: PulledImage, report: assets.Report = lambda message: None) -> Path:
    """The tarball ``pulled`` boots from (built once per manifest digest and runtime)."""
    base = assets.ensure_base(report)
    runtime = guest_runtime.runtime_for(base.rootfs_tarball)
    directory = paths.private_dir(paths.private_dir(paths.private_dir(paths.cache_dir()) / "oci") / "rootfs")
    target = directory / f"{pulled.manifest_digest.removeprefix('sha256:')[:32]}-{runtime.name}.tar"
    if target.is_file():
        return target
    with _building(target):  # concurrent first boots of one image flatten it once
        if not target.is_file():
            _build(pulled, runtime, target, report)
    return target


@contextlib.contextmanager
def _building(target: Path) -> Iterator[None]:
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build(pulled: PulledImage, runtime: Path, target: Path, report: assets.Report) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / "rootfs.tar"
        with assets._step(report, f"flattening {pulled.reference} ({len(pulled.layers)} layers)"):
            layers = [(layer.path, layer.media_type) for layer in pulled.layers]
            oci_flatten.flatten(layers, partial, max_bytes=MAX_IMAGE_BYTES)
        with tarfile.open(partial, "a") as tar:
            present = {_normalised(name) for name in tar.getnames()}
            defaults = exec_defaults(pulled.config)
            working_dir = _normalised(defaults["cwd"])  # created where the image lacks it, as runtimes do
            for name, mode in {**ROOT_DIRECTORIES, **({working_dir: 0o755} if working_dir else {})}.items():
                if name not in present:
                    tar.addfile(_entry(name, tarfile.DIRTYPE, mode))
            tar.add(runtime, arcname=RUNTIME_DIR.lstrip("/"), filter=_owned_by_root)
            written = json.dumps(defaults).encode()
            tar.addfile(_entry(EXEC_DEFAULTS.lstrip("/"), tarfile.REGTYPE, 0o644, len(written)), io.BytesIO(written))
        partial.chmod(0o444)
        partial.rename(target)


def exec_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """What of an image config (``config["config"]``) the agent applies to every command.  The
    config comes from elsewhere: a field of another type than the spec's is left out (PID 1 reads
    the result), and a WorkingDir must be absolute, without ``..``."""
    settings = config.get("config")
    settings = settings if isinstance(settings, dict) else {}

    def words(key: str) -> list[str]:
        value = settings.get(key)
        return [word for word in value if isinstance(word, str)] if isinstance(value, list) else []

    def text(key: str) -> str:
        value = settings.get(key)
        return value if isinstance(value, str) else ""

    cwd = text("WorkingDir")
    return {
        "env": words("Env"),
        "cwd": cwd if cwd.startswith("/") and ".." not in cwd.split("/") else "/",
        "user": text("User"),
        "cmd": [*words("Entrypoint"), *words("Cmd")],  # the workload of cmd="image"
    }


def _normalised(name: str) -> str:
    return name.removeprefix("./").strip("/")


def _entry(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    entry = tarfile.TarInfo(name)
    entry.type, entry.mode, entry.size = kind, mode, size
    return entry


def _owned_by_root(entry: tarfile.TarInfo) -> tarfile.TarInfo:
    entry.uid = entry.gid = 0
    entry.uname = entry.gname = "root"
    return entry


def collect_unused(*, dry_run: bool = False) -> list[Path]:
    """Flattened root filesystems of images no cached reference names any more, then (unless
    ``dry_run``) the blobs none uses (``oci_pull.gc``): what was (or would be) removed."""
    directory = paths.cache_dir() / "oci" / "rootfs"
    named = {image.manifest_digest.removeprefix("sha256:")[:32] for image in oci_pull.list_images()}
    unused = [tarball for tarball in sorted(directory.glob("*.tar")) if tarball.name.split("-")[0] not in named]
    if dry_run:
        return unused
    for tarball in unused:
        tarball.unlink(missing_ok=True)
        tarball.with_suffix(".lock").unlink(missing_ok=True)
    freed = oci_pull.gc()
    return [*unused, *([oci_pull.oci_dir() / f"blobs ({freed} bytes)"] if freed else [])]
