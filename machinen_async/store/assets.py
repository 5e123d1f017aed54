"""Guest kernel, initramfs and root filesystem images, built from Debian packages.

Everything lands in the cache directory, content addressed, and is rebuilt
only when its inputs change:

- kernel: ``linux-image-cloud-amd64``'s dependency, fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb -x`` (not installed);
- initramfs: busybox-static + the virtio modules + a tiny /init, packed with
  busybox's cpio (hosts often lack cpio);
- base rootfs: ``mmdebstrap --variant=minbase`` with python3 + msgpack, kept
  as a tarball;
- images: a rootfs tarball plus the guest agent, as a read-only ext4 file
  named by the sha256 of (tarball, agent code), made by ``mke2fs -d`` from
  the tarball itself where e2fsprogs >= 1.47.1 reads one (else from the
  tarball unpacked, as root).  Each VM boots on its own qcow2 overlay of it.

These functions block (subprocesses, hashing): call them from a worker thread.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import functools
import gzip
import hashlib
import io
import json
import lzma
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import AssetsError, BootError
from ..protocol.guest_abi import RUNTIME_DIR
from . import paths, sparse

Report = Callable[[str], None]

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
SUITE = "bookworm"
ROOTFS_PACKAGES = ("python3-minimal", "python3-msgpack")
# Dependency order: each module only needs the ones before it.
INITRD_MODULES = (
    "virtio_ring", "virtio", "virtio_mmio", "virtio_console", "virtio_blk", "failover", "net_failover", "virtio_net",
    "fuse",  # live mounts (guest/mounts.py)
)  # fmt: skip
MIN_IMAGE_GIB = 2  # sparse; the qcow2 overlay only stores what a VM writes
GUEST_LIB = "usr/lib/machinen"
PACKAGE_DIR = Path(__file__).resolve().parent.parent
GUEST_PACKAGE = "guest"  # copied into every image whole, with what it imports
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
GUEST_ENTRY = f"/{GUEST_LIB}/agent_main.py"
ASSETS_FORMAT = 1

INIT_SCRIPT = f"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in {" ".join(INITRD_MODULES)}; do insmod /lib/modules/$m.ko; done
i=0; while [ ! -b /dev/vda ]; do i=$((i+1)); [ $i -gt 500 ] && echo "machinen: no /dev/vda" && exec sh; sleep 0.01; done
mkdir -p /newroot
mount -t ext4 -o rw,noatime /dev/vda /newroot || {{ echo "machinen: cannot mount root"; exec sh; }}
mount --move /proc /newroot/proc; mount --move /sys /newroot/sys; mount --move /dev /newroot/dev
# An image that brings no interpreter for the agent carries one (store/guest_runtime.py).
[ -x /newroot{RUNTIME_DIR}/bin/python3 ] && exec switch_root /newroot {RUNTIME_DIR}/bin/python3 -I {GUEST_ENTRY}
exec switch_root /newroot /usr/bin/python3 -I {GUEST_ENTRY}
"""

AGENT_ENTRY = f"""import sys
sys.path.insert(0, "/{GUEST_LIB}")
from machinen_async.{GUEST_PACKAGE}.init import main
main()
"""


@dataclass(frozen=True)
class BaseAssets:
    kernel: Path
    initrd: Path
    rootfs_tarball: Path
    kernel_package: str


# Where Debian puts mke2fs and friends: on root's PATH, not on an ordinary user's.
SBIN_DIRS = "/usr/local/sbin:/usr/sbin:/sbin"


def _program(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path=SBIN_DIRS) or name


def _run(argv: list[str], *, cwd: Path | None = None, what: str, env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(
            [_program(argv[0]), *argv[1:]], cwd=cwd, capture_output=True, text=True, env=env, check=False
        )
    except FileNotFoundError:
        raise AssetsError(
            f"{what}: {argv[0]} is not installed (apt-get install the host packages from the README)",
            code="ASSETS_TOOL_MISSING",
        ) from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise AssetsError(f"{what} failed ({' '.join(argv[:3])} ... exit {proc.returncode}):\n{tail}")
    return proc.stdout


_ZEROS = bytes(1 << 20)


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes; holes are hashed as the zeros they read as, without reading them
    (a 2 GiB image that is mostly holes: ~1 s instead of ~6 s here)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size, offset = os.fstat(f.fileno()).st_size, 0
        for start, end in sparse.data_regions(f.fileno(), size):
            _hash_zeros(digest, start - offset)
            f.seek(start)
            remaining = end - start
            while remaining:
                chunk = f.read(min(1 << 20, remaining))
                if not chunk:
                    raise AssetsError(f"{path} shrank while it was hashed", code="ASSETS_BUILD_FAILED")
                digest.update(chunk)
                remaining -= len(chunk)
            offset = end
        _hash_zeros(digest, size - offset)
    return digest.hexdigest()


def _hash_zeros(digest: Any, count: int) -> None:
    while count > 0:
        digest.update(_ZEROS[: min(count, len(_ZEROS))])
        count -= len(_ZEROS)


@contextlib.contextmanager
def _cache_lock() -> Iterator[Path]:
    """One builder at a time per cache directory (several CLIs, test workers)."""
    cache = paths.private_dir(paths.cache_dir())
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield cache


@contextlib.contextmanager
def _step(report: Report, title: str) -> Iterator[None]:
    report(f"{title} ...")
    started = time.monotonic()
    yield
    report(f"{title}: done in {time.monotonic() - started:.1f} s")


def _apt_package(name: str, report: Report) -> tuple[str, str]:
    """(package, version) from apt's lists, refreshing them once if needed."""
    for attempt in range(2):
        try:
            out = _run(["apt-cache", "show", "--no-all-versions", name], what=f"apt-cache show {name}")
        except AssetsError:
            out = ""
        fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line and not line.startswith(" "))
        if "Version" in fields:
            return fields["Package"], fields["Version"]
        if attempt == 0:
            with _step(report, "apt-get update"):
                _run(["apt-get", "update", "-q"], what="apt-get update")
    raise AssetsError(f"Debian package {name} not found in apt's lists", code="ASSETS_PACKAGE_NOT_FOUND")


def _kernel_package(report: Report) -> tuple[str, str]:
    meta, _ = _apt_package(KERNEL_META_PACKAGE, report)
    depends = _run(["apt-cache", "depends", meta], what="apt-cache depends")
    for line in depends.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return _apt_package(line.split(": ", 1)[1], report)
    raise AssetsError(f"{meta} names no kernel image package", code="ASSETS_PACKAGE_NOT_FOUND")


def _download_and_extract(package: str, version: str, into: Path) -> None:
    with tempfile.TemporaryDirectory(dir=into.parent) as tmp:
        _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=Path(tmp), what=f"download {package}")
        (deb,) = Path(tmp).glob("*.deb")
        _run(["dpkg-deb", "-x", str(deb), str(into)], what=f"unpack {package}")


def _module_dependencies(module: Path) -> list[str]:
    """A module's ``depends=`` field (the package ships no modules.dep)."""
    data = module.read_bytes()
    start = data.find(b"\0depends=")
    if start < 0:
        return []
    value = data[start + len(b"\0depends=") : data.index(b"\0", start + 1)].decode()
    return [d for d in value.split(",") if d]


def _build_kernel_and_initrd(cache: Path, report: Report) -> tuple[Path, Path, str]:
    package, version = _kernel_package(report)
    busybox_package, busybox_version = _apt_package("busybox-static", report)
    key = hashlib.sha256(
        json.dumps([ASSETS_FORMAT, package, version, busybox_version, INITRD_MODULES, INIT_SCRIPT]).encode()
    ).hexdigest()[:16]
    target = cache / "boot" / key
    if (target / "initrd.gz").exists():
        return target / "vmlinuz", target / "initrd.gz", f"{package}={version}"
    paths.private_dir(target.parent)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        with _step(report, f"fetching kernel {package} {version}"):
            _download_and_extract(package, version, work / "kernel")
        with _step(report, f"fetching {busybox_package} {busybox_version}"):
            _download_and_extract(busybox_package, busybox_version, work / "busybox")
        with _step(report, "building initramfs"):
            root = work / "initrd"
            for sub in ("bin", "lib/modules", "proc", "sys", "dev", "newroot"):
                (root / sub).mkdir(parents=True)
            busybox = root / "bin" / "busybox"
            shutil.copy2(work / "busybox" / "bin" / "busybox", busybox)
            for applet in ("sh", "mount", "insmod", "mkdir", "switch_root", "sleep", "echo"):
                (root / "bin" / applet).symlink_to("busybox")
            modules = {p.stem: p for p in (work / "kernel" / "lib" / "modules").rglob("*.ko")}
            for name in INITRD_MODULES:
                if name not in modules:
                    raise AssetsError(f"kernel module {name}.ko missing from {package}")
                missing = [d for d in _module_dependencies(modules[name]) if d not in INITRD_MODULES]
                if missing:
                    raise AssetsError(f"{name}.ko needs {missing}, which the initramfs lacks")
                shutil.copy2(modules[name], root / "lib" / "modules" / f"{name}.ko")
            (root / "init").write_text(INIT_SCRIPT)
            (root / "init").chmod(0o755)
            members = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
            archive = subprocess.run(
                [str(busybox), "cpio", "-o", "-H", "newc", "-R", "0:0"],
                cwd=root,
                input=members,
                capture_output=True,
                check=False,
            )
            if archive.returncode != 0 or len(archive.stdout) < 1024:
                raise AssetsError(f"cpio failed: {archive.stderr.decode(errors='replace')[-500:]}")
            out = work / "out"
            out.mkdir()
            with open(out / "initrd.gz", "wb") as f:
                subprocess.run(["gzip", "-1"], input=archive.stdout, stdout=f, check=True)
            (vmlinuz,) = (work / "kernel" / "boot").glob("vmlinuz-*")
            shutil.copy2(vmlinuz, out / "vmlinuz")
            for f in out.iterdir():
                f.chmod(0o444)
            out.rename(target)
    return target / "vmlinuz", target / "initrd.gz", f"{package}={version}"


def _build_rootfs_tarball(
    cache: Path, report: Report, suite: str = SUITE, packages: Sequence[str] = (), run: Sequence[str] = ()
) -> Path:
    wanted = [*ROOTFS_PACKAGES, *(name for name in packages if name not in ROOTFS_PACKAGES)]
    recipe: list = [ASSETS_FORMAT, suite, "minbase", wanted]
    hooks = []
    if run:
        # The commands use this host's network, so they trust what this host trusts: its
        # local CAs (/usr/local/share/ca-certificates, e.g. an egress proxy's) go in first.
        local_cas = sorted(LOCAL_CA_DIR.glob("*.crt"))
        if "ca-certificates" not in wanted:
            wanted.append("ca-certificates")
        if local_cas:
            hooks += [f"--customize-hook=copy-in {' '.join(map(shlex.quote, map(str, local_cas)))} {LOCAL_CA_DIR}",
                      '--customize-hook=chroot "$1" update-ca-certificates --fresh >/dev/null']  # fmt: skip
        recipe += [list(run), [hashlib.sha256(ca.read_bytes()).hexdigest() for ca in local_cas]]
        # Run on this host, natively, in the new root: far faster than in an emulated guest.
        hooks += [f'--customize-hook=chroot "$1" sh -ec {shlex.quote(command)}' for command in run]
    key = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]
    tarball = cache / "rootfs" / f"base-{suite}-{key}.tar"
    if tarball.exists():
        return tarball
    paths.private_dir(tarball.parent)
    partial = tarball.with_suffix(".partial")
    mode = _mmdebstrap_mode()
    with _step(report, f"building a Debian {suite} rootfs with mmdebstrap (a minute or more)"):
        try:
            _run(
                ["mmdebstrap", *mode, "--variant=minbase", f"--include={','.join(wanted)}", *hooks, "--format=tar",
                 suite, str(partial)],
                what="mmdebstrap",
            )  # fmt: skip
            partial.chmod(0o444)
            partial.rename(tarball)
        finally:
            partial.unlink(missing_ok=True)
    return tarball


SUBORDINATE_IDS = (Path("/etc/subuid"), Path("/etc/subgid"))


def _mmdebstrap_mode() -> list[str]:
    """As root, mmdebstrap's own choice; as anyone else, its unshare mode: a user namespace that
    maps the user's subordinate ids, so the tarball still holds root-owned files and device nodes.
    That needs newuidmap (Debian's ``uidmap``) and the user's lines in /etc/subuid and /etc/subgid
    (``useradd`` writes them for new users); said up front rather than as mmdebstrap's guesses."""
    if os.geteuid() == 0:
        return []
    if shutil.which("newuidmap", path=f"{os.environ.get('PATH', '')}:{SBIN_DIRS}") is None:
        raise AssetsError(
            "building a Debian rootfs as a non-root user needs newuidmap: sudo apt-get install uidmap",
            code="ASSETS_TOOL_MISSING",
        )
    user = pwd.getpwuid(os.geteuid()).pw_name
    for listing in SUBORDINATE_IDS:
        try:
            owners = {line.split(":", 1)[0] for line in listing.read_text().splitlines()}
        except OSError:
            owners = set()
        if not owners & {user, str(os.geteuid())}:
            raise AssetsError(
                f"building a Debian rootfs as {user} needs subordinate ids in {listing}: "
                f"sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}",
                code="ASSETS_TOOL_MISSING",
            )
    return ["--mode=unshare"]


def debian_rootfs(
    suite: str = SUITE,
    packages: Sequence[str] = (),
    run: Sequence[str] = (),
    report: Report = lambda message: None,
) -> Path:
    """A Debian root filesystem tarball (cached by recipe), built here with mmdebstrap.

    Always has what the guest agent needs (python3, msgpack); ``packages``
    adds to it, from ``suite`` (``bookworm``, ``trixie``, ...); ``run`` are
    shell commands run inside it afterwards, natively with this host's
    network (e.g. ``npm install -g ...``).  Boot it with ``boot(image=...)``
    or use it as a ``provision(base=...)``.
    """
    with _cache_lock() as cache:
        return _build_rootfs_tarball(cache, report, suite, packages, run)


def _base_record(cache: Path) -> Path:
    # What this code builds, as opposed to which package versions it builds from;
    # one record per recipe, so different machinen versions sharing a cache coexist.
    recipe = hashlib.sha256(
        json.dumps([ASSETS_FORMAT, INITRD_MODULES, INIT_SCRIPT, SUITE, ROOTFS_PACKAGES]).encode()
    ).hexdigest()
    return cache / f"base-{recipe[:16]}.json"


def find_base() -> BaseAssets | None:
    """The base assets if they were built here already (builds nothing)."""
    record = _base_record(paths.cache_dir())
    if not record.exists():
        return None
    saved = json.loads(record.read_text())
    base = BaseAssets(
        kernel=Path(saved["kernel"]),
        initrd=Path(saved["initrd"]),
        rootfs_tarball=Path(saved["rootfs_tarball"]),
        kernel_package=saved["kernel_package"],
    )
    return base if base.kernel.exists() and base.initrd.exists() and base.rootfs_tarball.exists() else None


def ensure_base(report: Report = lambda message: None, *, refresh: bool = False) -> BaseAssets:
    """Kernel, initrd and base rootfs tarball, built on first use.

    The result is remembered in ``base-<recipe>.json`` so a boot does not ask
    apt again; ``refresh`` (``machinen install --refresh``) re-resolves the
    packages.  A change to what is built (modules, /init, package list)
    is a new recipe and builds anew.
    """
    with _cache_lock() as cache:
        if not refresh and (found := find_base()) is not None:
            return found
        kernel, initrd, kernel_package = _build_kernel_and_initrd(cache, report)
        base = BaseAssets(kernel, initrd, _build_rootfs_tarball(cache, report), kernel_package)
        _base_record(cache).write_text(json.dumps({k: str(v) for k, v in asdict(base).items()}))
        return base


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node`` but those under ``if TYPE_CHECKING:`` (never imported when it runs)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (grandchild for branch in child.orelse for grandchild in (branch, *_runtime_nodes(branch)))
            continue
        yield child
        yield from _runtime_nodes(child)


def package_imports(module: Path) -> set[Path]:
    """The files of this package that ``module`` (a file in it) imports when it runs, at any depth in the file."""
    package = module.relative_to(PACKAGE_DIR).parent.parts
    found: set[Path] = set()
    for node in _runtime_nodes(ast.parse(module.read_bytes())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = [*package[: len(package) - node.level + 1], *(node.module or "").split(".")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == PACKAGE_DIR.name:
            base = node.module.split(".")[1:]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE_DIR.name:
                    found |= _existing_module(alias.name.split(".")[1:])
            continue
        else:
            continue
        base = [part for part in base if part]
        found |= _existing_module(base)
        for alias in node.names:  # ``from ..protocol import wire`` imports a submodule
            found |= _existing_module([*base, alias.name])
    return found


def _existing_module(parts: list[str]) -> set[Path]:
    as_file = PACKAGE_DIR.joinpath(*parts).with_suffix(".py") if parts else None
    as_package = PACKAGE_DIR.joinpath(*parts, "__init__.py")
    return {path for path in (as_file, as_package) if path is not None and path.is_file()}


_agent_sources_lock = threading.Lock()  # CPython 3.11's ast.parse is not safe in parallel threads


def _agent_sources() -> dict[str, bytes]:
    """Guest-side files: the whole guest package and what it imports from this package
    (found by reading its imports: ``protocol``'s wire and guest ABI today).  Every
    ``__init__.py`` is written empty: the host's would import host modules.  Read once
    per process (boots call it from worker threads, concurrently)."""
    with _agent_sources_lock:
        return dict(_read_agent_sources())


@functools.cache
def _read_agent_sources() -> dict[str, bytes]:
    sources = {"agent_main.py": AGENT_ENTRY.encode()}
    pending = sorted((PACKAGE_DIR / GUEST_PACKAGE).glob("*.py"))
    while pending:
        module = pending.pop()
        relative = module.relative_to(PACKAGE_DIR)
        packages = [PACKAGE_DIR.name, *relative.parent.parts]
        for depth in range(1, len(packages) + 1):
            sources["/".join([*packages[:depth], "__init__.py"])] = b""
        name = f"{PACKAGE_DIR.name}/{relative.as_posix()}"
        if module.name != "__init__.py" and name not in sources:
            sources[name] = module.read_bytes()
            pending += sorted(package_imports(module) - {module})
    return sources


def _digest_memo(path: Path) -> Path:
    stat = path.stat()
    memo_dir = paths.private_dir(paths.private_dir(paths.cache_dir()) / "digests")
    return memo_dir / hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()


def immutable_file_digest(path: Path) -> str:
    """sha256 of a file that is never modified in place (tarballs, cached images, kernels),
    memoised by (path, size, mtime) to skip rehashing."""
    memo = _digest_memo(path)
    if memo.exists():
        return memo.read_text()
    digest = sha256_file(path)
    memo.write_text(digest)
    return digest


def remember_digest(path: Path, digest: str) -> None:
    """Record the sha256 of an immutable file that was just verified."""
    _digest_memo(path).write_text(digest)


def image_key(tarball: Path) -> str:
    """Content identity of the image built from ``tarball`` (and the current agent)."""
    if not tarball.is_file():
        raise BootError(f"image not found: {tarball}", code="BOOT_IMAGE_NOT_FOUND")
    agent = _agent_sources()
    key = hashlib.sha256()
    key.update(f"{ASSETS_FORMAT}|{immutable_file_digest(tarball)}".encode())
    for name in sorted(agent):
        key.update(name.encode() + b"\0" + agent[name] + b"\0")
    return key.hexdigest()[:24]


def is_hex_digest(value: object, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)


def cached_image(key: str) -> Path | None:
    if not is_hex_digest(key, 24):  # keys come from manifests: never let one be a path
        return None
    image = paths.cache_dir() / "images" / f"{key}.ext4"
    return image if image.is_file() else None


def find_boot_file(digest: str) -> Path | None:
    """A kernel or initrd with this sha256: one received from another host, or this
    host's own build (if built already; this builds nothing)."""
    received = cached_object(digest)
    if received is not None:
        return received
    base = find_base()
    own = (base.kernel, base.initrd) if base is not None else ()
    return next((path for path in own if immutable_file_digest(path) == digest), None)


def find_image(key: str, digest: str | None) -> Path | None:
    """The image a bundle was taken on, byte for byte.

    Two builds of one tarball have the same key but not the same bytes
    (mke2fs picks UUIDs, hash seeds and layout), and a disk layer is only
    valid on the exact image below it: so the sha256 decides.  An image
    received from another host lives in ``objects/<sha256>``.  (Bundles from
    before images were hashed only have the key.)
    """
    if digest is None:
        return cached_image(key)
    received = cached_object(digest)
    if received is not None:
        return received
    own = cached_image(key)
    return own if own is not None and immutable_file_digest(own) == digest else None


def objects_dir() -> Path:
    """Kernels, initrds and images received from other hosts, named by their sha256."""
    return paths.private_dir(paths.private_dir(paths.cache_dir()) / "objects")


def cached_object(digest: str) -> Path | None:
    if not is_hex_digest(digest, 64):
        return None
    found = paths.cache_dir() / "objects" / digest
    return found if found.is_file() else None


def images_dir() -> Path:
    return paths.private_dir(paths.private_dir(paths.cache_dir()) / "images")


def image_for(tarball: Path, report: Report = lambda message: None) -> Path:
    """The read-only ext4 image of ``tarball`` plus the current guest agent."""
    key = image_key(tarball)
    with _cache_lock():
        image = images_dir() / f"{key}.ext4"
        if image.exists():
            return image
        with (
            _step(report, f"converting {tarball.name} to an ext4 image"),
            tempfile.TemporaryDirectory(dir=image.parent) as tmp,
        ):
            partial = Path(tmp) / "image.ext4"
            try:
                if not _mke2fs_reads_tarballs():
                    raise AssetsError("mke2fs older than 1.47.1 cannot read a tarball", code="ASSETS_TOOL_MISSING")
                source = _tarball_with_agent(tarball, Path(tmp) / "rootfs.tar")
                _mke2fs(source, partial, used=source.stat().st_size)
            except AssetsError as exc:
                if os.geteuid() != 0:  # unpacking keeps ownership and device nodes only as root
                    raise AssetsError(
                        f"{exc.message.splitlines()[0]}; as a non-root user an image is built only from the "
                        "tarball itself, which needs e2fsprogs >= 1.47.1 (Debian bookworm: from bookworm-backports)",
                        code=exc.code,
                    ) from None
                report(f"unpacking {tarball.name} instead ({exc.message.splitlines()[0]})")
                root = _unpacked_with_agent(tarball, Path(tmp) / "root")
                _mke2fs(root, partial, used=int(_run(["du", "-sb", str(root)], what="measure the rootfs").split()[0]))
            partial.chmod(0o444)
            partial.rename(image)
            immutable_file_digest(image)  # hashed now, while building, rather than at the first snapshot
        return image


@functools.cache
def _mke2fs_reads_tarballs() -> bool:
    """e2fsprogs >= 1.47.1 builds a file system from a tarball (``-d FILE.tar``, via libarchive):
    nothing is unpacked, so ownership and device nodes need no privilege and no time."""
    try:
        banner = subprocess.run([_program("mke2fs"), "-V"], capture_output=True, text=True, check=False).stderr
    except FileNotFoundError:
        return False
    found = re.match(r"mke2fs (\d+)\.(\d+)\.(\d+)", banner)
    return found is not None and tuple(map(int, found.groups())) >= (1, 47, 1)


def _tarball_with_agent(tarball: Path, out: Path) -> Path:
    """``tarball`` (decompressed) with the agent's files appended (a later entry wins in mke2fs)."""
    with open(tarball, "rb") as source:
        magic = source.read(6)
    if magic.startswith(b"\x28\xb5\x2f\xfd"):  # zstd: the CLI, as tar itself would use
        with open(out, "wb") as target:
            if subprocess.run(["zstd", "-dc", str(tarball)], stdout=target, check=False).returncode != 0:
                raise AssetsError(f"cannot decompress {tarball}", code="ASSETS_BUILD_FAILED")
    elif magic.startswith((b"\x1f\x8b", b"\xfd7zXZ")):
        opener = gzip.open if magic.startswith(b"\x1f\x8b") else lzma.open
        with opener(tarball, "rb") as source, open(out, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
    else:
        shutil.copyfile(tarball, out)
    try:
        with tarfile.open(out, "a") as tar:
            made: set[str] = set()
            for name, content in sorted(_agent_sources().items()):
                path = f"{GUEST_LIB}/{name}"
                parents = path.split("/")[:-1]
                for depth in range(1, len(parents) + 1):  # mke2fs wants each directory before its entries
                    directory = "/".join(parents[:depth])
                    if directory not in made:
                        made.add(directory)
                        entry = tarfile.TarInfo(f"./{directory}")
                        entry.type, entry.mode = tarfile.DIRTYPE, 0o755
                        tar.addfile(entry)
                entry = tarfile.TarInfo(f"./{path}")
                entry.size, entry.mode = len(content), 0o644
                tar.addfile(entry, io.BytesIO(content))
    except (tarfile.TarError, OSError) as exc:
        raise AssetsError(
            f"{tarball} is not a tarball machinen can add to: {exc}", code="ASSETS_BUILD_FAILED"
        ) from None
    return out


def _unpacked_with_agent(tarball: Path, root: Path) -> Path:
    """``tarball`` unpacked (as root: ownership and device nodes) with the agent's files added."""
    root.mkdir()
    _run(
        ["tar", "-C", str(root), "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", str(tarball)],
        what="unpack rootfs",
    )
    parts = GUEST_LIB.split("/")
    for depth in range(1, len(parts) + 1):  # an image's link there would lead these writes onto the host
        if (root / "/".join(parts[:depth])).is_symlink():
            raise AssetsError(f"the image's /{'/'.join(parts[:depth])} is a symlink", code="ASSETS_BUILD_FAILED")
    for name, content in _agent_sources().items():
        target = root / GUEST_LIB / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return root


def _mke2fs(source: Path, image: Path, *, used: int) -> None:
    size_gib = max(MIN_IMAGE_GIB, -(-used * 3 // 2 // 2**30) + 1)  # room to grow; sparse anyway
    _run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(source), "-L", "machinen-root", str(image), f"{size_gib}G"],
        what="mke2fs",
        env={**os.environ, "LANG": "C.UTF-8"},  # libarchive needs a UTF-8 locale for non-ASCII names
    )
