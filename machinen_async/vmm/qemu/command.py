"""QEMU ``microvm``: its command line, the accelerator choice, the installed version."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import mmap
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from ...errors import BootError
from ...protocol.guest_abi import AGENT_PORT_NAME
from ..backend import Hardware, VmmLaunch

QEMU_BINARY = "qemu-system-x86_64"
MACHINE_TYPE = "microvm"
# A capped TCG translation cache keeps QEMU's own memory near 100 MiB instead
# of growing with every guest code path, with no measurable slowdown
# (tb-size=16 was 3x slower).  Irrelevant under KVM.
TCG_TB_SIZE_MIB = 64
# QEMU's seccomp filter: a guest that takes over QEMU (a device emulation bug) cannot spawn
# programs, gain privileges (setuid, capabilities), or use obsolete/resource-control syscalls.
# It is why migration state moves through descriptors we open (``fd:``), never ``exec:``.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@functools.cache
def recipe_digest() -> str:
    """This module's source: it decides every device and option a machine gets."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def sandbox_options() -> list[str]:
    """``-sandbox`` unless $MACHINEN_QEMU_SANDBOX is "off" (to measure its cost, or to debug QEMU)."""
    return [] if os.environ.get("MACHINEN_QEMU_SANDBOX", "on").lower() == "off" else ["-sandbox", SANDBOX]


def kvm_usable() -> bool:
    """Real hardware virtualization: vmx/svm in cpuinfo *and* /dev/kvm opens.

    /dev/kvm alone is not enough: some hosts expose a KVM that only runs
    paravirtualized (PVM) guests, where a normal kernel hangs.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split()}
        if not flags & {"vmx", "svm"}:
            return False
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return True
    except OSError:
        return False


def choose_accelerator(requested: str | None = None) -> str:
    """``requested`` (or $MACHINEN_ACCEL): "kvm", "tcg" or "auto"."""
    choice = (requested or os.environ.get("MACHINEN_ACCEL") or "auto").lower()
    if choice == "auto":
        return "kvm" if kvm_usable() else "tcg"
    if choice not in ("kvm", "tcg"):
        raise BootError(f"unknown accelerator {choice!r} (use kvm, tcg or auto)", code="BOOT_ACCEL_INVALID")
    return choice


# x86-64: rdtsc; shl rdx, 32; or rax, rdx; ret
_RDTSC_CODE = bytes.fromhex("0f3148c1e2204809d0c3")


@functools.cache
@functools.cache  # one fixed rate: measured once per process
def host_tsc_khz() -> int | None:
    """The host TSC rate, which TCG guests see as their own TSC rate.

    A guest kernel calibrates its TSC against the emulated PIT; when the host
    is busy (several VMs booting on 2 cores) that calibration fails, the
    kernel finds no other reference on microvm, marks the TSC unstable and
    hangs at time 0.  Passing ``tsc_early_khz`` skips the calibration.
    """
    if platform.machine() != "x86_64":
        return None
    try:
        code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:  # W+X mappings forbidden by policy
        return None
    code.write(_RDTSC_CODE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(code))
    rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(address)
    samples = []
    for _ in range(5):
        ns0, tsc0 = time.perf_counter_ns(), rdtsc()
        while time.perf_counter_ns() - ns0 < 5_000_000:
            pass
        ns1, tsc1 = time.perf_counter_ns(), rdtsc()
        samples.append((tsc1 - tsc0) * 1_000_000 / (ns1 - ns0))
    del rdtsc
    return round(statistics.median(samples))


def qemu_binary() -> str:
    found = shutil.which(QEMU_BINARY)
    if not found:
        raise BootError(f"{QEMU_BINARY} not found: apt-get install qemu-system-x86", code="BOOT_QEMU_MISSING")
    return found


@functools.cache
def qemu_version() -> str:
    """e.g. "7.2.22": device state only loads into the same QEMU version."""
    out = subprocess.run([qemu_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"version (\d+\.\d+\.\d+)", out)
    if not match:
        raise BootError(f"cannot read the QEMU version from {out!r}", code="BOOT_QEMU_MISSING")
    return match.group(1)


def kernel_cmdline(spec: Hardware) -> str:
    args = f"console=ttyS0 quiet panic=-1 machinen.hostname={spec.hostname}"
    if spec.tsc_khz:
        args += f" tsc_early_khz={spec.tsc_khz}"
    return args


def chain_blockdev(chain: list[list[str]], *, writable: bool = True) -> dict[str, object]:
    """A block node graph for a disk chain ([path, format], top first).

    The whole chain is spelled out, so the backing-file names recorded inside
    qcow2 headers are never used: a bundle or layer moved from elsewhere
    cannot point QEMU at another file.  Only the top node may be writable.
    """
    node: dict[str, object] | None = None
    for path, fmt in reversed(chain):
        spec: dict[str, object] = {"driver": fmt, "read-only": True, "file": {"driver": "file", "filename": path}}
        if fmt == "qcow2":
            spec["backing"] = node
        node = spec
    assert node is not None
    node["read-only"] = not writable
    if writable:
        node["node-name"] = "disk0"
    return node


def option_value(path: Path) -> str:
    """A path inside a QEMU ``key=value,...`` option: a comma there would start the next key."""
    return str(path).replace(",", ",,")


@functools.cache
def private_ram_read_only() -> bool:
    """Whether QEMU maps a private (``share=off``) RAM file copy-on-write from a read-only
    descriptor (``readonly=on,rom=off``, QEMU 8.2): a fork sibling then cannot write into
    the template its siblings map.  Older QEMU opens it for writing."""
    major, minor = (int(part) for part in qemu_version().split(".")[:2])
    return (major, minor) >= (8, 2)


def _socket_chardev(name: str, path: Path, fd: int | None) -> str:
    """A listening chardev: on ``fd`` (a listening socket passed to QEMU), else QEMU binds ``path``."""
    where = f"fd={fd}" if fd is not None else f"path={option_value(path)}"
    return f"socket,id={name},{where},server=on,wait=off"


def command_line(launch: VmmLaunch, *, agent_fd: int | None = None, control_fd: int | None = None) -> list[str]:
    """The QEMU argv.  The serial console is QEMU's stdout (copied into a capped log).  The
    agent and control sockets are the listening descriptors given, else paths QEMU creates."""
    machine = launch.hardware
    accel = f"tcg,tb-size={TCG_TB_SIZE_MIB}" if machine.accel == "tcg" else "kvm"
    share = "on" if launch.ram_shared else "off"
    if not launch.ram_shared and private_ram_read_only():
        share += ",readonly=on,rom=off"  # copy-on-write over a file opened read-only
    ram_file = option_value(launch.ram_file)
    return [
        qemu_binary(),
        "-M", f"{MACHINE_TYPE},memory-backend=ram0",
        "-accel", accel,
        "-cpu", "max" if machine.accel == "tcg" else "host",
        "-smp", str(machine.cpus),
        "-m", f"{machine.memory_mib}M",
        "-object", f"memory-backend-file,id=ram0,size={machine.memory_mib}M,mem-path={ram_file},share={share}",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        *sandbox_options(),
        "-kernel", str(machine.kernel),
        "-initrd", str(machine.initrd),
        "-append", kernel_cmdline(machine),
        "-serial", "stdio",
        "-device", "virtio-serial-device",
        "-chardev", _socket_chardev("agent", launch.agent_socket, agent_fd),
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        "-blockdev", json.dumps(chain_blockdev(launch.disk_chain)),
        "-device", "virtio-blk-device,drive=disk0,id=vblk0",
        "-chardev", _socket_chardev("qmp", launch.control_socket, control_fd),
        "-mon", "chardev=qmp,mode=control",
        *(["-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0"] if machine.network else []),
        *(["-incoming", "defer"] if launch.incoming else []),
        *(["-S"] if launch.never_run else []),
    ]  # fmt: skip
