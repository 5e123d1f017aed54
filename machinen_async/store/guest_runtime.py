"""The interpreter the guest agent runs on in images that bring none: ``RUNTIME_DIR`` (``/.machinen``).

An OCI image may have no Python, another libc (musl) or no libc at all (a
static Go binary, busybox), so the agent cannot use what the image has.  It
runs on the base rootfs's own CPython (the one it runs on in the Debian base),
copied with its standard library, msgpack and every shared library they load
(the closure ``ld.so --list`` reports), the executable patched (``patchelf``:
interpreter ``/.machinen/lib/ld-linux-x86-64.so.2``, ``DT_RPATH``
``/.machinen/lib``, which glibc also applies to the extension modules it
loads) so nothing of the image's ``/lib`` is used.  The image's commands
never see it unless they look: the agent execs them with the image's
environment.  CPython finds its prefix from where the executable is
(``/.machinen/lib/python3.11/os.py``), so no environment variable is needed.

Built once per base rootfs into the cache, read-only; blocking (call from a thread).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import AssetsError
from ..protocol.guest_abi import RUNTIME_DIR
from . import assets, paths

RUNTIME_FORMAT = 1
PYTHON = "python3.11"
LOADER = "ld-linux-x86-64.so.2"
LIB_DIR = "usr/lib/x86_64-linux-gnu"
# Parts of the standard library the agent never imports: ~half of its size.
STDLIB_LEFT_OUT = ("test", "idlelib", "tkinter", "ensurepip", "lib2to3", "pydoc_data", "turtledemo",
                   "config-3.11-x86_64-linux-gnu", "distutils")  # fmt: skip
_LISTED_LIBRARY = re.compile(r"^\s*(\S+) => (\S+) \(0x[0-9a-f]+\)$", re.MULTILINE)


def runtime_for(rootfs_tarball: Path) -> Path:
    """The runtime tree (a directory to place at ``/.machinen``) made from the base rootfs
    ``rootfs_tarball``."""
    key = hashlib.sha256(f"{RUNTIME_FORMAT}|{assets.immutable_file_digest(rootfs_tarball)}".encode()).hexdigest()[:24]
    built = paths.private_dir(paths.private_dir(paths.cache_dir()) / "runtime") / key
    if built.is_dir():
        return built
    with tempfile.TemporaryDirectory(dir=built.parent) as tmp:
        source, tree = Path(tmp) / "source", Path(tmp) / "tree"
        source.mkdir()
        members = [
            f"./usr/bin/{PYTHON}",
            f"./usr/lib/{PYTHON}",
            "./usr/lib/python3/dist-packages/msgpack",
            f"./{LIB_DIR}",
        ]
        assets._run(
            ["tar", "-C", str(source), "-xf", str(rootfs_tarball), *members], what="unpack the base interpreter"
        )
        lib = tree / "lib"
        shutil.copytree(source / "usr/lib" / PYTHON, lib / PYTHON, symlinks=True,
                        ignore=lambda directory, names: [n for n in names if n in STDLIB_LEFT_OUT])  # fmt: skip
        shutil.copytree(source / "usr/lib/python3/dist-packages/msgpack", lib / "python3/dist-packages/msgpack")
        (tree / "bin").mkdir()
        shutil.copy2(source / "usr/bin" / PYTHON, tree / "bin" / PYTHON)
        os.symlink(PYTHON, tree / "bin" / "python3")
        elves = [tree / "bin" / PYTHON, *lib.rglob("*.so")]
        for name, found in _library_closure(source, elves).items():
            shutil.copy2(found, lib / name)  # the loader among them
        for elf in [tree / "bin" / PYTHON, *lib.glob("*.so*")]:
            if elf.name != LOADER:
                assets._run(["patchelf", "--force-rpath", "--set-rpath", f"{RUNTIME_DIR}/lib", str(elf)],
                    what="patchelf")  # fmt: skip
        assets._run(["patchelf", "--set-interpreter", f"{RUNTIME_DIR}/lib/{LOADER}", str(tree / "bin" / PYTHON)],
            what="patchelf")  # fmt: skip
        try:
            tree.rename(built)
        except OSError:
            if not built.is_dir():
                raise  # else another process built it meanwhile: the same tree
    return built


def _library_closure(source: Path, elves: list[Path]) -> dict[str, Path]:
    """soname -> file in ``source`` for every shared library ``elves`` load, at any depth,
    as the base's own loader resolves them (only inside ``source``)."""
    loader, library_path = source / LIB_DIR / LOADER, source / LIB_DIR
    found: dict[str, Path] = {}
    for elf in elves:
        listed = assets._run(
            [str(loader), "--list", "--library-path", str(library_path), str(elf)], what="ld.so --list"
        )
        for name, path in _LISTED_LIBRARY.findall(listed):
            resolved = Path(path).resolve()
            if not resolved.is_relative_to(source.resolve()):
                raise AssetsError(f"{elf.name} needs {name}, which the base rootfs lacks", code="ASSETS_BUILD_FAILED")
            # The loader is listed by its absolute path (/lib64/...): by file name only, always.
            found[Path(name).name] = resolved
    return found
