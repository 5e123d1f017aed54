"""What a guest may reach through QEMU's user-mode network, checked on QEMU's own system calls.

QEMU's user-mode network (slirp) turns every guest connection into a socket
that QEMU itself opens on the host.  So the guest's gateway 10.0.2.2 is the
host's 127.0.0.1 (other VMs' port forwards, local databases, model servers),
and 169.254.169.254 (cloud metadata) or the host's own LAN address are one
connect away.  QEMU 7.2 has no option to refuse them (libslirp's
``disable_host_loopback`` is not exposed, ``restrict=on`` cuts everything).

So QEMU starts under a seccomp filter that hands its ``connect(2)`` calls, and
its ``sendto(2)`` calls that name a destination (UDP, ICMP), to the
supervisor (SECCOMP_RET_USER_NOTIF).  A thread there reads the destination
from QEMU's memory and lets the call continue or fails it (ECONNREFUSED for a
connection: the guest sees "connection refused" at once; EPERM for a
datagram).  Refused unless allowed: loopback, link-local, unspecified,
multicast and broadcast addresses, and every address of the host itself.
Always allowed: port 53 of the resolvers in /etc/resolv.conf (slirp forwards
the guest's DNS there, often to 127.0.0.53).  Everything else (the internet,
other machines of the LAN) is reachable, as before.  QEMU is trusted here:
the guest chooses destinations, not QEMU's memory, so reading the address
after the stop is sound.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import itertools
import os
import select
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from ...errors import BootError
from ...protocol.netpolicy import IPAddress, Rule, parse_rule

CLOSED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8", "::1/128",  # loopback: the host's own services (slirp maps 10.0.2.2 here)
        "0.0.0.0/8", "::/128",  # "this host"
        "169.254.0.0/16", "fe80::/10",  # link-local: cloud metadata, the host's link
        "224.0.0.0/4", "ff00::/8", "255.255.255.255/32",  # multicast and broadcast
    )
)  # fmt: skip
DNS_PORT = 53


def host_addresses() -> set[IPAddress]:
    """Every address of this host's own interfaces (a guest reaching one reaches host services)."""
    found: set[IPAddress] = set()
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        for previous, line in itertools.pairwise(lines):
            if line.strip() == "/32 host LOCAL":
                found.add(ipaddress.ip_address(previous.split()[-1]))
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            found.add(ipaddress.ip_address(bytes.fromhex(line.split()[0])))
    except (OSError, ValueError):
        pass
    return found


def resolvers() -> set[IPAddress]:
    """The nameservers slirp forwards the guest's DNS queries to."""
    found: set[IPAddress] = set()
    try:
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "nameserver":
                found.add(ipaddress.ip_address(fields[1].split("%")[0]))
    except (OSError, ValueError):
        pass
    return found


@dataclass(frozen=True)
class Policy:
    allow: tuple[Rule, ...]
    host: frozenset[IPAddress]
    dns: frozenset[IPAddress]

    @classmethod
    def current(cls, allow: list[str]) -> Policy:
        return cls(tuple(parse_rule(r) for r in allow), frozenset(host_addresses()), frozenset(resolvers()))

    def permits(self, address: IPAddress, port: int) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(rule.matches(address, port) for rule in self.allow):
            return True
        if port == DNS_PORT and address in self.dns:
            return True
        return address not in self.host and not any(address in network for network in CLOSED_NETWORKS)


def destination(sockaddr: bytes) -> tuple[IPAddress, int] | None:
    """(address, port) of an IPv4/IPv6 sockaddr; None for other families (unix sockets...)."""
    if len(sockaddr) < 2:
        return None
    (family,) = struct.unpack_from("=H", sockaddr)
    if family == socket.AF_INET and len(sockaddr) >= 8:
        return ipaddress.IPv4Address(sockaddr[4:8]), struct.unpack_from("!H", sockaddr, 2)[0]
    if family == socket.AF_INET6 and len(sockaddr) >= 24:
        return ipaddress.IPv6Address(sockaddr[8:24]), struct.unpack_from("!H", sockaddr, 2)[0]
    return None


# --- the seccomp filter --------------------------------------------------------------------------

AUDIT_ARCH_X86_64 = 0xC000003E
NR_CONNECT, NR_SENDTO, NR_SECCOMP = 42, 44, 317
SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER = 1, 1 << 3
SECCOMP_RET_ALLOW, SECCOMP_RET_USER_NOTIF = 0x7FFF0000, 0x7FC00000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_IOCTL_NOTIF_RECV, SECCOMP_IOCTL_NOTIF_SEND, SECCOMP_IOCTL_NOTIF_ID_VALID = 0xC0502100, 0xC0182101, 0x40082102
# struct seccomp_data offsets: nr, arch, instruction pointer, then args[6] (u64 each)
_NR, _ARCH, _ARG = 0, 4, 16
# BPF: ld/jeq/ret encodings
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def filter_program() -> bytes:
    """connect() and addressed sendto() notify the supervisor; everything else is allowed."""
    return b"".join([
        _insn(_LD_W_ABS, 0, 0, _ARCH),
        _insn(_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        _insn(_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        _insn(_LD_W_ABS, 0, 0, _NR),
        _insn(_JEQ_K, 5, 0, NR_CONNECT),  # -> notify
        _insn(_JEQ_K, 0, 5, NR_SENDTO),  # not sendto -> allow
        _insn(_LD_W_ABS, 0, 0, _ARG + 8 * 4),  # dest_addr, low half
        _insn(_JEQ_K, 0, 2, 0),  # non-null -> notify
        _insn(_LD_W_ABS, 0, 0, _ARG + 8 * 4 + 4),  # high half
        _insn(_JEQ_K, 1, 0, 0),  # null (a connected socket's send) -> allow
        _insn(_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),
        _insn(_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ])  # fmt: skip


# Runs in the process that becomes QEMU (python -I -S: no site, a few ms): install the filter
# with a listener, hand the listener to the supervisor over the socket, exec the rest of argv.
_INSTALL = f"""
import ctypes, os, socket, sys
program, channel, argv = bytes.fromhex(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
libc = ctypes.CDLL(None, use_errno=True)
class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    sys.exit("machinen netguard: prctl: " + os.strerror(ctypes.get_errno()))
mode, flags = {SECCOMP_SET_MODE_FILTER}, {SECCOMP_FILTER_FLAG_NEW_LISTENER}
listener = libc.syscall({NR_SECCOMP}, mode, flags, ctypes.byref(Program(len(program) // 8, program)))
if listener < 0:
    sys.exit("machinen netguard: seccomp: " + os.strerror(ctypes.get_errno()))
with socket.socket(fileno=channel) as sock:
    socket.send_fds(sock, [b"l"], [listener])
os.close(listener)
os.execvp(argv[0], argv)
"""


def guarded_argv(argv: list[str], channel_fd: int) -> list[str]:
    """``argv`` run under the filter; the listener arrives on ``channel_fd``'s peer."""
    return [sys.executable, "-I", "-S", "-c", _INSTALL, filter_program().hex(), str(channel_fd), *argv]


class _Notification(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("nr", ctypes.c_int32), ("arch", ctypes.c_uint32), ("ip", ctypes.c_uint64),
                ("args", ctypes.c_uint64 * 6)]  # fmt: skip


class _Response(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("val", ctypes.c_int64), ("error", ctypes.c_int32), ("flags", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
MAX_SOCKADDR = 128


class Guard:
    """Answers the filter's notifications for one QEMU until it exits."""

    def __init__(self, listener: int, policy: Policy, on_refused) -> None:
        self.listener, self.policy, self.on_refused = listener, policy, on_refused

    def serve(self) -> None:
        """Blocking: run on a thread of its own (QEMU's main loop waits for every answer)."""
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        try:
            while True:
                events = poller.poll()
                if any(event & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, event in events):
                    return  # every filtered process exited
                self._answer_one()
        finally:
            os.close(self.listener)

    def _answer_one(self) -> None:
        notification = _Notification()
        if _libc.ioctl(self.listener, SECCOMP_IOCTL_NOTIF_RECV, ctypes.byref(notification)) != 0:
            return  # the caller died or was interrupted meanwhile (ENOENT/EINTR)
        pointer, length = (
            (notification.args[1], notification.args[2])
            if notification.nr == NR_CONNECT
            else (notification.args[4], notification.args[5])
        )
        refused = errno.ECONNREFUSED if notification.nr == NR_CONNECT else errno.EPERM
        try:
            with open(f"/proc/{notification.pid}/mem", "rb", buffering=0) as memory:
                sockaddr = os.pread(memory.fileno(), min(int(length), MAX_SOCKADDR), pointer)
            target = destination(sockaddr)
            allowed = target is None or self.policy.permits(*target)
        except OSError:
            target, allowed = None, False
        # The id still pending means the pid read above was that thread's, not a reused one.
        if (
            _libc.ioctl(self.listener, SECCOMP_IOCTL_NOTIF_ID_VALID, ctypes.byref(ctypes.c_uint64(notification.id)))
            != 0
        ):
            return
        response = _Response(id=notification.id)
        if allowed:
            response.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE
        else:
            response.error = -refused
            if target is not None:
                self.on_refused(*target)
        _libc.ioctl(self.listener, SECCOMP_IOCTL_NOTIF_SEND, ctypes.byref(response))


def receive_listener(channel: socket.socket) -> int:
    """The listener the filtered process sent, or BootError if it exited without one."""
    try:
        _, fds, _, _ = socket.recv_fds(channel, 1, 1)
    except OSError:
        fds = []
    if not fds:
        raise BootError("QEMU's network filter could not be installed (seccomp user notification "
                        "needs Linux 5.5 or later)", code="BOOT_NETWORK_GUARD_FAILED")  # fmt: skip
    return fds[0]
