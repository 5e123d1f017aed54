"""store/assets.image_for: a rootfs tarball becomes the VM's ext4, straight from the tarball where
mke2fs can read one (e2fsprogs >= 1.47.1), so ownership and device nodes need no root."""

from __future__ import annotations

import gzip
import io
import lzma
import subprocess
import tarfile
from pathlib import Path

import pytest

from machinen_async import MachinenError
from machinen_async.store import assets, oci_image


def _rootfs_tar() -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None, **fields) -> None:
            entry = tarfile.TarInfo(name)
            entry.type, entry.mode = kind, fields.pop("mode", 0o644)
            for key, value in fields.items():
                setattr(entry, key, value)
            entry.size = len(data) if data is not None else 0
            tar.addfile(entry, io.BytesIO(data) if data is not None else None)

        for directory in ("./bin", "./dev", "./usr", "./usr/lib"):
            add(directory, tarfile.DIRTYPE, mode=0o755)
        add("./bin/tool", data=b"#!/bin/sh\n", mode=0o4755, uid=1234, gid=5678)
        # A link's header repeats its file's mode and owner, as tar writes them (mke2fs applies them).
        add("./bin/also-tool", tarfile.LNKTYPE, linkname="./bin/tool", mode=0o4755, uid=1234, gid=5678)
        add("./bin/sh", tarfile.SYMTYPE, linkname="busybox", mode=0o777)
        add("./dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
    return raw.getvalue()


@pytest.mark.parametrize("compress", [lambda data: data, gzip.compress, lzma.compress], ids=["tar", "gzip", "xz"])
def test_the_agent_is_appended_after_its_directories(tmp_path, compress):
    tarball = tmp_path / "rootfs.tar.any"
    tarball.write_bytes(compress(_rootfs_tar()))
    with tarfile.open(assets._tarball_with_agent(tarball, tmp_path / "out.tar")) as tar:
        names = [name.removeprefix("./") for name in tar.getnames()]
    assert names[:9] == ["bin", "dev", "usr", "usr/lib", "bin/tool", "bin/also-tool", "bin/sh", "dev/null", "usr"]
    agent = [name for name in names if name.startswith(assets.GUEST_LIB + "/")]
    assert f"{assets.GUEST_LIB}/agent_main.py" in agent
    for index, name in enumerate(names):  # mke2fs wants each directory before what it holds
        parent = name.rpartition("/")[0]
        assert not parent or parent in names[:index], name


@pytest.mark.skipif(not assets._mke2fs_reads_tarballs(), reason="e2fsprogs < 1.47.1 (make deps installs 1.47.2)")
def test_an_image_is_built_from_the_tarball_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("MACHINEN_CACHE_DIR", str(tmp_path / "cache"))
    tarball = tmp_path / "rootfs.tar.gz"
    tarball.write_bytes(gzip.compress(_rootfs_tar()))
    image = assets.image_for(tarball)

    def stat(path: str) -> str:
        return subprocess.run(
            ["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True, check=True
        ).stdout

    tool = stat("/bin/tool")
    assert "Mode:  04755" in tool and "User:  1234" in tool and "Group:  5678" in tool and "Links: 2" in tool
    assert "Type: character special" in stat("/dev/null") and "Device major/minor number: 01:03" in stat("/dev/null")
    assert 'Fast link dest: "busybox"' in stat("/bin/sh")
    assert "Type: regular" in stat(f"/{assets.GUEST_LIB}/agent_main.py")
    assert not list(Path(tmp_path / "cache" / "images").glob("tmp*"))  # nothing half-built left


def test_an_image_whose_agent_directory_is_a_link_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """An OCI image comes from elsewhere: its /usr may lead to the host's (unpacked as root)."""
    monkeypatch.setattr(assets, "_mke2fs_reads_tarballs", lambda: False)  # the unpacking way
    monkeypatch.setenv("MACHINEN_CACHE_DIR", str(tmp_path / "cache"))
    victim = tmp_path / "victim"
    victim.mkdir()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        entry = tarfile.TarInfo("./usr")
        entry.type, entry.linkname = tarfile.SYMTYPE, str(victim)
        tar.addfile(entry)
    (tmp_path / "hostile.tar").write_bytes(raw.getvalue())
    with pytest.raises(MachinenError) as refused:
        assets.image_for(tmp_path / "hostile.tar")
    assert refused.value.code == "ASSETS_BUILD_FAILED" and "symlink" in refused.value.message
    assert list(victim.iterdir()) == []


@pytest.mark.parametrize(
    "settings",
    [{"User": 1000, "WorkingDir": ["/x"], "Env": "A=1", "Cmd": [1, "sh"]}, {"WorkingDir": "../../etc"},
     {"WorkingDir": "/srv/../../etc"}, "not a map", None],
)  # fmt: skip
def test_an_image_config_of_the_wrong_shape_gives_plain_defaults(settings):
    """PID 1 reads what exec_defaults writes: a hostile config must not reach it as another type."""
    defaults = oci_image.exec_defaults({"config": settings})
    assert defaults["cwd"] == "/" and defaults["user"] == "" and defaults["env"] == []
    assert all(isinstance(word, str) for word in defaults["cmd"])
