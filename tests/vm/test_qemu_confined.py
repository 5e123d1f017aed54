"""A QEMU taken over by its guest cannot reach past its sandbox through the supervisor (issue 24, item 4).

QEMU runs confined (``vmm/qemu/confine.py``), but the supervisor is not: every file it creates
or opens where QEMU could write is a way out (a symlink planted there turns the supervisor's
``O_CREAT|O_TRUNC`` into a write to any of the user's files, a read into a leak handed to QEMU).
So QEMU gets no writable directory at all (only its own top layer and RAM file), and each path
the supervisor creates is made ``O_EXCL|O_NOFOLLOW`` after unlinking what was there.  Each test
here plants what a compromised QEMU (or anything else writing there) would, at the name the code
path uses, drives that code path, and checks the victim file is untouched.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
from pathlib import Path

import pytest

from machinen_async import boot
from machinen_async.errors import BootError, MachinenError
from machinen_async.store import layers, paths, registry
from machinen_async.vmm import backend as vmm_backend
from machinen_async.vmm import capped_log
from machinen_async.vmm.qemu import command, confine
from machinen_async.vmm.qemu.backend import BACKEND, QemuMachine, visible

VICTIM_TEXT = b"the user's own file\n"


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(VICTIM_TEXT)
    return path


def untouched(victim: Path) -> bool:
    return victim.read_bytes() == VICTIM_TEXT and victim.stat().st_mode & 0o777 == 0o644


def plant(at: Path, victim: Path) -> None:
    at.unlink(missing_ok=True)
    at.symlink_to(victim)


# --- the primitives ---------------------------------------------------------------------------------


def test_create_file_replaces_a_planted_symlink_and_never_follows_it(tmp_path, victim):
    planted = tmp_path / "state"
    plant(planted, victim)
    fd = paths.create_file(planted)
    os.write(fd, b"ours")
    os.close(fd)
    assert untouched(victim) and not planted.is_symlink() and planted.read_bytes() == b"ours"
    assert planted.stat().st_mode & 0o777 == 0o600


def test_create_file_does_not_block_on_or_write_into_a_planted_fifo_or_directory(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    os.close(paths.create_file(fifo))  # the FIFO was unlinked, not opened (that would block)
    assert fifo.is_file()
    (tmp_path / "dir").mkdir()
    with pytest.raises(FileExistsError):
        paths.create_file(tmp_path / "dir")


def test_open_regular_refuses_a_symlink_and_a_fifo_without_blocking(tmp_path, victim):
    planted = tmp_path / "state"
    plant(planted, victim)
    with pytest.raises(MachinenError) as refused:
        paths.open_regular(planted)
    assert refused.value.code == "PATH_NOT_PRIVATE"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(MachinenError) as refused:
        paths.open_regular(fifo)
    assert refused.value.code == "PATH_NOT_PRIVATE"


# --- migration state handed to QEMU -----------------------------------------------------------------


class RecordingQMP:
    """Stands in for QEMU's QMP: keeps the descriptors passed to it."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.commands: list[tuple[str, dict | None]] = []

    def send_fd_scm(self, fd: int) -> None:
        self.fds.append(os.dup(fd))

    async def execute(self, name: str, arguments: dict | None = None) -> dict:
        self.commands.append((name, arguments))
        return {"fdset-id": 7, "fd": 40 + len(self.commands)} if name == "add-fd" else {}


def _machine() -> QemuMachine:
    machine = QemuMachine.__new__(QemuMachine)
    machine.qmp = RecordingQMP()
    machine.disk_node, machine.layers_added = "disk0", 0
    return machine


@pytest.mark.anyio
async def test_saving_state_onto_a_planted_symlink_writes_a_new_file_not_the_victim(tmp_path, victim, anyio_backend):
    state = tmp_path / "state"  # a template's or a bundle's state file, as QEMU could have planted it
    plant(state, victim)
    machine = _machine()
    assert (await machine._migration_fd(state, write=True))["uri"].startswith("fd:")
    (fd,) = machine.qmp.fds
    os.write(fd, b"device state")  # what QEMU writes into the descriptor it got
    os.close(fd)
    assert untouched(victim)
    assert not state.is_symlink() and state.read_bytes() == b"device state"


@pytest.mark.anyio
async def test_loading_state_through_a_planted_symlink_is_refused(tmp_path, tmp_path_factory, anyio_backend):
    secret = tmp_path_factory.mktemp("home") / "id_rsa"
    secret.write_bytes(b"PRIVATE KEY")
    state = tmp_path / "state"  # a restore's copy: a symlink would hand QEMU a descriptor on the secret
    plant(state, secret)
    machine = _machine()
    with pytest.raises(MachinenError) as refused:
        await machine._migration_fd(state)
    assert refused.value.code == "PATH_NOT_PRIVATE" and machine.qmp.fds == []
    state.unlink()
    os.mkfifo(state)  # nor can a FIFO there hang the supervisor
    with pytest.raises(MachinenError):
        await machine._migration_fd(state)


@pytest.mark.anyio
async def test_a_new_layer_reaches_qemu_as_a_descriptor_and_never_through_a_symlink(tmp_path, victim, anyio_backend):
    machine = _machine()
    layer = tmp_path / "disk.qcow2"
    plant(layer, victim)
    with pytest.raises(MachinenError):
        await machine.freeze_disk(layer)
    assert untouched(victim) and machine.qmp.fds == []
    layer.unlink()
    layer.write_bytes(b"a layer")
    await machine.freeze_disk(layer)
    read_write, read_only = machine.qmp.fds  # read-only too: QEMU reopens it so once it is frozen
    for fd, mode in ((read_write, os.O_RDWR), (read_only, os.O_RDONLY)):
        assert os.path.samefile(f"/proc/self/fd/{fd}", layer) and os.get_blocking(fd)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == mode
        os.close(fd)
    names = [name for name, _ in machine.qmp.commands]
    assert names == ["add-fd", "add-fd", "blockdev-add", "remove-fd", "blockdev-snapshot"]
    assert machine.qmp.commands[1][1] == {"fdset-id": 7}
    assert machine.qmp.commands[2][1]["file"]["filename"] == "/dev/fdset/7"
    assert machine.qmp.commands[3][1] == {"fdset-id": 7, "fd": 41}  # the read-write copy: the node has its own


@pytest.mark.anyio
async def test_qemu_img_create_never_follows_a_symlink_at_the_new_layer(tmp_path, victim, anyio_backend):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    layer = tmp_path / "disk.qcow2"
    plant(layer, victim)
    await BACKEND.create_overlay(layer, [str(base), "raw"], 1 << 20)
    assert untouched(victim)
    assert not layer.is_symlink() and layer.read_bytes()[:4] == b"QFI\xfb"


def _layer_reading_a_host_file(tmp_path: Path, secret: Path) -> list[list[str]]:
    """A disk chain whose top layer's header names ``secret`` as its external data file, as a
    compromised QEMU could write into its own layer before a snapshot flattens it."""
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    layer = tmp_path / "layer.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={secret}", str(layer), "1M"],
                   check=True)  # fmt: skip
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 1M", str(layer)], check=True, capture_output=True)
    with open(secret, "r+b") as f:  # what the data file holds now: the user's own bytes
        f.write(b"PRIVATE KEY " * (1 << 16))
    chain = [[str(layer), "qcow2"], [str(base), "raw"]]
    leaked = tmp_path / "unconfined.raw"  # the attack works on an unconfined qemu-img
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw",
                    "json:" + json.dumps(command.chain_blockdev(chain, writable=False)), str(leaked)], check=True)  # fmt: skip
    assert b"PRIVATE KEY" in leaked.read_bytes()
    return chain


@pytest.mark.anyio
async def test_flattening_a_layer_whose_header_names_a_host_file_does_not_read_it(
    tmp_path, tmp_path_factory, anyio_backend
):
    """The source QEMU can still write its last frozen layer when qemu-img flattens it for a
    bundle: a header naming an external data file would copy any of the user's files into the
    bundle, where the restored guest reads it.  qemu-img runs confined: it sees only the chain."""
    chain = _layer_reading_a_host_file(tmp_path, tmp_path_factory.mktemp("home") / "id_rsa")
    target = tmp_path / "disk.qcow2"
    with pytest.raises(BootError):
        await BACKEND.flatten_disk(chain, target)
    assert b"PRIVATE KEY" not in target.read_bytes()


# --- logs and metadata ------------------------------------------------------------------------------


def test_a_capped_log_never_opens_a_planted_symlink(tmp_path, victim, monkeypatch):
    console = tmp_path / "console.log"
    plant(console, victim)
    log = capped_log.CappedLog(console, 16)
    log.write(b"x" * 10)
    assert untouched(victim) and console.read_bytes() == b"x" * 10

    # Rotation renames the log, then creates it again: the moment a symlink could be planted.
    real_replace = os.replace

    def replace_then_plant(source, target):
        real_replace(source, target)
        plant(console, victim)

    monkeypatch.setattr(capped_log.os, "replace", replace_then_plant)
    log.write(b"y" * 20)
    log.close()
    assert untouched(victim)
    assert (tmp_path / "console.log.1").read_bytes() == b"x" * 10 + b"y" * 6
    assert not console.is_symlink() and console.read_bytes() == b"y" * 14


def test_the_tail_quoted_in_an_error_is_never_read_through_a_symlink(tmp_path, tmp_path_factory):
    secret = tmp_path_factory.mktemp("home") / "id_rsa"
    secret.write_bytes(b"PRIVATE KEY")
    plant(tmp_path / "qemu.log", secret)
    assert capped_log.tail(tmp_path / "qemu.log") == ""


def test_meta_partial_and_meta_json_are_never_followed(tmp_path, victim):
    entry = registry.VmDir(tmp_path / "vm")
    entry.path.mkdir()
    plant(entry.path / "meta.partial", victim)
    entry.write_meta({"name": "vm"})
    assert untouched(victim)
    assert entry.read_meta() == {"name": "vm"} and entry.meta.stat().st_mode & 0o777 == 0o600
    plant(entry.meta, victim)
    assert entry.read_meta() is None  # not the victim's bytes


def test_clear_leftovers_removes_only_a_ram_directory_of_the_vms_own_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MACHINEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MACHINEN_RUNTIME_DIR", str(tmp_path / "run"))
    runtime = paths.private_dir(tmp_path / "run")
    others = {
        "another VM's RAM": runtime / "other-0123abcd",
        "the templates": runtime / "templates",
        "outside the runtime dir": tmp_path / "elsewhere" / "dead-0123abcd",
    }
    link_target = tmp_path / "linked"
    for directory in [*others.values(), link_target]:
        directory.mkdir(parents=True)
        (directory / "mem").write_bytes(b"ram")
    (runtime / "dead-89abcdef").symlink_to(link_target)
    claims = [*others.values(), runtime / "dead-89abcdef", runtime / "dead-0123abcd" / ".." / "templates"]
    for claimed in claims:
        entry = registry.vm_dir("dead")
        paths.private_dir(entry.path)
        entry.write_meta({"ram_dir": str(claimed)})
        registry.clear_leftovers(entry)
        assert not entry.path.exists()
    for directory in [*others.values(), link_target]:
        assert (directory / "mem").read_bytes() == b"ram", directory
    own = runtime / "dead-0123abcd"
    own.mkdir()
    entry = registry.vm_dir("dead")
    paths.private_dir(entry.path)
    entry.write_meta({"ram_dir": str(own)})
    registry.clear_leftovers(entry)
    assert not own.exists()


# --- what QEMU sees ---------------------------------------------------------------------------------


def _launch(tmp_path: Path, *, ram_shared: bool) -> vmm_backend.VmmLaunch:
    for name in ("vmlinuz", "initrd", "image.ext4", "frozen.qcow2", "top.qcow2", "mem"):
        (tmp_path / name).write_bytes(b"")
    hardware = vmm_backend.Hardware(memory_mib=256, cpus=1, accel="tcg", kernel=tmp_path / "vmlinuz",
                                    initrd=tmp_path / "initrd", hostname="vm")  # fmt: skip
    chain = [[str(tmp_path / "top.qcow2"), "qcow2"], [str(tmp_path / "frozen.qcow2"), "qcow2"],
             [str(tmp_path / "image.ext4"), "raw"]]  # fmt: skip
    return vmm_backend.VmmLaunch(hardware=hardware, ram_file=tmp_path / "mem", ram_shared=ram_shared, disk_chain=chain,
                              agent_socket=tmp_path / "agent.sock", control_socket=tmp_path / "qmp.sock")  # fmt: skip


def _binds(argv: list[str]) -> tuple[set[str], set[str]]:
    read_only, writable = set(), set()
    for index, arg in enumerate(argv[: argv.index("--")]):
        if arg == "--ro-bind":
            read_only.add(argv[index + 1])
        elif arg == "--bind":
            writable.add(argv[index + 1])
    return read_only, writable


def test_qemu_is_given_its_own_files_only_and_no_writable_directory(tmp_path):
    if confine.bwrap() is None:
        pytest.skip("bwrap cannot confine QEMU here")
    (tmp_path / "sibling").mkdir()
    sibling = _launch(tmp_path / "sibling", ram_shared=False)  # a fork sibling on a template's RAM
    shown, changed = visible(sibling)
    read_only, writable = _binds(confine.confined(["qemu"], read_only=shown, writable=changed, kvm=False))
    assert writable == {str(tmp_path / "sibling" / "top.qcow2")}
    files = {str(tmp_path / "sibling" / n) for n in ("vmlinuz", "initrd", "image.ext4", "frozen.qcow2", "mem")}
    assert files <= read_only and command.private_ram_read_only()  # QEMU >= 8.2 here
    directories = {str(layers.layers_dir()), str(layers.templates_dir()), str(tmp_path), str(tmp_path / "sibling")}
    assert not directories & (read_only | writable)
    argv = command.command_line(sibling, agent_fd=5, control_fd=6)
    assert "socket,id=agent,fd=5,server=on,wait=off" in argv and "socket,id=qmp,fd=6,server=on,wait=off" in argv
    assert any("share=off,readonly=on,rom=off" in arg for arg in argv)

    (tmp_path / "booted").mkdir()
    booted = _launch(tmp_path / "booted", ram_shared=True)
    booted.ram_file.unlink()  # a booted VM's RAM file does not exist yet: it is created (empty) to be bound
    plant(booted.ram_file, tmp_path / "victim-not-there")  # a dangling symlink is replaced, not followed
    _, writable = visible(booted)
    assert set(writable) == {booted.ram_file, Path(booted.disk_chain[0][0])}
    assert not booted.ram_file.is_symlink() and booted.ram_file.stat().st_size == 0
    assert not (tmp_path / "victim-not-there").exists()


SYSTEM_MOUNTS = {"/", "/proc", "/dev", "/tmp", "/usr", "/dev/pts", "/dev/null", "/dev/zero", "/dev/full",
                 "/dev/random", "/dev/urandom", "/dev/tty", "/dev/kvm"}  # fmt: skip


def _mounts(pid: int) -> dict[str, str]:
    """QEMU's bind mounts of host files: {path as QEMU sees it: "ro" or "rw"}."""
    found = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        mount_point, options = fields[4], fields[5].split(",")
        if mount_point not in SYSTEM_MOUNTS and not mount_point.startswith("/proc/"):
            found[mount_point] = "ro" if "ro" in options else "rw"
    return found


def _write_refused(path: Path) -> int | None:
    """The errno refusing to open ``path`` for writing (None: it opened)."""
    try:
        os.close(os.open(path, os.O_RDWR))
    except OSError as error:
        return error.errno
    return None


def _plant_through(pid: int, directories: list[Path], victim: Path) -> list[Path]:
    """Symlinks to ``victim`` created from inside QEMU's view, under every name the supervisor
    uses, in every directory where it creates files; those that QEMU could create."""
    planted = []
    for directory in directories:
        seen = Path(f"/proc/{pid}/root") / str(directory).lstrip("/")
        for name in ("state", "mem", "disk.qcow2", "console.log", "qemu.log", "meta.partial", "lock", "agent.sock"):
            try:
                seen.mkdir(parents=True, exist_ok=True)
                (seen / name).symlink_to(victim)
                planted.append(directory / name)
            except OSError as error:
                assert error.errno in (errno.EEXIST, errno.EROFS, errno.ENOENT, errno.EACCES, errno.ENOTDIR), error
    return planted


@pytest.mark.anyio
async def test_a_running_qemu_sees_only_its_own_files_and_plants_nothing_the_supervisor_follows(
    anyio_backend, tmp_path, victim
):
    """For real: QEMU's mount table has no writable directory, a fork sibling maps the template and
    the frozen layers read-only, and symlinks planted from inside QEMU's view (where it could write
    before: its VM directory, RAM directory, the layer and template stores) never reach the host's
    directories; fork, snapshot and stop then leave the victim alone."""
    async with boot(name=f"confined-fs-{anyio_backend}", network=False, warm=False) as vm:  # its own RAM file
        meta = await vm.describe()
        pid, ram_dir = meta["qemu_pid"], Path(meta["ram_dir"])
        entry = registry.vm_dir(meta["name"])
        mounts = _mounts(pid)
        writable = {path for path, mode in mounts.items() if mode == "rw"}
        assert len(writable) == 2 and str(ram_dir / "mem") in writable, mounts
        (top,) = writable - {str(ram_dir / "mem")}
        assert Path(top).parent.parent == layers.layers_dir() and Path(top).name == "disk.qcow2"
        hidden = (entry.path, ram_dir, layers.layers_dir(), layers.templates_dir(), Path(top).parent)
        assert not any(str(d) in mounts for d in hidden)
        assert not (Path(f"/proc/{pid}/root") / str(entry.path).lstrip("/")).exists()  # logs, meta, sockets
        stores = [entry.path, ram_dir, Path(top).parent, layers.layers_dir(), layers.templates_dir()]
        planted = _plant_through(pid, stores, victim)
        assert not [p for p in planted if p.is_symlink()], "a symlink planted by QEMU reached the host"
        async with vm.fork() as child:
            child_meta = await child.describe()
            child_mounts = _mounts(child_meta["qemu_pid"])
            template_mem = [p for p, mode in child_mounts.items() if Path(p).parent.parent == layers.templates_dir()]
            assert [child_mounts[p] for p in template_mem] == ["ro"], child_mounts
            assert child_mounts[top] == "ro"  # the source's old top, frozen by the fork
            seen = Path(f"/proc/{child_meta['qemu_pid']}/root")
            for read_only in (template_mem[0], top):
                assert _write_refused(seen / read_only.lstrip("/")) == errno.EROFS
            planted += _plant_through(child_meta["qemu_pid"], stores + [Path(template_mem[0]).parent], victim)
            await child.snapshot(tmp_path / "child.snap")  # state, RAM by migration, a confined flatten
        # A second fork: the source's top is now a layer that reached it as a descriptor; freezing
        # it makes QEMU reopen it read-only (from the fd set), so a sibling can open it.
        async with vm.fork() as again:
            assert (await again.exec(["true"])).exit_code == 0
        await vm.snapshot(tmp_path / "vm.snap")
        assert not [p for p in planted if p.is_symlink()]
    assert untouched(victim)
