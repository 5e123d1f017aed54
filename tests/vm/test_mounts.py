"""Live mounts: a host directory in the guest, both ways, through fork, snapshot and restore (real VMs)."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import machinen
from hypothesis import given
from hypothesis import strategies as st
from net import free_port

from machinen_async import Host, MachinenError, boot, debian_rootfs, restore
from machinen_async.protocol import mounts as protocol
from machinen_async.sdk.mounts import Mount
from machinen_async.supervisor.mounts import HostDirectory

pytestmark = pytest.mark.anyio
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "live-mount" / "run.py"


async def sh(vm, script: str) -> str:
    result = await vm.exec(["sh", "-c", script], timeout=120)
    assert result.exit_code == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode()


async def test_a_live_mount_works_both_ways_and_stays_inside(tmp_path, anyio_backend):
    shared, outside = tmp_path / "shared", tmp_path / "outside"
    shared.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("host secret\n")
    (shared / "from-host").write_text("hello\n")
    workload = ["sh", "-c", "cat /copied/from-host > /root/workload-saw"]  # it starts once the copy is in
    async with boot(mounts=[Mount(str(shared), "/work", live=True), f"{shared}:/copied"], cmd=workload) as vm:
        assert await sh(vm, "cat /work/from-host /copied/from-host") == "hello\nhello\n"
        wait = "for i in $(seq 600); do [ -s /root/workload-saw ] && break; sleep 0.1; done"
        assert await sh(vm, f"{wait}; cat /root/workload-saw") == "hello\n"
        (shared / "later").write_text("seen at once\n")
        assert await sh(vm, "cat /work/later") == "seen at once\n"
        (shared / "later").write_text("changed\n")
        assert await sh(vm, "stat -c %s /work/later; cat /work/later") == "8\nchanged\n"

        await sh(vm, "cd /work && echo guest > made && mkdir -p d/e && mv made d/e/moved && chmod 640 d/e/moved"
                     " && echo 12345 > t && truncate -s 2 t && ln -s d/e/moved rel && rm from-host")  # fmt: skip
        assert (shared / "d" / "e" / "moved").read_text() == "guest\n"
        assert oct((shared / "d" / "e" / "moved").stat().st_mode & 0o777) == "0o640"
        assert (shared / "t").read_bytes() == b"12"
        assert os.readlink(shared / "rel") == "d/e/moved" and not (shared / "from-host").exists()
        assert await sh(vm, "cat /work/rel") == "guest\n"

        # Large files stream both ways (bounded memory on every hop).
        await sh(vm, "head -c 24000000 /dev/urandom > /work/big")
        digest = hashlib.sha256((shared / "big").read_bytes()).hexdigest()
        assert (await sh(vm, "sha256sum /work/big")).split()[0] == digest
        (shared / "big2").write_bytes(os.urandom(6_000_000))
        assert (await sh(vm, "sha256sum /work/big2")).split()[0] == hashlib.sha256(
            (shared / "big2").read_bytes()
        ).hexdigest()

        # Nothing leads outside the directory: not symlinks the guest makes, not ones on the host, not hard links.
        refused = await vm.exec(["ln", "-s", "/etc/passwd", "/work/abs"], timeout=30)
        assert refused.exit_code != 0 and b"Operation not permitted" in refused.stderr
        refused = await vm.exec(["ln", "-s", "../../outside/secret", "/work/climb"], timeout=30)
        assert refused.exit_code != 0
        (shared / "to-outside").symlink_to(outside / "secret")
        assert await sh(vm, "readlink /work/to-outside") == f"{outside / 'secret'}\n"
        followed = await vm.exec(["cat", "/work/to-outside"], timeout=30)  # resolved in the guest, not on the host
        assert b"host secret" not in followed.stdout
        os.link(outside / "secret", shared / "hard")
        hard = await vm.exec(["cat", "/work/hard"], timeout=30)
        assert hard.exit_code != 0 and b"host secret" not in hard.stdout
        assert await sh(vm, "cat /work/../etc/os-release") == await sh(vm, "cat /etc/os-release")  # the guest's root

        # The copied mount is the guest's own: changes stay apart.
        await sh(vm, "echo guest-only > /copied/new")
        assert not (shared / "new").exists()


async def test_a_read_only_mount_refuses_writes(tmp_path, anyio_backend):
    (tmp_path / "f").write_text("keep\n")
    async with boot(mounts=[Mount.parse(f"{tmp_path}:/ro:ro", live=True)]) as vm:
        assert await sh(vm, "cat /ro/f") == "keep\n"
        for script in ("echo x > /ro/f", "touch /ro/new", "mkdir /ro/d", "rm /ro/f"):
            result = await vm.exec(["sh", "-c", script], timeout=30)
            assert result.exit_code != 0 and b"Read-only file system" in result.stderr, script
    assert (tmp_path / "f").read_text() == "keep\n" and sorted(os.listdir(tmp_path)) == ["f"]


async def test_every_fork_sibling_keeps_the_mount(tmp_path, anyio_backend):
    async with boot(mounts=[Mount(str(tmp_path), "/work", live=True)]) as vm:
        await sh(vm, "echo base > /work/base")
        async with vm.fork(n=3) as forks:
            outputs = await forks.map(lambda sibling, i: sh(sibling, f"cat /work/base; echo {i} > /work/sibling-{i}"))
            assert outputs == ["base\n"] * 3
        assert sorted(os.listdir(tmp_path)) == ["base", "sibling-0", "sibling-1", "sibling-2"]
        assert await sh(vm, "ls /work") == "base\nsibling-0\nsibling-1\nsibling-2\n"


async def test_restore_rebinds_the_mount(tmp_path, anyio_backend):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (second / "in-second").write_text("2\n")
    async with boot(mounts=[Mount(str(first), "/work", live=True)]) as vm:
        await sh(vm, "echo 1 > /work/in-first")
        await vm.snapshot(tmp_path / "bundle")
    async with restore(tmp_path / "bundle") as again:
        assert await sh(again, "cat /work/in-first") == "1\n"  # the original directory, still there
    async with restore(tmp_path / "bundle", mounts=[Mount(str(second), "/work", live=True)]) as moved:
        assert await sh(moved, "ls /work") == "in-second\n"
    first.rename(tmp_path / "gone")
    with pytest.raises(MachinenError) as missing:
        async with restore(tmp_path / "bundle"):
            pass
    assert missing.value.code == "MOUNT_SOURCE_NOT_FOUND" and str(first) in missing.value.message


@pytest.mark.parametrize(
    ("mount", "code"),
    [("nocolon", "MOUNT_SPEC_INVALID"), ("/x:relative", "MOUNT_SPEC_INVALID"), ("/nonexistent-dir:/w", "MOUNT_SOURCE_NOT_FOUND"),
     ("/tmp:/proc", "MOUNT_SPEC_INVALID"), (42, "MOUNT_SPEC_INVALID")],
)  # fmt: skip
def test_bad_mounts_are_refused_before_anything_starts(mount, code):
    with pytest.raises(MachinenError) as refused:
        Mount.parse(mount, live=True).checked()
    assert refused.value.code == code


def test_the_host_side_refuses_what_leads_outside(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").write_text("secret")
    (tmp_path / "root" / "up").symlink_to("..")
    directory = HostDirectory(str(tmp_path / "root"), read_only=False)
    try:
        for path in ("..", "../outside", "/etc/passwd", "a//b", "./x", "up/outside"):
            error, _ = directory.serve("read", [path, 0, 10])
            assert error in (errno.EINVAL, errno.ELOOP, errno.ENOENT, errno.EXDEV), path
        assert directory.serve("symlink", ["/etc", "abs"])[0] == errno.EPERM
        assert directory.serve("symlink", ["../x", "climb"])[0] == errno.EPERM
        assert directory.serve("symlink", ["up/../x", "sneaky"])[0] == errno.EPERM  # up may be (is) a link
        assert directory.serve("read", ["up", 0, 10])[0] == errno.ELOOP  # never followed here
        assert directory.serve("nonsense", [])[0] == errno.EINVAL
    finally:
        directory.close()
    read_only = HostDirectory(str(tmp_path / "root"), read_only=True)
    try:
        assert read_only.serve("create", ["new", 0o644, True])[0] == errno.EROFS
        assert read_only.serve("open", ["up", True, False])[0] == errno.EROFS
    finally:
        read_only.close()


@given(st.lists(st.sampled_from(["..", ".", "", "a", "up", "/", "\0", "x" * 300, "etc"]), max_size=6))
def test_no_request_path_escapes(tmp_path_factory, parts):
    root = tmp_path_factory.mktemp("root")
    (root / "up").symlink_to("/")
    directory = HostDirectory(str(root), read_only=False)
    try:
        path = "/".join(parts)
        error, _ = directory.serve("lstat", [path])
        if error == 0:
            assert path == "" or (root / path).resolve(strict=False).is_relative_to(root) or path == "up"
        error, _ = directory.serve("create", [path + "/f" if path else "f", 0o644, False])
        assert not os.path.exists("/f") and not os.path.exists("/etc/f")
    finally:
        directory.close()


def test_the_cli_mounts_live_and_copied(tmp_path):
    (tmp_path / "live").mkdir()
    (tmp_path / "copied").mkdir()
    (tmp_path / "copied" / "c").write_text("copied\n")
    ran = machinen("boot", "--mount-live", f"{tmp_path / 'live'}:/live", "--mount", f"{tmp_path / 'copied'}:/c:ro",
                   "--", "sh", "-c", "cat /c/c && echo from-guest > /live/out", timeout=300)  # fmt: skip
    assert ran.stdout == b"copied\n"
    assert (tmp_path / "live" / "out").read_text() == "from-guest\n"
    refused = machinen("boot", "--mount-live", "/no/such/dir:/x", "--", "true", check=False)
    assert refused.returncode != 0 and b"MOUNT_SOURCE_NOT_FOUND" in refused.stderr


def test_live_mount_example_serves_an_edit_without_a_restart():
    port = free_port()
    result = subprocess.run([sys.executable, str(EXAMPLE), "--port", str(port)], capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served: <h1>served from the host, live</h1>" in result.stdout
    assert "after the edit: <h1>edited on the host</h1>" in result.stdout
    assert "the guest wrote: True" in result.stdout
    assert "the fork serves: <h1>edited on the host</h1>" in result.stdout


@pytest.mark.timeout(1200)
async def test_git_and_an_editable_pip_install_work_on_a_live_mount(tmp_path, anyio_backend):
    image = await debian_rootfs(packages=["git", "python3-pip", "python3-setuptools"])
    package = tmp_path / "hello_pkg"
    package.mkdir()
    (package / "setup.py").write_text(
        "from setuptools import setup\nsetup(name='hello-pkg', version='0.1', py_modules=['hello'])\n"
    )
    (package / "hello.py").write_text("GREETING = 'hello from the host'\n")
    async with boot(image, mounts=[Mount(str(tmp_path), "/work", live=True)], memory_mib=512) as vm:
        await sh(
            vm, "cd /work/hello_pkg && git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm one"
        )
        (package / "hello.py").write_text("GREETING = 'edited on the host'\n")
        assert await sh(vm, "cd /work/hello_pkg && git status --porcelain") == " M hello.py\n"
        await sh(
            vm, "python3 -m pip install -q --no-build-isolation --no-index --break-system-packages -e /work/hello_pkg"
        )
        assert await sh(vm, "cd / && python3 -c 'import hello; print(hello.GREETING)'") == "edited on the host\n"
        (package / "hello.py").write_text("GREETING = 'and again'\n")
        assert await sh(vm, "cd / && python3 -c 'import hello; print(hello.GREETING)'") == "and again\n"


async def test_fork_and_handoff_rebind_the_mount(tmp_path, remote_host, anyio_backend):
    first, second, third = (tmp_path / name for name in ("first", "second", "third"))
    for directory in (first, second, third):
        directory.mkdir()
        (directory / directory.name).write_text(f"{directory.name}\n")
    async with boot(mounts=[Mount(str(first), "/work", live=True)]) as vm:
        async with vm.fork(mounts=[Mount(str(second), "/work", live=True)]) as sibling:
            assert await sh(sibling, "ls /work") == "second\n"
        assert await sh(vm, "ls /work") == "first\n"
        async with vm.fork(mounts=[Mount.drop("/work")]) as sibling:
            assert await sh(sibling, "grep -c fuse.machinen /proc/mounts || true; ls /work") == "0\n"
        assert await sh(vm, "ls /work") == "first\n"
        async with Host.from_spec(remote_host.alias) as hostb:
            moved = await vm.handoff(hostb, mounts=[Mount(str(third), "/work", live=True)])
            assert await sh(moved, "ls /work; echo moved > /work/out") == "third\n"
            assert (third / "out").read_text() == "moved\n"
            assert await moved.stop() == "stopped"  # waits until it is gone there (nothing left for the fixture)


@given(
    st.sampled_from([*protocol.OPS, "nope"]),
    st.lists(st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=20), st.binary(max_size=20)), max_size=4),
)  # fmt: skip
def test_any_request_gets_an_answer_never_an_exception(tmp_path_factory, op, args):
    directory = HostDirectory(str(tmp_path_factory.mktemp("any")), read_only=False)
    try:
        error, _ = directory.serve(op, args)
        assert isinstance(error, int)
    finally:
        directory.close()


def test_a_message_reader_bounds_what_it_buffers():
    reader = protocol.MessageReader(limit=1024)
    with pytest.raises(protocol.MountProtocolError):
        reader.feed((1 << 20).to_bytes(4, "big"))
    with pytest.raises(protocol.MountProtocolError):
        protocol.MessageReader().feed(protocol.encode({"not": "a list"}))
    assert protocol.MessageReader().feed(protocol.encode([1, 0, None]) * 2) == [[1, 0, None], [1, 0, None]]


async def test_a_spread_fork_binds_the_mount_on_every_host(tmp_path, remote_host, anyio_backend):
    source, spread = tmp_path / "source", tmp_path / "spread"
    source.mkdir()
    spread.mkdir()
    async with boot(mounts=[Mount(str(source), "/work", live=True)]) as vm, Host.from_spec(remote_host.alias) as hostb:
        # The source's directory is a path of this host: a remote sibling needs one of its own.
        with pytest.raises(MachinenError) as refused:
            await vm.fork(n=3, hosts=[Host.local(), hostb])
        assert refused.value.code == "MOUNT_SOURCE_NOT_FOUND"
        async with vm.fork(n=3, hosts=[Host.local(), hostb], mounts=[Mount(str(spread), "/work", live=True)]) as forks:
            assert set(forks.placement.values()) == {"local", remote_host.alias}
            for sibling in forks:
                await sh(sibling, f"echo {sibling.name} > /work/{sibling.name}")
            assert sorted(p.name for p in spread.iterdir()) == sorted(sibling.name for sibling in forks)
        assert await sh(vm, "ls /work") == ""


async def test_a_fork_checks_the_directories_before_the_source_pauses(tmp_path, anyio_backend):
    gone = tmp_path / "gone"
    gone.mkdir()
    async with boot(mounts=[Mount(str(gone), "/work", live=True)]) as vm:
        gone.rmdir()
        with pytest.raises(MachinenError) as refused:
            await vm.fork()
        assert refused.value.code == "MOUNT_SOURCE_NOT_FOUND"
        assert str(gone) in str(refused.value)
        assert await sh(vm, "echo still running") == "still running\n"
