"""machinen guest agent: runs inside the VM as PID 1 (stdlib + msgpack only).

PID 1 mounts the basics, then forks: the parent only reaps orphans (and
respawns the server if it dies), the child serves the host over the
virtio-serial port ``org.machinen.agent`` using the frames in ``wire``.

Threads, not asyncio: every call gets its own threads (one that starts it,
then a process waiter, one pump per output pipe, one writer for input), so a
slow consumer of one call never stalls another, and blocking
``os.read``/``os.write`` on pipes and on the port stay simple.  The thread
that reads the port only dispatches: it never waits for a call to start (a
spawn, a TCP connect, a file open) or for one to take its input.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import sys
import time

from ..protocol.guest_abi import GATEWAY_IP, GUEST_IP
from .dns_stub import LISTEN_ADDRESS, DnsStub
from .server import Agent, find_port
from .task import BASE_ENV, take_image_defaults


def _mount(source: str, target: str, fstype: str, options: str = "") -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    os.makedirs(target, exist_ok=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, options.encode() or None) != 0:
        err = ctypes.get_errno()
        if err != errno.EBUSY:
            print(f"agent: mount {target}: {os.strerror(err)}", file=sys.stderr)


def _interface_up(s: socket.socket, name: bytes) -> None:
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH14x", name, 0)))[1]
    fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", name, flags | IFF_UP))


def _configure_network() -> bool:
    """eth0 for QEMU user-mode networking (fixed addresses, so no DHCP client needed), if there is one."""
    if not os.path.exists("/sys/class/net/eth0"):
        return False
    SIOCSIFADDR, SIOCSIFNETMASK, SIOCADDRT = 0x8916, 0x891C, 0x890B
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:

        def sockaddr(ip: str) -> bytes:
            return struct.pack("HH4s8x", socket.AF_INET, 0, socket.inet_aton(ip))

        fcntl.ioctl(s, SIOCSIFADDR, struct.pack("16s", b"eth0") + sockaddr(GUEST_IP))
        fcntl.ioctl(s, SIOCSIFNETMASK, struct.pack("16s", b"eth0") + sockaddr("255.255.255.0"))
        _interface_up(s, b"eth0")
        # struct rtentry: pad, dst, gateway, genmask, flags (RTF_UP | RTF_GATEWAY), then the rest zeroed
        route = struct.pack("L", 0) + sockaddr("0.0.0.0") + sockaddr(GATEWAY_IP) + sockaddr("0.0.0.0")
        route += struct.pack("H", 0x0001 | 0x0002) + bytes(120 - len(route) - 2)
        fcntl.ioctl(s, SIOCADDRT, route)
    return True


def _dns_stub() -> DnsStub | None:
    """The DNS stub, bound here and served by each server PID 1 forks: PID 1 itself stays
    single-threaded (a fork of a threaded process may inherit a lock held by another thread), and
    a respawned server serves the same sockets.  /etc/resolv.conf names it once it is bound."""
    try:
        stub = DnsStub()
    except OSError as exc:
        print(f"agent: dns stub: {exc}", file=sys.stderr)
        return None
    try:  # replaced, not written through: the image's may be a symlink to anywhere
        with open("/etc/resolv.conf.machinen", "w") as f:
            f.write(f"nameserver {LISTEN_ADDRESS[0]}\noptions edns0 trust-ad\n")
        os.replace("/etc/resolv.conf.machinen", "/etc/resolv.conf")
    except OSError as exc:
        print(f"agent: /etc/resolv.conf: {exc}", file=sys.stderr)
    return stub


def _kernel_args() -> dict[str, str]:
    with open("/proc/cmdline") as f:
        return dict(arg.split("=", 1) for arg in f.read().split() if "=" in arg)


def init_system() -> DnsStub | None:
    """What an init does before services: filesystems, hostname, network (and, with one, the DNS stub)."""
    _mount("devpts", "/dev/pts", "devpts", "gid=5,mode=620,ptmxmode=666")
    _mount("tmpfs", "/dev/shm", "tmpfs", "mode=1777")
    _mount("tmpfs", "/run", "tmpfs", "mode=755")
    _mount("tmpfs", "/tmp", "tmpfs", "mode=1777")
    hostname = _kernel_args().get("machinen.hostname")
    if hostname:
        socket.sethostname(hostname)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            _interface_up(s, b"lo")
        if _configure_network():
            return _dns_stub()
    except OSError as exc:
        print(f"agent: network: {exc}", file=sys.stderr)
    return None


def reap_forever(server_pid: int, dns_stub: DnsStub | None) -> None:
    """PID 1's job: reap every orphan; bring the server back if it dies."""
    while True:
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            time.sleep(0.1)
            continue
        except InterruptedError:
            continue
        if pid == server_pid:
            print("agent: server exited; restarting", file=sys.stderr)
            time.sleep(0.2)
            server_pid = fork_server(dns_stub)


def fork_server(dns_stub: DnsStub | None) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            if dns_stub is not None:
                dns_stub.start()
            serve_port()
        finally:
            os._exit(1)
    return pid


def serve_port() -> None:
    fd = os.open(find_port(), os.O_RDWR)
    Agent(fd).serve()


def main() -> None:
    take_image_defaults()
    os.environ.update(BASE_ENV)
    if os.getpid() == 1:
        dns_stub = init_system()
        reap_forever(fork_server(dns_stub), dns_stub)
    else:
        serve_port()


if __name__ == "__main__":
    main()
