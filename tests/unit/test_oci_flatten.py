"""store/oci_flatten.py: OCI layers applied as runtimes do, written as one tar (no VM).

Every output is read back three ways: Python's tarfile, GNU tar (extracted as root and compared
with what the tar says, file by file) and libarchive (what ``mke2fs -d tarball`` reads), which
must report no warning.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from machinen_async.errors import ImageError
from machinen_async.store import oci_flatten
from machinen_async.store.oci_flatten import flatten

TAR = "application/vnd.oci.image.layer.v1.tar"
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MTIME = 1_700_000_000
# security.capability v2: cap_net_bind_service (bit 10) + cap_setuid (bit 7, a byte > 0x7f) permitted
CAPABILITY = bytes([1, 0, 0, 2, 0x80, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])


# ---------------------------------------------------------------------------- building layers


def reg(name: str, data: bytes = b"", *, mode=0o644, uid=0, gid=0, mtime=MTIME, xattrs=None, pax=None):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid, info.mtime = len(data), mode, uid, gid, mtime
    info.pax_headers = dict(pax or {})
    for key, value in (xattrs or {}).items():
        info.pax_headers[f"SCHILY.xattr.{key}"] = value.decode("utf-8", "surrogateescape")
    return info, data


def special(name: str, kind: bytes, *, linkname="", mode=0o755, uid=0, gid=0, mtime=MTIME, dev=(0, 0), xattrs=None):
    info, _ = reg(name, mode=mode, uid=uid, gid=gid, mtime=mtime, xattrs=xattrs)
    info.type, info.linkname, (info.devmajor, info.devminor) = kind, linkname, dev
    return info, None


def dirent(name: str, **kwargs):
    return special(name, tarfile.DIRTYPE, **kwargs)


def symlink(name: str, target: str, **kwargs):
    return special(name, tarfile.SYMTYPE, linkname=target, mode=0o777, **kwargs)


def hardlink(name: str, target: str, **kwargs):
    kwargs.setdefault("mode", 0o644)
    return special(name, tarfile.LNKTYPE, linkname=target, **kwargs)


def whiteout(path: str):
    parent, _, base = path.rpartition("/")
    return reg(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opaque(directory: str):
    return reg(f"{directory}/.wh..wh..opq")


def tar_bytes(members) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def blob(directory: Path, content: bytes) -> Path:
    """Stored as registries store blobs: named by digest."""
    path = directory / hashlib.sha256(content).hexdigest()
    path.write_bytes(content)
    return path


def layer(directory: Path, members, compression: str | None = "gzip") -> tuple[Path, str]:
    raw = tar_bytes(members)
    if compression == "gzip":
        return blob(directory, gzip.compress(raw, mtime=0)), GZIP
    if compression == "zstd":
        return blob(
            directory, subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout
        ), ZSTD
    return blob(directory, raw), TAR


@pytest.fixture
def blobs(tmp_path: Path) -> Path:
    (tmp_path / "blobs").mkdir()
    return tmp_path / "blobs"


@pytest.fixture
def out(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out" / "rootfs.tar"


# ---------------------------------------------------------------------------- reading the output


def tar_view(path: Path) -> dict[str, dict]:
    """path ("" for the root) -> what the tar says, checking the order as it goes."""
    view: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            name = member.name
            assert name == "." or name.startswith("./"), name
            key = "" if name == "." else name[2:]
            assert key not in view, f"{key} twice"
            if key:
                assert key.rpartition("/")[0] in view, f"{key} before its parent"
                assert view[key.rpartition("/")[0]]["kind"] == "dir"
            entry = {
                "mode": member.mode,
                "uid": member.uid,
                "gid": member.gid,
                "mtime": member.mtime,
                "uname": member.uname,
                "xattrs": {
                    k.removeprefix("SCHILY.xattr."): v.encode("utf-8", "surrogateescape")
                    for k, v in member.pax_headers.items()
                    if k.startswith("SCHILY.xattr.")
                },
            }
            if member.isdir():
                entry["kind"] = "dir"
            elif member.islnk():
                assert member.linkname.startswith("./")
                target = member.linkname[2:]
                assert target in view and view[target]["kind"] != "link", f"{key}: link before {target}"
                entry.update(kind="link", target=target)
            elif member.issym():
                entry.update(kind="symlink", target=member.linkname)
            elif member.ischr() or member.isblk():
                entry.update(kind="chr" if member.ischr() else "blk", dev=(member.devmajor, member.devminor))
            elif member.isfifo():
                entry["kind"] = "fifo"
            else:
                assert member.isreg()
                entry.update(kind="file", content=tar.extractfile(member).read())
            view[key] = entry
    assert "" in view
    assert path.stat().st_size % 10240 == 0
    return view


def fs_view(root: Path) -> dict[str, dict]:
    view = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames] if Path(directory) == root else [*dirnames, *filenames]:
            path = Path(directory) / name if name else root
            info = os.lstat(path)
            entry = {
                "mode": stat.S_IMODE(info.st_mode),
                "uid": info.st_uid,
                "gid": info.st_gid,
                "mtime": info.st_mtime_ns / 1e9,
                "inode": info.st_ino,
            }
            kind = stat.S_IFMT(info.st_mode)
            if kind == stat.S_IFDIR:
                entry["kind"] = "dir"
            elif kind == stat.S_IFLNK:
                entry.update(kind="symlink", target=os.readlink(path))
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                entry["kind"] = "chr" if kind == stat.S_IFCHR else "blk"
                entry["dev"] = (os.major(info.st_rdev), os.minor(info.st_rdev))
            elif kind == stat.S_IFIFO:
                entry["kind"] = "fifo"
            else:
                entry.update(kind="file", content=path.read_bytes())
            if kind != stat.S_IFLNK:
                entry["xattrs"] = {n: os.getxattr(path, n) for n in os.listxattr(path)}
            view[str(path.relative_to(root)) if name or Path(directory) != root else ""] = entry
    return view


def gnu_tar_check(path: Path, view: dict[str, dict]) -> None:
    """GNU tar lists and extracts ``path`` without a word, and the files are what the tar says."""
    listed = subprocess.run(["tar", "-tvf", str(path)], capture_output=True, text=True, check=False)
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        extracted = subprocess.run(
            ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-C", str(root), "-xpf", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert extracted.returncode == 0 and extracted.stderr == "", extracted.stderr
        files = fs_view(root)
    assert set(files) == set(view)
    for key, entry in view.items():
        found = files[key]
        if entry["kind"] == "link":
            assert found["inode"] == files[entry["target"]]["inode"], key
            entry = view[entry["target"]]
        assert found["kind"] == entry["kind"], key
        for field in ("content", "target", "dev"):
            assert found.get(field) == entry.get(field), (key, field)
        assert (found["uid"], found["gid"]) == (entry["uid"], entry["gid"]), key
        if entry["kind"] != "symlink":
            assert found["mode"] == entry["mode"], (key, oct(found["mode"]), oct(entry["mode"]))
            assert abs(found["mtime"] - entry["mtime"]) < 1e-6, key
            assert found["xattrs"] == entry["xattrs"], key
    inodes = [files[k]["inode"] for k, e in view.items() if e["kind"] not in ("link", "dir")]
    assert len(inodes) == len(set(inodes)), "files share an inode without a hard link"


def _libarchive():
    name = ctypes.util.find_library("archive")
    if name is None:
        return None
    lib = ctypes.CDLL(name)
    p, cp = ctypes.c_void_p, ctypes.c_char_p
    for function, restype, argtypes in (
        ("archive_read_new", p, []),
        ("archive_read_support_format_all", ctypes.c_int, [p]),
        ("archive_read_support_filter_all", ctypes.c_int, [p]),
        ("archive_read_open_filename", ctypes.c_int, [p, cp, ctypes.c_size_t]),
        ("archive_read_next_header", ctypes.c_int, [p, ctypes.POINTER(p)]),
        ("archive_read_data", ctypes.c_ssize_t, [p, p, ctypes.c_size_t]),
        ("archive_error_string", cp, [p]),
        ("archive_read_free", ctypes.c_int, [p]),
        ("archive_entry_pathname", cp, [p]),
        ("archive_entry_hardlink", cp, [p]),
        ("archive_entry_symlink", cp, [p]),
        ("archive_entry_filetype", ctypes.c_uint, [p]),
        ("archive_entry_size", ctypes.c_int64, [p]),
        ("archive_entry_uid", ctypes.c_int64, [p]),
        ("archive_entry_gid", ctypes.c_int64, [p]),
        ("archive_entry_perm", ctypes.c_uint, [p]),
        ("archive_entry_xattr_reset", ctypes.c_int, [p]),
        (
            "archive_entry_xattr_next",
            ctypes.c_int,
            [p, ctypes.POINTER(cp), ctypes.POINTER(p), ctypes.POINTER(ctypes.c_size_t)],
        ),
    ):
        getattr(lib, function).restype = restype
        getattr(lib, function).argtypes = argtypes
    return lib


LIBARCHIVE = _libarchive()


def libarchive_check(path: Path, view: dict[str, dict]) -> None:
    """libarchive (mke2fs -d's tar reader) reads every header with ARCHIVE_OK and the same facts."""
    if LIBARCHIVE is None:
        return
    lib = LIBARCHIVE
    archive = lib.archive_read_new()
    try:
        lib.archive_read_support_format_all(archive)
        lib.archive_read_support_filter_all(archive)
        assert lib.archive_read_open_filename(archive, str(path).encode(), 10240) == 0
        entry = ctypes.c_void_p()
        seen = []
        while (status := lib.archive_read_next_header(archive, ctypes.byref(entry))) != 1:  # ARCHIVE_EOF
            assert status == 0, lib.archive_error_string(archive)  # not even ARCHIVE_WARN
            name = lib.archive_entry_pathname(entry).decode("utf-8", "surrogateescape")
            key = "" if name in ("./", ".") else name[2:].rstrip("/")
            expected = view[key]
            seen.append(key)
            assert (lib.archive_entry_uid(entry), lib.archive_entry_gid(entry)) == (expected["uid"], expected["gid"])
            assert lib.archive_entry_perm(entry) == expected["mode"] or expected["kind"] == "symlink"
            if expected["kind"] == "link":
                assert lib.archive_entry_hardlink(entry).decode("utf-8", "surrogateescape") == "./" + expected["target"]
                continue
            kind = {
                0o100000: "file",
                0o040000: "dir",
                0o120000: "symlink",
                0o020000: "chr",
                0o060000: "blk",
                0o010000: "fifo",
            }[lib.archive_entry_filetype(entry)]
            assert kind == expected["kind"], key
            if kind == "symlink":
                assert lib.archive_entry_symlink(entry).decode("utf-8", "surrogateescape") == expected["target"]
            xattrs = {}
            lib.archive_entry_xattr_reset(entry)
            xname, value, size = ctypes.c_char_p(), ctypes.c_void_p(), ctypes.c_size_t()
            while (
                lib.archive_entry_xattr_next(entry, ctypes.byref(xname), ctypes.byref(value), ctypes.byref(size)) == 0
            ):
                xattrs[xname.value.decode()] = ctypes.string_at(value, size.value)
            assert xattrs == expected["xattrs"], key
            if kind == "file":
                data, buffer = b"", ctypes.create_string_buffer(65536)
                while (got := lib.archive_read_data(archive, buffer, 65536)) > 0:
                    data += buffer.raw[:got]
                assert got == 0 and data == expected["content"], key
        assert seen == list(view)
    finally:
        lib.archive_read_free(archive)


def check(path: Path) -> dict[str, dict]:
    view = tar_view(path)
    gnu_tar_check(path, view)
    libarchive_check(path, view)
    return view


def files(view: dict[str, dict]) -> dict[str, object]:
    """path -> content (files), target (symlinks, links: "->target"), "dir", or the kind."""
    summary: dict[str, object] = {}
    for key, entry in view.items():
        if not key:
            continue
        kind = entry["kind"]
        summary[key] = {
            "file": entry.get("content"),
            "dir": "dir",
            "symlink": f"@{entry.get('target')}",
            "link": f"->{entry.get('target')}",
        }.get(kind, kind)
    return summary


def refused(code: str, layers, out: Path, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as error:
        flatten(layers, out, **kwargs)
    assert error.value.code == code, error.value
    assert list(out.parent.iterdir()) == [], "something half-written was left"
    return error.value


# ---------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("compression", ["gzip", None])
def test_upper_layer_replaces_a_file(blobs, out, compression):
    layers = [
        layer(blobs, [dirent("etc"), reg("etc/hostname", b"lower"), reg("etc/keep", b"kept")], compression),
        layer(blobs, [dirent("etc"), reg("etc/hostname", b"upper", mode=0o600, uid=7)], compression),
    ]
    report = flatten(layers, out)
    view = check(out)
    assert files(view) == {"etc": "dir", "etc/hostname": b"upper", "etc/keep": b"kept"}
    assert (view["etc/hostname"]["mode"], view["etc/hostname"]["uid"]) == (0o600, 7)
    assert report == oci_flatten.FlattenReport(entries=4, bytes=9, layers=2)
    assert list(out.parent.iterdir()) == [out]  # no decompressed layer or partial file left beside it


def test_paths_are_normalised(blobs, out):
    layers = [
        layer(blobs, [reg("./x", b"1")]),
        layer(blobs, [reg("x", b"2")]),
        layer(blobs, [reg("/x", b"3"), reg("//y/./z", b"4")]),
    ]
    flatten(layers, out)
    assert files(check(out)) == {"x": b"3", "y": "dir", "y/z": b"4"}


def test_whiteouts_remove_a_file_and_a_directory_tree(blobs, out):
    layers = [
        layer(
            blobs,
            [
                dirent("a"),
                reg("a/f", b"f"),
                reg("a/g", b"g"),
                dirent("d"),
                dirent("d/sub"),
                reg("d/sub/deep", b"deep"),
                reg("d/top", b"top"),
                reg("keep", b"keep"),
            ],
        ),
        layer(blobs, [dirent("a"), whiteout("a/f"), whiteout("d")]),
    ]
    flatten(layers, out)
    assert files(check(out)) == {"a": "dir", "a/g": b"g", "keep": b"keep"}


def test_whiteout_only_hides_lower_layers(blobs, out):
    """A whiteout listed after an entry of its own layer does not remove it; one that names
    something absent is harmless; the markers never reach the output."""
    layers = [
        layer(blobs, [reg("x", b"lower"), reg("y", b"y")]),
        layer(blobs, [reg("x", b"same layer"), whiteout("x"), whiteout("nothing")]),
    ]
    flatten(layers, out)
    assert files(check(out)) == {"x": b"same layer", "y": b"y"}


def test_opaque_directory_keeps_its_own_layers_entries(blobs, out):
    layers = [
        layer(
            blobs,
            [dirent("app"), reg("app/old", b"old"), dirent("app/lib"), reg("app/lib/x", b"x"), reg("outside", b"o")],
        ),
        # the marker after the layer's own entries still applies first (the spec's example)
        layer(blobs, [dirent("app", mode=0o750), reg("app/new", b"new"), dirent("app/lib"), opaque("app")]),
    ]
    flatten(layers, out)
    view = check(out)
    assert files(view) == {"app": "dir", "app/new": b"new", "app/lib": "dir", "outside": b"o"}
    assert view["app"]["mode"] == 0o750


def test_file_replaced_by_directory_and_directory_by_file(blobs, out):
    layers = [
        layer(blobs, [reg("f", b"file"), dirent("d"), dirent("d/e"), reg("d/e/x", b"x"), reg("d/y", b"y")]),
        layer(blobs, [dirent("f"), reg("f/inside", b"in"), reg("d", b"now a file")]),
    ]
    flatten(layers, out)
    assert files(check(out)) == {"f": "dir", "f/inside": b"in", "d": b"now a file"}


def test_directory_over_directory_takes_attributes_keeps_contents(blobs, out):
    layers = [
        layer(blobs, [dirent("d", mode=0o755, uid=1, xattrs={"user.old": b"1"}), reg("d/x", b"x")]),
        layer(blobs, [dirent("d", mode=0o700, uid=2, mtime=MTIME + 5, xattrs={"user.new": b"2"})]),
    ]
    flatten(layers, out)
    view = check(out)
    assert files(view) == {"d": "dir", "d/x": b"x"}
    assert (view["d"]["mode"], view["d"]["uid"], view["d"]["mtime"]) == (0o700, 2, MTIME + 5)
    assert view["d"]["xattrs"] == {"user.new": b"2"}


def test_missing_parents_are_created(blobs, out):
    flatten([layer(blobs, [reg("usr/share/doc/x", b"x", mtime=MTIME)])], out)
    view = check(out)
    assert files(view) == {"usr": "dir", "usr/share": "dir", "usr/share/doc": "dir", "usr/share/doc/x": b"x"}
    assert all(view[d]["mode"] == 0o755 and view[d]["uid"] == 0 for d in ("usr", "usr/share", "usr/share/doc"))


def test_hard_link_keeps_its_content_when_the_target_goes(blobs, out):
    layers = [
        layer(
            blobs,
            [
                dirent("bin"),
                reg("bin/busybox", b"BUSYBOX", mode=0o755),
                hardlink("bin/sh", "bin/busybox", mode=0o755),
                hardlink("bin/ls", "./bin/busybox", mode=0o755),
                reg("lib", b"L"),
                hardlink("lib2", "lib"),
            ],
        ),
        layer(blobs, [dirent("bin"), whiteout("bin/busybox"), reg("lib", b"new L")]),
    ]
    report = flatten(layers, out)
    view = check(out)
    # bin/ls (first in order) now carries busybox's content; bin/sh links to it; lib2 keeps the old lib
    assert files(view) == {"bin": "dir", "bin/ls": b"BUSYBOX", "bin/sh": "->bin/ls", "lib": b"new L", "lib2": b"L"}
    assert view["bin/ls"]["mode"] == 0o755
    assert report.bytes == len(b"BUSYBOX") + len(b"new L") + len(b"L")


def test_hard_links_in_upper_layer_to_a_lower_file(blobs, out):
    layers = [
        layer(blobs, [reg("z/original", b"data")]),
        layer(blobs, [hardlink("a/link", "z/original")]),
    ]
    flatten(layers, out)
    assert files(check(out)) == {"a": "dir", "a/link": b"data", "z": "dir", "z/original": "->a/link"}


def test_hard_link_to_missing_target_or_directory_is_refused(blobs, out):
    error = refused("IMAGE_LAYER_INVALID", [layer(blobs, [hardlink("x", "nowhere")])], out)
    assert "nowhere" in str(error)
    refused("IMAGE_LAYER_INVALID", [layer(blobs, [dirent("d"), hardlink("x", "d")])], out)


def test_symlinks_devices_and_fifos(blobs, out):
    layers = [
        layer(
            blobs,
            [
                dirent("dev"),
                special("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
                special("dev/loop0", tarfile.BLKTYPE, mode=0o660, gid=6, dev=(7, 0)),
                special("run.fifo", tarfile.FIFOTYPE, mode=0o600),
                symlink("abs", "/etc/passwd"),  # absolute: data, never followed here
                symlink("rel", "../../outside"),  # likewise
                symlink("dangling", "nowhere"),
            ],
        ),
    ]
    flatten(layers, out)
    view = check(out)
    assert (view["dev/null"]["kind"], view["dev/null"]["dev"], view["dev/null"]["mode"]) == ("chr", (1, 3), 0o666)
    assert (view["dev/loop0"]["kind"], view["dev/loop0"]["dev"], view["dev/loop0"]["gid"]) == ("blk", (7, 0), 6)
    assert view["run.fifo"]["kind"] == "fifo"
    assert files(view)["abs"] == "@/etc/passwd" and files(view)["rel"] == "@../../outside"


def test_ownership_modes_and_times(blobs, out):
    layers = [
        layer(
            blobs,
            [
                dirent("", mode=0o755, mtime=MTIME - 1),  # the root's own entry ("./")
                reg("su", b"x", mode=0o4755, uid=0),
                reg("sg", b"x", mode=0o2711, uid=1000, gid=50),
                dirent("tmp", mode=0o1777),
                reg("big-ids", b"x", uid=4_000_000_000, gid=3_000_000),  # beyond ustar's 7 octal digits: pax
                reg("subsecond", b"x", pax={"mtime": "1700000000.25"}),
                reg("old", b"x", mtime=0),
            ],
        ),
    ]
    flatten(layers, out)
    view = check(out)
    assert view["su"]["mode"] == 0o4755 and view["sg"]["mode"] == 0o2711 and view["tmp"]["mode"] == 0o1777
    assert (view["sg"]["uid"], view["sg"]["gid"]) == (1000, 50)
    assert (view["big-ids"]["uid"], view["big-ids"]["gid"]) == (4_000_000_000, 3_000_000)
    assert view["subsecond"]["mtime"] == 1700000000.25
    assert view["old"]["mtime"] == 0 and view[""]["mtime"] == MTIME - 1
    assert all(entry["uname"] == "" for entry in view.values())  # numeric ids win on extraction


def test_xattrs_and_file_capabilities(blobs, out):
    layers = [
        layer(
            blobs,
            [
                reg("usr/bin/ping", b"ELF", mode=0o755, xattrs={"security.capability": CAPABILITY}),
                reg("tagged", b"t", xattrs={"user.note": "héllo".encode(), "user.bin": b"\x00\xff\n="}),
            ],
        ),
        layer(blobs, [hardlink("usr/bin/ping6", "usr/bin/ping", mode=0o755)]),
    ]
    flatten(layers, out)
    view = check(out)  # includes: GNU tar restores them, libarchive (mke2fs) reads them
    assert view["usr/bin/ping"]["xattrs"] == {"security.capability": CAPABILITY}
    assert view["tagged"]["xattrs"] == {"user.note": "héllo".encode(), "user.bin": b"\x00\xff\n="}
    with open(out, "rb") as f:
        assert b"hdrcharset" not in f.read()  # GNU tar warns about it


def test_long_and_non_ascii_names(blobs, out):
    deep = "/".join(["d" * 60] * 5) + "/file"  # > 256 bytes: a pax path
    mid = "m" * 120 + "/" + "n" * 90  # fits ustar's prefix + name
    layers = [
        layer(
            blobs,
            [
                reg(deep, b"deep"),
                reg(mid, b"mid"),
                reg("café/naïve", b"u"),
                symlink("long", "t" * 300),
                hardlink("l" * 150, deep),
            ],
        ),
    ]
    flatten(layers, out)
    view = check(out)
    assert view[deep]["content"] == b"deep" and view[mid]["content"] == b"mid"
    assert view["café/naïve"]["content"] == b"u" and view["long"]["target"] == "t" * 300
    assert view[deep]["kind"] == "file" and view["l" * 150]["kind"] == "link"  # d... sorts before l...


def test_parent_symlinks_are_followed_inside_the_root(blobs, out):
    layers = [
        layer(
            blobs,
            [
                dirent("usr"),
                dirent("usr/lib"),
                symlink("lib", "usr/lib"),
                symlink("up", "../../.."),
                symlink("abs", "/usr"),
                symlink("usr/lib/etc", "/etc"),
            ],
        ),
        layer(blobs, [reg("lib/libc.so", b"c"), reg("up/etc/x", b"x"), reg("abs/y", b"y"), reg("lib/etc/z", b"z")]),
    ]
    flatten(layers, out)
    assert files(check(out)) == {
        "abs": "@/usr",
        "lib": "@usr/lib",
        "up": "@../../..",
        "usr/lib/etc": "@/etc",
        "etc": "dir",
        "etc/x": b"x",
        "etc/z": b"z",
        "usr": "dir",
        "usr/lib": "dir",
        "usr/lib/libc.so": b"c",
        "usr/y": b"y",
    }


def test_symlink_loop_and_file_as_parent_are_refused(blobs, out):
    refused("IMAGE_LAYER_INVALID", [layer(blobs, [symlink("a", "b"), symlink("b", "a"), reg("a/x", b"")])], out)
    refused("IMAGE_LAYER_INVALID", [layer(blobs, [reg("f", b""), reg("f/x", b"")])], out)


def test_output_is_deterministic(blobs, tmp_path):
    layers = [
        layer(blobs, [reg("b", b"b"), reg("a/z", b"z"), dirent("a"), reg("a/y", b"y", mtime=MTIME + 1)]),
        layer(blobs, [reg("c", b"c"), hardlink("a/x", "b")]),
    ]
    first, second = tmp_path / "one.tar", tmp_path / "two.tar"
    flatten(layers, first)
    flatten(layers, second)
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as tar:
        assert tar.getnames() == [".", "./a", "./a/x", "./a/y", "./a/z", "./b", "./c"]


# ---------------------------------------------------------------------------- formats


def test_compression_is_read_from_the_bytes(blobs, out):
    plain = tar_bytes([reg("plain", b"p")])
    packed = gzip.compress(tar_bytes([reg("packed", b"g")]))
    layers = [(blob(blobs, plain), DOCKER_GZIP), (blob(blobs, packed), TAR)]  # docker save: names lie
    flatten(layers, out)
    assert files(check(out)) == {"plain": b"p", "packed": b"g"}


def _has_module(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


@pytest.mark.skipif(shutil.which("zstd") is None, reason="no zstd command to make the layers")
@pytest.mark.parametrize("backend", ["cli", "zstandard"])
def test_zstd_layers(blobs, out, monkeypatch, backend):
    if backend == "zstandard" and not _has_module("zstandard"):
        pytest.skip("no zstandard module")
    monkeypatch.setattr(oci_flatten, "_zstd_backend", lambda: backend)
    content = os.urandom(100_000) + bytes(300_000)
    layers = [layer(blobs, [reg("z", content)], "zstd"), layer(blobs, [reg("g", b"gzip")], "gzip")]
    flatten(layers, out)
    assert files(check(out)) == {"z": content, "g": b"gzip"}
    os.unlink(out)
    packed = layers[0][0].read_bytes()
    for broken in (packed[:-3], packed[: len(packed) // 2], packed + b"junk"):
        refused("IMAGE_LAYER_INVALID", [(blob(blobs, broken), ZSTD)], out)
    monkeypatch.setattr(oci_flatten, "_zstd_backend", lambda: None)
    error = refused("IMAGE_LAYER_INVALID", layers, out)
    assert ZSTD in str(error)


def test_unknown_media_type_is_refused(blobs, out):
    path, _ = layer(blobs, [reg("x", b"x")])
    error = refused("IMAGE_LAYER_INVALID", [(path, "application/vnd.oci.image.config.v1+json")], out)
    assert path.name in str(error)


# ---------------------------------------------------------------------------- hostile and broken layers


@pytest.mark.parametrize(
    "member",
    [
        reg("../escape", b"x"),
        reg("a/../../x", b"x"),
        reg("a/../b", b"x"),  # stays inside, still refused
        hardlink("innocent", "../x"),
        hardlink("innocent", "a/../../etc/shadow"),
        whiteout("../x"),
        reg("a/.wh.b/c", b"x"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "inner-dotdot",
        "link-dotdot",
        "link-nested-dotdot",
        "whiteout-dotdot",
        "whiteout-as-dir",
    ],
)
def test_hostile_paths_are_refused(blobs, out, member):
    layers = [layer(blobs, [reg("x", b"x"), dirent("a")]), layer(blobs, [reg("ok", b"ok"), member])]
    error = refused("IMAGE_LAYER_INVALID", layers, out)
    assert layers[1][0].name in str(error)  # the layer's digest
    assert member[0].name in str(error) or member[0].linkname in str(error)


def test_truncated_gzip_layer(blobs, out):
    content = os.urandom(200_000)
    good = layer(blobs, [reg("x", b"x")])
    whole = gzip.compress(tar_bytes([reg("big", content)]))
    cut = blob(blobs, whole[: len(whole) // 2])
    error = refused("IMAGE_LAYER_INVALID", [good, (cut, GZIP)], out)
    assert cut.name in str(error)
    # a complete gzip of a tar cut inside a file's data
    cut_tar = blob(blobs, gzip.compress(tar_bytes([reg("big", content)])[:100_000]))
    refused("IMAGE_LAYER_INVALID", [(cut_tar, GZIP)], out)
    refused("IMAGE_LAYER_INVALID", [(blob(blobs, b"\x1f\x8b" + os.urandom(1000)), GZIP)], out)


def test_garbage_and_empty_layers(blobs, out):
    refused("IMAGE_LAYER_INVALID", [(blob(blobs, os.urandom(4096)), TAR)], out)
    refused("IMAGE_LAYER_INVALID", [(blob(blobs, b""), TAR)], out)
    raw = bytearray(tar_bytes([reg("x", b"x")]))
    raw[0] ^= 0x01  # the checksum no longer matches
    refused("IMAGE_LAYER_INVALID", [(blob(blobs, bytes(raw)), TAR)], out)
    # an empty tar (end-of-archive blocks only) is a valid, empty layer
    flatten([(blob(blobs, bytes(1024)), TAR), layer(blobs, [reg("x", b"x")])], out)
    assert files(check(out)) == {"x": b"x"}


def test_unsupported_entry_types_are_refused(blobs, out):
    sparse = reg("sparse", b"x", pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0"})
    refused("IMAGE_LAYER_INVALID", [layer(blobs, [sparse])], out)
    info, _ = special("volume", b"V")
    refused("IMAGE_LAYER_INVALID", [layer(blobs, [(info, None)])], out)


def test_max_bytes(blobs, out):
    layers = [
        layer(blobs, [reg("deleted", bytes(10_000)), reg("a", bytes(300))]),
        layer(blobs, [whiteout("deleted"), reg("b", bytes(300)), hardlink("a2", "a")]),
    ]
    error = refused("IMAGE_TOO_LARGE", layers, out, max_bytes=599)
    assert "600" in str(error)
    report = flatten(layers, out, max_bytes=600)  # deleted files and hard links do not count
    assert report.bytes == 600


def test_max_entries(blobs, out):
    layers = [layer(blobs, [reg(f"f{i}", b"") for i in range(20)])]
    refused("IMAGE_TOO_LARGE", layers, out, max_entries=10)
    refused("IMAGE_TOO_LARGE", [layer(blobs, [reg("/".join("d" * 30), b"")])], out, max_entries=10)  # created dirs
    assert flatten(layers, out, max_entries=20).entries == 21


# ---------------------------------------------------------------------------- random stacks vs a model

NAMES = ["a", "b", "c"]
TARGETS = ["a", "b/c", "../a", "/b", ".", "/", "c/../a"]
paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
LEAVES = ["f", "a/f", "b/f"]  # files only, never parents: what hard links point at
leaves = st.sampled_from(LEAVES)
ops = st.one_of(
    st.tuples(st.just("file"), paths, st.binary(max_size=6)),
    st.tuples(st.just("file"), leaves, st.binary(max_size=6)),
    st.tuples(st.just("dir"), paths),
    st.tuples(st.just("whiteout"), st.one_of(paths, leaves)),
    st.tuples(st.just("opaque"), st.one_of(st.just(""), paths)),
    st.tuples(st.just("symlink"), paths, st.sampled_from(TARGETS)),
    st.tuples(st.just("hardlink"), st.one_of(paths, leaves), leaves, st.binary(max_size=6)),
)
stacks = st.lists(st.tuples(st.lists(ops, max_size=8), st.booleans()), min_size=1, max_size=4)


class Invalid(Exception):
    pass


class Model:
    """The final tree as a flat dict, straight from the spec's rules (symlinks in parents followed
    inside the root, as runtimes do)."""

    def __init__(self):
        self.tree: dict[tuple[str, ...], tuple[str, object]] = {}

    def remove(self, path: tuple[str, ...]) -> None:
        for key in [k for k in self.tree if k[: len(path)] == path]:
            del self.tree[key]

    def directory(self, parts: list[str], create: bool = True) -> tuple[str, ...] | None:
        todo, here, hops = list(parts), (), 0
        while todo:
            name = todo.pop(0)
            if name in ("", "."):
                continue
            if name == "..":
                here = here[:-1]
                continue
            path = here + (name,)
            found = self.tree.get(path)
            if found is None:
                if not create:
                    return None
                self.tree[path] = ("dir", None)
            elif found[0] == "symlink":
                hops += 1
                if hops > 40:
                    raise Invalid
                target = str(found[1])
                if target.startswith("/"):
                    here = ()
                todo = target.split("/") + todo
                continue
            elif found[0] != "dir":
                if not create:
                    return None
                raise Invalid
            here = path
        return here

    def apply(self, layer_ops) -> None:
        layer_ops = expand(layer_ops)
        for op in layer_ops:
            if op[0] == "whiteout":
                *parent, name = op[1].split("/")
                self.remove(self.directory(parent) + (name,))
            elif op[0] == "opaque":
                here = self.directory(op[1].split("/") if op[1] else [])
                for key in [k for k in self.tree if len(k) > len(here) and k[: len(here)] == here]:
                    del self.tree[key]
        for op in layer_ops:
            if op[0] in ("whiteout", "opaque"):
                continue
            *parent, name = op[1].split("/")
            path = self.directory(parent) + (name,)
            if op[0] == "dir" and self.tree.get(path, ("",))[0] == "dir":
                continue
            self.remove(path)
            if op[0] == "hardlink":  # the content its target has now, whatever later happens to the target
                *target_parent, target_name = op[2].split("/")
                here = self.directory(target_parent, create=False)
                found = self.tree.get(here + (target_name,)) if here is not None else None
                if found is None or found[0] == "dir":
                    raise Invalid
                self.tree[path] = found
                continue
            self.tree[path] = {
                "file": ("file", op[2] if op[0] == "file" else None),
                "dir": ("dir", None),
                "symlink": ("symlink", op[-1]),
            }[op[0]]


def expand(layer_ops):
    """A hard link op is its target file, written just before it, then the link."""
    expanded = []
    for op in layer_ops:
        if op[0] == "hardlink":
            expanded += [("file", op[2], op[3]), op[:3]]
        else:
            expanded.append(op)
    return expanded


def members_of(layer_ops):
    for op in expand(layer_ops):
        if op[0] == "file":
            yield reg(op[1], op[2])
        elif op[0] == "dir":
            yield dirent(op[1])
        elif op[0] == "whiteout":
            yield whiteout(op[1])
        elif op[0] == "opaque":
            yield reg(f"{op[1]}/.wh..wh..opq" if op[1] else ".wh..wh..opq")
        elif op[0] == "hardlink":
            yield hardlink(op[1], op[2])
        else:
            yield symlink(op[1], op[2])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stacks)
def test_random_layer_stacks_match_the_model(stack):
    model = Model()
    try:
        for layer_ops, _ in stack:
            model.apply(layer_ops)
        expected = {"/".join(k): v for k, v in model.tree.items()}
    except Invalid:
        expected = None
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "blobs"
        directory.mkdir()
        (Path(tmp) / "out").mkdir()
        target = Path(tmp) / "out" / "rootfs.tar"
        layers = [layer(directory, list(members_of(ops)), "gzip" if gz else None) for ops, gz in stack]
        if expected is None:
            refused("IMAGE_LAYER_INVALID", layers, target)
            return
        flatten(layers, target)
        view = check(target)
    got = {}
    for key, entry in view.items():
        if key:
            entry = view[entry["target"]] if entry["kind"] == "link" else entry
            got[key] = (entry["kind"], entry.get("content", entry.get("target")))
    assert got == expected
