"""OCI images (issue 25): pull + flatten + ext4, boot, cached second boot; compared inside one run
(this machine is noisy).

    python benchmarks/images.py [--reps 2] [--boots 3] [--prepares 5] [--workdir DIR] [--profile]

Setup (not timed): a multi-layer image built from this host's files (gzip, as ``docker push``
sends them): an "os" layer (coreutils, dash, bash, ... with the libraries they load, a
/etc/passwd, usr/share/locale), a "runtime" layer (Python's and Perl's libraries, git-core,
vim's runtime), an "app" layer (postgresql, icons, i18n) and an upper layer with whiteouts (whole
directories and single files), an opaque directory, replaced files and a hard link; pushed to
Debian's ``docker-registry`` on 127.0.0.1 (tests/oci_registry.py).  Nothing here connects anywhere
but that loopback registry: the VMs boot with ``network=False``.

Prints one JSON object:

- pull_to_ext4: from an empty machinen OCI cache (a fresh ``$MACHINEN_CACHE_DIR`` holding only the
  base assets' record, which points at the kernel and base rootfs already built in the usual
  cache, and the /.machinen runtime already made from that base: both are built once per host,
  not per image) to the image's ext4 disk, i.e. what ``boot(REF)`` does before starting QEMU:
  ``oci_pull.pull`` + ``oci_image.rootfs_tarball`` + ``assets.image_for``; vs ``skopeo copy
  docker://... oci:DIR:TAG`` + ``umoci unpack`` + ``du -sb`` + ``mke2fs -d`` of the unpacked rootfs
  (same size rule and flags as ours).  Alternating repetitions (``sync`` before each), medians,
  ratio ours / theirs (goal <= 1.2), and each side's phases (ours: pull, flatten's decompress /
  read+apply / write passes, appending the runtime, hashing, tar -x, du, mke2fs).
- boot: boot() -> first ``exec true`` answered, the image's VM vs the base's (``boot()`` with no
  image), both disks built before, alternating, medians, ratio (goal <= 1.2).  A VM boot of a
  cached reference includes its prepare step (below), as a user sees it.
- cached_prepare: the prepare step of a second boot of the same reference (``ensure_base`` +
  pull with policy "missing" + ``rootfs_tarball`` + ``image_for``, as ``boot()`` runs it): its
  time, the registry's access-log lines and the connections oci_pull opened meanwhile (both 0),
  flatten calls (0), the rootfs tarball's and ext4's mtimes (unchanged); then again with the
  registry stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gzip
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from oci_registry import Registry, image_config, push_image

from machinen_async import boot
from machinen_async.store import assets, guest_runtime, oci_flatten, oci_image, oci_pull, paths
from machinen_async.vmm import backend

NAME, TAG = "bench/big", "1"
GOAL = 1.2
OS_PACKAGES = ("coreutils", "dash", "bash", "grep", "sed", "findutils", "gzip", "tar")
LAYERS = {  # name -> host directories (besides what each builder adds)
    "os": ("usr/share/locale",),
    "runtime": ("usr/lib/python3.11", "usr/lib/python3", "usr/lib/git-core", "usr/share/perl", "usr/share/vim"),
    "app": ("usr/lib/postgresql", "usr/share/icons", "usr/share/i18n"),
}
ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "APP_MODE=bench")


def r(seconds: float) -> float:
    return round(seconds, 3)


# --- the image ---------------------------------------------------------------------------------


class LayerWriter:
    """A gzip (level 6, as docker/buildkit) PAX tar layer of host files, parents listed first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.gz = gzip.GzipFile(path, "wb", compresslevel=6, mtime=0)
        self.tar = tarfile.open(fileobj=self.gz, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.listed: set[str] = set()

    def parents(self, rel: str) -> None:
        parts = rel.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            parent = "/".join(parts[:depth])
            if parent not in self.listed:
                self.listed.add(parent)
                host = Path("/") / parent
                info = self.tar.gettarinfo(str(host), parent) if host.is_dir() and not host.is_symlink() else None
                if info is None:
                    info = tarfile.TarInfo(parent)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                self.tar.addfile(info)

    def host(self, rel: str, *, recursive: bool = True) -> None:
        """``/rel`` of this host at ``rel`` (symlinks kept, hard links as links)."""
        if rel in self.listed or not os.path.lexists("/" + rel):
            return
        self.parents(rel)
        self.listed.add(rel)
        self.tar.add("/" + rel, arcname=rel, recursive=recursive)

    def synthetic(self, rel: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *, mode: int = 0o644,
                  linkname: str = "") -> None:  # fmt: skip
        self.parents(rel)
        self.listed.add(rel)
        info = tarfile.TarInfo(rel)
        info.type, info.mode, info.linkname, info.mtime = kind, mode, linkname, 1_700_000_000
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        self.tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    def close(self) -> dict:
        members = len(self.tar.getmembers())
        self.tar.close()
        self.gz.close()
        return {"file": self.path.name, "members": members, "compressed_bytes": self.path.stat().st_size}


def _usr_path(path: str) -> str | None:
    """A host path as the merged-/usr path it is (``/bin/dash`` -> ``usr/bin/dash``), keeping the
    last component (a symlink stays one)."""
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    return real.lstrip("/") if real.startswith("/usr/") else None


def _os_layer(layer: LayerWriter) -> None:
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        layer.synthetic(link, tarfile.SYMTYPE, linkname=target, mode=0o777)
    for directory, mode in (("tmp", 0o1777), ("root", 0o700), ("home", 0o755), ("var/tmp", 0o1777)):
        layer.synthetic(directory, tarfile.DIRTYPE, mode=mode)
    layer.synthetic("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    layer.synthetic("etc/group", data=b"root:x:0:\napp:x:1000:\n")
    listed = subprocess.run(["dpkg", "-L", *OS_PACKAGES], capture_output=True, text=True, check=True).stdout.split()
    binaries = {p for p in listed if p.startswith(("/bin/", "/sbin/", "/usr/bin/", "/usr/sbin/")) and os.path.isfile(p)}
    binaries |= {p for p in ("/usr/bin/sh", "/bin/sh") if os.path.lexists(p)}
    libraries: set[str] = {"/usr/lib64/ld-linux-x86-64.so.2", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"}
    for binary in sorted(binaries):
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
        libraries |= {word for word in out.split() if word.startswith("/")}
    for path in sorted(binaries | libraries):
        for candidate in (path, os.path.realpath(path)):
            rel = _usr_path(candidate)
            if rel is not None:
                layer.host(rel)


def _upper_layer(layer: LayerWriter) -> dict:
    """Whiteouts of whole directories and files of the layers below, an opaque directory, replaced
    files, a hard link: what the image's flattening must apply."""
    locales = sorted(p.name for p in Path("/usr/share/locale").iterdir() if p.is_dir())[:6]
    python_files = sorted(p.name for p in Path("/usr/lib/python3.11").glob("*.py"))[:10]
    vim = sorted(p for p in Path("/usr/share/vim").rglob("*") if p.is_dir() and not p.is_symlink())
    opaque = next((p for p in vim if p.name == "doc"), vim[0] if vim else None)
    whiteouts = [f"usr/share/locale/.wh.{name}" for name in locales]
    whiteouts += [f"usr/lib/python3.11/.wh.{name}" for name in python_files]
    whiteouts += ["usr/lib/git-core/.wh.mergetools"] if Path("/usr/lib/git-core/mergetools").exists() else []
    for name in whiteouts:
        layer.synthetic(name, data=b"")
    if opaque is not None:
        rel = str(opaque).lstrip("/")
        layer.synthetic(rel, tarfile.DIRTYPE, mode=0o755)
        layer.synthetic(f"{rel}/.wh..wh..opq", data=b"")
        layer.synthetic(f"{rel}/README.bench", data=b"the only file left in this directory\n")
    layer.synthetic("usr/lib/python3.11/this.py", data=b"print('replaced by the upper layer')\n")
    layer.synthetic("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/bash\n")
    layer.synthetic("app/config.json", data=json.dumps({"bench": True}).encode())
    layer.synthetic("app/config.link", tarfile.LNKTYPE, linkname="app/config.json")
    return {"whiteouts": len(whiteouts), "opaque_dir": None if opaque is None else str(opaque)}


def build_image(directory: Path) -> tuple[list[bytes], dict]:
    directory.mkdir(parents=True, exist_ok=True)
    described, layers = [], []
    extra: dict = {}
    for index, name in enumerate([*LAYERS, "upper"]):
        layer = LayerWriter(directory / f"{index}-{name}.tar.gz")
        if name == "os":
            _os_layer(layer)
        if name == "upper":
            extra = _upper_layer(layer)
        for rel in LAYERS.get(name, ()):
            layer.host(rel)
        described.append({"name": name, **layer.close()})
        layers.append(layer.path.read_bytes())
    return layers, {
        "layers": described,
        "compressed_mb": round(sum(len(b) for b in layers) / 1e6, 1),
        "uncompressed_mb": round(sum(len(gzip.decompress(b)) for b in layers) / 1e6, 1),
        **extra,
    }


# --- phases: time what the library calls, without changing it -------------------------------------


class Phases:
    """Wraps module attributes with timers: per label, the summed time of the calls, their
    wall-clock span union (parallel threads), and their count."""

    def __init__(self) -> None:
        self.spans: dict[str, list[tuple[float, float]]] = {}
        self.lock = threading.Lock()
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: object, attribute: str, label: Callable[..., str] | str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                name = label(*args, **kwargs) if callable(label) else label
                with self.lock:
                    self.spans.setdefault(name, []).append((started, time.perf_counter()))

        setattr(owner, attribute, timed)
        self._undo.append(lambda: setattr(owner, attribute, original))

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()

    def reset(self) -> None:
        self.spans = {}

    def count(self, label: str) -> int:
        return len(self.spans.get(label, []))

    def summary(self) -> dict[str, dict]:
        out = {}
        for name, spans in sorted(self.spans.items()):
            ordered, wall, end = sorted(spans), 0.0, float("-inf")
            for start, stop in ordered:
                if stop > end:
                    wall += stop - max(start, end)
                    end = stop
            out[name] = {"wall_s": r(wall), "sum_s": r(sum(b - a for a, b in spans)), "calls": len(spans)}
        return out


def instrument() -> Phases:
    phases = Phases()
    phases.wrap(oci_pull, "pull", "pull")
    phases.wrap(oci_pull, "_connect", "pull.http_connections")
    phases.wrap(oci_image, "rootfs_tarball", "rootfs_tarball")
    phases.wrap(oci_flatten, "flatten", "rootfs_tarball.flatten")
    phases.wrap(oci_flatten, "_uncompressed", "rootfs_tarball.flatten.decompress")
    phases.wrap(oci_flatten, "_read_layer", "rootfs_tarball.flatten.read_headers")
    phases.wrap(oci_flatten._Tree, "apply", "rootfs_tarball.flatten.apply")
    phases.wrap(oci_flatten, "_write", "rootfs_tarball.flatten.write")
    phases.wrap(guest_runtime, "runtime_for", "rootfs_tarball.runtime_for")
    phases.wrap(assets, "image_for", "image_for")
    phases.wrap(
        assets,
        "sha256_file",
        lambda path: (
            f"image_for.sha256 {'ext4' if str(path).endswith('.ext4') else Path(path).suffix.lstrip('.') or Path(path).name}"
        ),
    )
    phases.wrap(assets, "_run", lambda argv, **kw: f"image_for.run {kw.get('what', argv[0])}")
    phases.wrap(assets, "_agent_sources", "image_for.agent_sources")
    return phases


# --- caches --------------------------------------------------------------------------------------


def fresh_cache(root: Path, base_record: Path, runtime: Path) -> Path:
    """A new, empty ``$MACHINEN_CACHE_DIR`` that knows the base assets (their record points at the
    usual cache) and holds the /.machinen runtime made from that base (hard links): so nothing of
    the base is rebuilt and nothing of any image is there."""
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=root))
    cache.chmod(0o700)
    shutil.copy2(base_record, cache / base_record.name)
    runtime_parent = paths.private_dir(cache / "runtime")
    shutil.copytree(runtime, runtime_parent / runtime.name, symlinks=True, copy_function=os.link)
    os.environ["MACHINEN_CACHE_DIR"] = str(cache)
    base = assets.ensure_base()
    # The base tarball's digest memo (per cache): hashed here, once, as on any host's first boot.
    found = guest_runtime.runtime_for(base.rootfs_tarball)
    assert found == runtime_parent / runtime.name, (found, runtime)
    return cache


def allocated(path: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in ([path] if path.is_file() else path.rglob("*")))


def ours(reference: str, phases: Phases) -> tuple[float, dict, dict]:
    phases.reset()
    subprocess.run(["sync"], check=True)
    started = time.perf_counter()
    pulled = oci_pull.pull(reference)
    tarball = oci_image.rootfs_tarball(pulled)
    image = assets.image_for(tarball)
    seconds = time.perf_counter() - started
    summary = phases.summary()
    wall = {name: value["wall_s"] for name, value in summary.items()}
    # What the wrapped calls do not cover, by difference: appending /.machinen and the exec
    # defaults to the flattened tar (tarfile reads every header back, then adds the runtime);
    # image_for's agent files, temp-tree removal (rmtree of the unpacked rootfs) and lock.
    summary["rootfs_tarball.append_runtime_and_defaults"] = {
        "wall_s": r(wall.get("rootfs_tarball", 0) - wall.get("rootfs_tarball.flatten", 0))
    }
    runs = ("image_for.run unpack rootfs", "image_for.run measure the rootfs", "image_for.run mke2fs")
    covered = sum(wall.get(name, 0) for name in runs) + sum(v for k, v in wall.items() if k.startswith("image_for.sha"))
    summary["image_for.other (agent files, rmtree of the unpacked tree)"] = {
        "wall_s": r(wall.get("image_for", 0) - covered)
    }
    summary["total"] = {"wall_s": r(seconds)}
    outputs = {"rootfs_tar_mb": round(tarball.stat().st_size / 1e6, 1),
               "ext4_allocated_mb": round(allocated(image) / 1e6, 1)}  # fmt: skip
    return seconds, summary, outputs


def theirs(reference: str, work: Path) -> tuple[float, dict, dict]:
    layout, bundle, image = work / "layout", work / "bundle", work / "image.ext4"
    policy = work / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    steps: dict[str, float] = {}

    def run(name: str, argv: list[str]) -> str:
        started = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        steps[name] = r(time.perf_counter() - started)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr[-2000:]}")
        return out.stdout

    subprocess.run(["sync"], check=True)
    started = time.perf_counter()
    run("skopeo_copy", ["skopeo", "--policy", str(policy), "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{reference}", f"oci:{layout}:{TAG}"])  # fmt: skip
    run("umoci_unpack", ["umoci", "unpack", "--image", f"{layout}:{TAG}", str(bundle)])
    used = int(run("du", ["du", "-sb", str(bundle / "rootfs")]).split()[0])
    size_gib = max(assets.MIN_IMAGE_GIB, -(-used * 3 // 2 // 2**30) + 1)  # assets.image_for's rule
    run("mke2fs", ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(bundle / "rootfs"), "-L", "bench", str(image),
                   f"{size_gib}G"])  # fmt: skip
    seconds = time.perf_counter() - started
    outputs = {"rootfs_mb": round(used / 1e6, 1), "ext4_allocated_mb": round(allocated(image) / 1e6, 1)}
    return seconds, steps, outputs


def tool_versions() -> dict:
    found = {}
    for tool, flag in (("skopeo", "--version"), ("umoci", "--version")):
        path = shutil.which(tool)
        found[tool] = (
            subprocess.run([path, flag], capture_output=True, text=True, check=False).stdout.strip()
            if path
            else f"MISSING: apt-get install {tool} (Debian bookworm has it)"
        )
    return found


# --- part 1 -------------------------------------------------------------------------------------


def pull_to_ext4(
    args, root: Path, reference: str, base_record: Path, runtime: Path, phases: Phases
) -> tuple[dict, Path]:
    tools = tool_versions()
    missing = [tool for tool, version in tools.items() if version.startswith("MISSING")]
    runs: dict[str, list] = {"ours": [], "theirs": []}
    last_cache = None
    for rep in range(args.reps):
        order = ["ours", "theirs"] if rep % 2 == 0 else ["theirs", "ours"]
        for side in order:
            if side == "theirs" and missing:
                continue
            if side == "ours":
                if last_cache is not None:
                    shutil.rmtree(last_cache)
                last_cache = fresh_cache(root, base_record, runtime)
                runs["ours"].append(ours(reference, phases))
                say(f"rep {rep}: ours {runs['ours'][-1][0]:.1f} s")
            else:
                work = Path(tempfile.mkdtemp(prefix="theirs-", dir=root))
                try:
                    runs["theirs"].append(theirs(reference, work))
                    say(f"rep {rep}: theirs {runs['theirs'][-1][0]:.1f} s")
                finally:
                    shutil.rmtree(work)
    ours_s = [s for s, _, _ in runs["ours"]]
    theirs_s = [s for s, _, _ in runs["theirs"]]
    result = {
        "tools": tools,
        "ours_includes": "oci_pull.pull (manifest, config, layers over HTTP, 3 in parallel, each sha256-checked"
        " into the cache) + oci_image.rootfs_tarball (flatten to one tar, append /.machinen runtime,"
        " root dirs, exec defaults) + assets.image_for (sha256 of the rootfs tar for the image key, a copy"
        " of it with the agent appended and mke2fs -d of that tar where e2fsprogs >= 1.47.1, else tar -x,"
        " agent files, du -sb and mke2fs -d of the tree; sha256 of the ext4); the base's kernel/rootfs and the"
        " /.machinen runtime already built (once per host)",
        "theirs_includes": "skopeo copy docker://REF oci:DIR:TAG (layers stored as pulled, digests checked)"
        " + umoci unpack (decompress, apply whiteouts, write rootfs + config.json + mtree manifest)"
        " + du -sb + mke2fs -d of the rootfs (same size rule and flags)",
        "ours_s": [r(s) for s in ours_s],
        "theirs_s": [r(s) for s in theirs_s],
        "ours_s_median": r(statistics.median(ours_s)),
        "theirs_s_median": r(statistics.median(theirs_s)) if theirs_s else None,
        "ratio_ours_over_theirs": round(statistics.median(ours_s) / statistics.median(theirs_s), 2)
        if theirs_s
        else None,
        "per_rep_ratios": [round(a / b, 2) for a, b in zip(ours_s, theirs_s)],
        "goal": GOAL,
        "ours_phases": [summary for _, summary, _ in runs["ours"]],
        "theirs_phases_s": [steps for _, steps, _ in runs["theirs"]],
        "ours_outputs": runs["ours"][-1][2],
        "theirs_outputs": runs["theirs"][-1][2] if theirs_s else None,
    }
    if theirs_s:
        result["goal_met"] = result["ratio_ours_over_theirs"] <= GOAL
    else:
        result["theirs_missing"] = missing
    if args.profile:
        shutil.rmtree(last_cache)
        last_cache = fresh_cache(root, base_record, runtime)
        profiler = cProfile.Profile()
        profiler.enable()
        ours(reference, phases)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
        result["ours_profile_main_thread_top20_tottime"] = [
            line.strip() for line in text.getvalue().splitlines() if line.strip() and line.strip()[0].isdigit()
        ]
    return result, last_cache


# --- part 3 -------------------------------------------------------------------------------------


def prepare(reference: str) -> tuple[Path, Path]:
    """What boot(REF) runs before QEMU (sdk/boot.py's prepare)."""
    assets.ensure_base()
    tarball = oci_image.rootfs_of(reference).tarball
    return tarball, assets.image_for(tarball)


def registry_requests(registry: Registry) -> int:
    return sum(1 for line in registry.log_path.read_text(errors="replace").splitlines() if "/v2/" in line)


def cached_prepare(args, registry: Registry, reference: str, phases: Phases) -> dict:
    tarball, image = prepare(reference)  # built already: this only finds them
    before = {"tarball_mtime_ns": tarball.stat().st_mtime_ns, "ext4_mtime_ns": image.stat().st_mtime_ns}
    requests_before = registry_requests(registry)
    phases.reset()
    seconds = []
    for _ in range(args.prepares):
        started = time.perf_counter()
        found = prepare(reference)
        seconds.append(time.perf_counter() - started)
        assert found == (tarball, image), found
    time.sleep(0.5)  # the access log is written asynchronously
    requests_during = registry_requests(registry) - requests_before
    counts = {"http_connections": phases.count("pull.http_connections"),
              "flatten_calls": phases.count("rootfs_tarball.flatten"),
              "mke2fs_calls": phases.count("image_for.run mke2fs")}  # fmt: skip
    summary = phases.summary()
    registry.stop()
    stopped = []
    for _ in range(args.prepares):
        started = time.perf_counter()
        assert prepare(reference) == (tarball, image)
        stopped.append(time.perf_counter() - started)
    after = {"tarball_mtime_ns": tarball.stat().st_mtime_ns, "ext4_mtime_ns": image.stat().st_mtime_ns}
    return {
        "prepare_s": [r(s) for s in seconds],
        "prepare_s_median": r(statistics.median(seconds)),
        "registry_access_log_requests_during": requests_during,
        **counts,
        "phases": summary,
        "registry_stopped_prepare_s": [r(s) for s in stopped],
        "registry_stopped_prepare_s_median": r(statistics.median(stopped)),
        "rootfs_tarball_mtime_unchanged": before["tarball_mtime_ns"] == after["tarball_mtime_ns"],
        "ext4_mtime_unchanged": before["ext4_mtime_ns"] == after["ext4_mtime_ns"],
    }


# --- part 2 -------------------------------------------------------------------------------------


async def boot_to_exec(image: str | None) -> float:
    started = time.perf_counter()
    async with boot(image, network=False, warm=False) as vm:
        await vm.exec(["true"], check=True)
        return time.perf_counter() - started


async def boots(args, reference: str) -> dict:
    warmup = {"base_s": r(await boot_to_exec(None)), "image_s": r(await boot_to_exec(reference))}
    times: dict[str, list[float]] = {"base": [], "image": []}
    for rep in range(args.boots):
        for kind in ["base", "image"] if rep % 2 == 0 else ["image", "base"]:
            times[kind].append(await boot_to_exec(reference if kind == "image" else None))
    async with boot(reference, network=False, warm=False) as vm:  # the image's own files, its config applied
        probe = await vm.exec(["sh", "-c", "echo $APP_MODE; pwd; ls /usr/share/locale | wc -l; cat /app/config.json"],
                              check=True)  # fmt: skip
    base_median, image_median = statistics.median(times["base"]), statistics.median(times["image"])
    return {
        "warmup_s": warmup,
        "base_s": [r(s) for s in times["base"]],
        "image_s": [r(s) for s in times["image"]],
        "base_s_median": r(base_median),
        "image_s_median": r(image_median),
        "ratio_image_over_base": round(image_median / base_median, 2),
        "goal": GOAL,
        "goal_met": image_median / base_median <= GOAL,
        "image_probe": probe.stdout.decode().split("\n")[:4],
    }


# --- main ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def workspace(path: str | None) -> Iterator[Path]:
    parent = Path(path or "/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="images-bench-", dir=parent) as tmp:
        yield Path(tmp)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> None:
    result: dict = {
        "benchmark": "images",
        "date": time.strftime("%Y-%m-%d"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "accel": backend.default().choose_accelerator(None),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    setup: dict[str, float] = {}
    saved_env = {key: os.environ.get(key) for key in ("MACHINEN_CACHE_DIR", "MACHINEN_HOME")}
    with workspace(args.workdir) as root:
        root.chmod(0o700)
        started = time.perf_counter()
        base = assets.ensure_base()  # the usual cache: built there once, never in a measured part
        base_record = assets._base_record(paths.cache_dir())
        runtime = guest_runtime.runtime_for(base.rootfs_tarball)
        base_ext4 = paths.cache_dir() / "images" / f"{assets.image_key(base.rootfs_tarball)}.ext4"
        setup["base_assets_s"] = r(time.perf_counter() - started)
        os.environ["MACHINEN_HOME"] = str(root / "home")

        started = time.perf_counter()
        layers, described = build_image(root / "layers")
        setup["build_layers_s"] = r(time.perf_counter() - started)
        result["image"] = described
        say(f"layers built: {described['compressed_mb']} MB compressed")
        registry = Registry(root / "registry")
        try:
            started = time.perf_counter()
            config = image_config(layers, env=ENV, workdir="/app", cmd=("sh",))
            pushed = push_image(registry, NAME, TAG, layers, config)
            setup["push_s"] = r(time.perf_counter() - started)
            reference = f"{registry.host}/{NAME}:{TAG}"
            result["image"]["reference"] = f"127.0.0.1:<port>/{NAME}:{TAG}"
            result["image"]["manifest_digest"] = pushed.digest

            phases = instrument()
            try:
                result["pull_to_ext4"], cache = pull_to_ext4(args, root, reference, base_record, runtime, phases)
                # Boots below use this cache (the image's disk built above): the base's disk too.
                started = time.perf_counter()
                base_here = paths.private_dir(cache / "images") / base_ext4.name
                if base_ext4.is_file():
                    os.link(base_ext4, base_here)
                assets.image_for(base.rootfs_tarball)
                setup["base_disk_s"] = r(time.perf_counter() - started)
                say("cached prepare")
                result["cached_prepare"] = cached_prepare(args, registry, reference, phases)  # stops the registry
            finally:
                phases.restore()
        finally:
            registry.stop()
        say("boots")
        result["boot"] = anyio.run(boots, args, reference)
        result["setup_s"] = setup
        result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2, help="alternating pull+flatten+ext4 runs per side")
    parser.add_argument("--boots", type=int, default=3, help="alternating boots per image (after one warm-up each)")
    parser.add_argument("--prepares", type=int, default=5, help="cached prepare steps timed (twice: registry up, down)")
    parser.add_argument("--workdir", help="where the layers, registry and caches go (default: a temp dir in /var/tmp)")
    parser.add_argument("--profile", action="store_true", help="also cProfile one more run of ours (main thread)")
    main(parser.parse_args())
