"""What a guest may reach through QEMU's user-mode network, checked on QEMU's own system calls.

QEMU's user-mode network (slirp) turns every guest connection into a socket
that QEMU itself opens on the host.  So the guest's gateway 10.0.2.2 is the
host's 127.0.0.1 (other VMs' port forwards, local databases, model servers),
and 169.254.169.254 (cloud metadata) or the host's own LAN address are one
connect away.  QEMU 7.2 has no option to refuse them (libslirp's
``disable_host_loopback`` is not exposed, ``restrict=on`` cuts everything).

So QEMU starts under a seccomp filter that hands every call that can name a
destination to the supervisor (SECCOMP_RET_USER_NOTIF): ``connect(2)``,
``sendto(2)`` with an address (UDP, ICMP), and every ``sendmsg(2)`` and
``sendmmsg(2)`` (their addresses sit in a header in QEMU's memory, which a
filter cannot read).  A thread there reads the destinations from QEMU's memory
and lets the call continue or fails it (ECONNREFUSED for a connection: the
guest sees "connection refused" at once; EPERM for a datagram).  Refused
unless allowed: loopback, link-local, cloud metadata, unspecified, multicast
and broadcast addresses (also written as IPv4-mapped or NAT64 IPv6), and every
address the host has at the time of the call.  Always allowed: port 53 of the
resolvers in /etc/resolv.conf (slirp forwards the guest's DNS there, often to
127.0.0.53).  Everything else (the internet, other machines of the LAN) is
reachable, as before.  The filter is written for the host's own system-call
ABI: a call made through any other (i386's ``int 0x80`` on x86_64, x32, arm32
on aarch64) kills the process, and on an architecture without a table here
QEMU does not start.  QEMU is trusted here: the guest chooses destinations,
not QEMU's memory, so reading the address after the stop is sound.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import itertools
import os
import platform
import select
import socket
import struct
import sys
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from pathlib import Path

from ...errors import BootError
from ...protocol.netpolicy import IPAddress, NetworkPolicy
from .egress import Destination, Egress, Verdict, hand_over, resolvers

CLOSED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8", "::1/128",  # loopback: the host's own services (slirp maps 10.0.2.2 here)
        "0.0.0.0/8", "::/128",  # "this host"
        "169.254.0.0/16", "fe80::/10",  # link-local: cloud metadata (AWS, GCP, Azure...), the host's link
        "fd00:ec2::254/128",  # AWS's metadata service over IPv6
        "100.100.100.200/32",  # Alibaba Cloud's metadata service
        "168.63.129.16/32",  # Azure's WireServer (VM agent configuration)
        "224.0.0.0/4", "ff00::/8", "255.255.255.255/32",  # multicast and broadcast
    )
)  # fmt: skip
# A NAT64 translator on the way turns 64:ff9b::a.b.c.d into a.b.c.d (RFC 6052's well-known prefix).
NAT64 = ipaddress.ip_network("64:ff9b::/96")
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


RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x10, 0x100
RTM_NEWADDR, RTM_DELADDR = 20, 21
IFA_ADDRESS, IFA_LOCAL = 1, 2
_NLMSGHDR, _IFADDRMSG, _RTATTR = struct.Struct("=IHHII"), struct.Struct("=BBBBI"), struct.Struct("=HH")


def address_changes(messages: bytes) -> Iterator[tuple[IPAddress, int]]:
    """(the address, RTM_NEWADDR or RTM_DELADDR) for each report in a read of rtnetlink messages."""
    at = 0
    while at + _NLMSGHDR.size <= len(messages):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(messages, at)
        if length < _NLMSGHDR.size:
            return
        attributes: dict[int, bytes] = {}
        offset, end = at + _NLMSGHDR.size + _IFADDRMSG.size, min(at + length, len(messages))
        while offset + _RTATTR.size <= end:
            size, attribute = _RTATTR.unpack_from(messages, offset)
            if size < _RTATTR.size:
                break
            attributes[attribute] = messages[offset + _RTATTR.size : offset + size]
            offset += (size + 3) & ~3
        # IPv4 names its own address IFA_LOCAL (IFA_ADDRESS is a point-to-point link's peer); IPv6 IFA_ADDRESS
        raw = attributes.get(IFA_LOCAL, attributes.get(IFA_ADDRESS, b""))
        if kind in (RTM_NEWADDR, RTM_DELADDR) and len(raw) in (4, 16):
            yield ipaddress.ip_address(raw), kind
        at += (length + 3) & ~3


class HostAddresses:
    """The host's addresses as they are now: ``host_addresses()`` at first, then kept up to date
    by the kernel's reports of address changes (rtnetlink), which are queued before the command
    that changed an address returns; without changes a question costs one non-blocking recv.
    An added address is taken from its report: the kernel sends it before it adds the address's
    local route, which /proc/net/fib_trie lists.  A removal reads everything again (a route not
    yet gone keeps the address closed a while: the safe side), and so do lost reports."""

    def __init__(self) -> None:
        flags = socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        self._changes = socket.socket(socket.AF_NETLINK, flags, socket.NETLINK_ROUTE)
        self._changes.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))  # before reading: no change falls between
        self._known = frozenset(host_addresses())

    def __contains__(self, address: object) -> bool:
        last: dict[IPAddress, int] = {}  # each changed address: its last report
        lost = False
        while True:
            try:
                last.update(address_changes(self._changes.recv(65536)))
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: reports were dropped
                lost = True
        if lost or RTM_DELADDR in last.values():
            self._known = frozenset(host_addresses())
        self._known |= {changed for changed, kind in last.items() if kind == RTM_NEWADDR}
        return address in self._known

    def close(self) -> None:
        self._changes.close()


def reached(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one leads to (IPv4-mapped, or NAT64's well-known prefix), else itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


@dataclass(frozen=True)
class Policy:
    """What QEMU's calls for one guest may reach: the host's addresses and resolvers as they are,
    and the VM's ``Egress`` (its ``NetworkPolicy``, the names resolved for it, its proxy)."""

    host: Container[IPAddress]  # a HostAddresses (Policy.current), or a fixed set
    dns: frozenset[IPAddress]
    egress: Egress

    @classmethod
    def current(cls, network: NetworkPolicy) -> Policy:
        return cls(HostAddresses(), frozenset(resolvers()), Egress(network))

    def verdict(self, address: IPAddress, port: int, *, connecting: bool) -> Verdict:
        """What becomes of a connection (``connecting``) or a datagram to ``address``:``port``."""
        network = self.egress.policy
        address = reached(address)
        if any(rule.matches(address, port) for rule in network.denied_addresses):
            return Verdict.REFUSE
        if any(rule.matches(address, port) for rule in network.allowed_addresses):
            return Verdict.ALLOW
        if port == DNS_PORT and address in self.dns:  # slirp sends the guest's 10.0.2.3 there
            if connecting:
                return Verdict.DNS
            return Verdict.REFUSE if network.is_allow_list else Verdict.ALLOW  # UDP: the host's own answer
        if address in self.host or any(address in closed for closed in CLOSED_NETWORKS):
            return Verdict.REFUSE
        if not network.is_allow_list:  # open: the proxy sees TCP only for denied names or secrets
            return Verdict.PROXY if connecting and (network.denied_names or self.egress.secrets) else Verdict.ALLOW
        if connecting and any(network.reaches(name, port) for name in self.egress.resolved.names_for(address)):
            return Verdict.PROXY
        return Verdict.REFUSE  # an allow list: no datagram to a name (QUIC falls back to TCP)

    def permits(self, address: IPAddress, port: int) -> bool:
        """Whether a datagram to ``address``:``port`` may go."""
        return self.verdict(address, port, connecting=False) is Verdict.ALLOW

    def close(self) -> None:
        if isinstance(self.host, HostAddresses):
            self.host.close()


def destination(sockaddr: bytes, *, unspec_is_inet: bool = False) -> tuple[IPAddress, int] | None:
    """(address, port) of an IPv4/IPv6 sockaddr; None for other families (unix sockets...).
    ``unspec_is_inet`` for a datagram's address: IPv4 UDP and raw sockets send to an AF_UNSPEC
    address as if it were AF_INET (a BSD compatibility quirk of Linux)."""
    if len(sockaddr) < 2:
        return None
    (family,) = struct.unpack_from("=H", sockaddr)
    if unspec_is_inet and family == socket.AF_UNSPEC:
        family = socket.AF_INET
    if family == socket.AF_INET and len(sockaddr) >= 8:
        return ipaddress.IPv4Address(sockaddr[4:8]), struct.unpack_from("!H", sockaddr, 2)[0]
    if family == socket.AF_INET6 and len(sockaddr) >= 24:
        return ipaddress.IPv6Address(sockaddr[8:24]), struct.unpack_from("!H", sockaddr, 2)[0]
    return None


# --- the seccomp filter --------------------------------------------------------------------------


@dataclass(frozen=True)
class Abi:
    """One native system-call ABI: the filter's ``arch`` value and the calls it checks."""

    audit_arch: int
    connect: int
    sendto: int
    sendmsg: int
    sendmmsg: int
    seccomp: int
    io_uring_setup: int
    # x86_64 also runs x32 calls under its own arch value, as nr | this bit: killed, never checked
    x32_bit: int = 0


# Only 64-bit little-endian ABIs: the filter reads an argument's halves and the supervisor the
# message headers in that layout.  From the kernel's uapi (asm/unistd_64.h, asm-generic/unistd.h).
ABIS = {
    "x86_64": Abi(
        0xC000003E, connect=42, sendto=44, sendmsg=46, sendmmsg=307, seccomp=317, io_uring_setup=425, x32_bit=0x40000000
    ),
    "aarch64": Abi(0xC00000B7, connect=203, sendto=206, sendmsg=211, sendmmsg=269, seccomp=277, io_uring_setup=425),
}


def native_abi() -> Abi:
    """This host's ABI, or BootError: QEMU never runs with its network unguarded."""
    machine = platform.machine()
    if machine not in ABIS:
        raise BootError(f"QEMU's network filter is not written for this host's architecture ({machine}; "
                        f"known: {', '.join(ABIS)}): start the VM without a network",
                        code="BOOT_NETWORK_GUARD_FAILED")  # fmt: skip
    return ABIS[machine]


SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER = 1, 1 << 3
SECCOMP_RET_ALLOW, SECCOMP_RET_USER_NOTIF, SECCOMP_RET_KILL_PROCESS = 0x7FFF0000, 0x7FC00000, 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_IOCTL_NOTIF_RECV, SECCOMP_IOCTL_NOTIF_SEND, SECCOMP_IOCTL_NOTIF_ID_VALID = 0xC0502100, 0xC0182101, 0x40082102
# struct seccomp_data offsets: nr, arch, instruction pointer, then args[6] (u64 each)
_NR, _ARCH, _ARG = 0, 4, 16
# BPF: ld/jeq/jge/ret encodings
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06


def _assemble(*program: str | tuple) -> bytes:
    """BPF from ``(code, k)`` and ``(code, k, if_true, if_false)``, where a jump target names the
    string entry that labels the instruction after it, and None goes on to the next instruction."""
    labels: dict[str | None, int] = {}
    instructions: list[tuple] = []
    for entry in program:
        if isinstance(entry, str):
            labels[entry] = len(instructions)
        else:
            instructions.append(entry)
    out = []
    for at, (code, k, *targets) in enumerate(instructions):
        jt, jf = (0 if target is None else labels[target] - at - 1 for target in (targets or (None, None)))
        out.append(struct.pack("=HBBI", code, jt, jf, k))
    return b"".join(out)


def filter_program(abi: Abi) -> bytes:
    """Calls that can name a destination notify the supervisor, sendto() only with an address;
    io_uring_setup() fails (ENOSYS: QEMU falls back to ppoll/epoll), since a ring's connect and
    send operations never pass through this filter; any call of another ABI kills the process;
    everything else is allowed."""
    dest_addr = _ARG + 8 * 4  # sendto's 5th argument, low half first (little-endian)
    return _assemble(
        (_LD_W_ABS, _ARCH),
        (_JEQ_K, abi.audit_arch, None, "kill"),
        (_LD_W_ABS, _NR),
        *([(_JEQ_K, 0xFFFFFFFF, "allow", None),  # -1: a call a tracer skipped (ENOSYS), as libseccomp
           (_JGE_K, abi.x32_bit, "kill", None)] if abi.x32_bit else []),
        (_JEQ_K, abi.io_uring_setup, "no_rings", None),
        (_JEQ_K, abi.connect, "notify", None),
        (_JEQ_K, abi.sendmsg, "notify", None),
        (_JEQ_K, abi.sendmmsg, "notify", None),
        (_JEQ_K, abi.sendto, None, "allow"),
        (_LD_W_ABS, dest_addr),
        (_JEQ_K, 0, None, "notify"),
        (_LD_W_ABS, dest_addr + 4),
        (_JEQ_K, 0, "allow", "notify"),  # null: a connected socket's send()
        "notify", (_RET_K, SECCOMP_RET_USER_NOTIF),
        "allow", (_RET_K, SECCOMP_RET_ALLOW),
        "no_rings", (_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS),
        "kill", (_RET_K, SECCOMP_RET_KILL_PROCESS),
    )  # fmt: skip


# Runs in the process that becomes QEMU (python -I -S: no site, a few ms): install the filter
# with a listener, hand the listener to the supervisor over the socket, exec the rest of argv.
# The filter goes on this thread only (no TSYNC), and a thread started before it sends the
# listener: the filter holds every sendmsg() for the supervisor, which has no listener yet.
_INSTALL = """
import ctypes, os, socket, sys, threading
program, channel, argv = bytes.fromhex(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
libc = ctypes.CDLL(None, use_errno=True)
class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
installed, listener = threading.Lock(), []
def hand_over():
    with installed, socket.socket(fileno=channel) as sock:
        socket.send_fds(sock, [b"l"], listener)
installed.acquire()
sender = threading.Thread(target=hand_over, daemon=True)
sender.start()
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    sys.exit("machinen netguard: prctl: " + os.strerror(ctypes.get_errno()))
fd = libc.syscall({nr}, {mode}, {flags}, ctypes.byref(Program(len(program) // 8, program)))
if fd < 0:
    sys.exit("machinen netguard: seccomp: " + os.strerror(ctypes.get_errno()))
listener.append(fd)
installed.release()
sender.join()
os.close(fd)
os.execvp(argv[0], argv)
"""


def guarded_argv(argv: list[str], channel_fd: int) -> list[str]:
    """``argv`` run under the filter; the listener arrives on ``channel_fd``'s peer.  BootError
    on a host whose architecture the filter is not written for."""
    abi = native_abi()
    shim = _INSTALL.format(nr=abi.seccomp, mode=SECCOMP_SET_MODE_FILTER, flags=SECCOMP_FILTER_FLAG_NEW_LISTENER)
    return [sys.executable, "-I", "-S", "-c", shim, filter_program(abi).hex(), str(channel_fd), *argv]


class _Notification(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("nr", ctypes.c_int32), ("arch", ctypes.c_uint32), ("ip", ctypes.c_uint64),
                ("args", ctypes.c_uint64 * 6)]  # fmt: skip


class _Response(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("val", ctypes.c_int64), ("error", ctypes.c_int32), ("flags", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
MAX_SOCKADDR = 128
MSGHDR_NAME = "=Qi"  # struct msghdr begins with msg_name and msg_namelen
MMSGHDR_SIZE = 64  # struct mmsghdr: a 56-byte msghdr, then msg_len, padded
UIO_MAXIOV = 1024  # sendmmsg() sends at most this many of its messages


def named_sockaddrs(abi: Abi, nr: int, args: list[int], read: Callable[[int, int], bytes]) -> list[bytes]:
    """The sockaddrs a notified call connects or sends to (none: a sendmsg without an address);
    ``read(pointer, size)`` reads the caller's memory.  struct.error if a header is cut short."""
    if nr == abi.connect:
        return [read(args[1], min(args[2], MAX_SOCKADDR))]
    if nr == abi.sendto:
        return [read(args[4], min(args[5], MAX_SOCKADDR))]
    count = 1 if nr == abi.sendmsg else min(args[2] & 0xFFFFFFFF, UIO_MAXIOV)  # vlen: an unsigned int
    headers = read(args[1], count * MMSGHDR_SIZE if nr == abi.sendmmsg else struct.calcsize(MSGHDR_NAME))
    names = []
    for index in range(count):
        pointer, length = struct.unpack_from(MSGHDR_NAME, headers, index * MMSGHDR_SIZE)
        if pointer and length > 0:  # what the kernel takes for an address (a zero length: none)
            names.append(read(pointer, min(length, MAX_SOCKADDR)))
    return names


class Guard:
    """Answers the filter's notifications for one QEMU until it exits."""

    listener: int
    policy: Policy
    on_refused: Callable[[IPAddress, int], None]

    def __init__(self, listener: int, policy: Policy, on_refused: Callable[[IPAddress, int], None]) -> None:
        self.listener, self.policy, self.on_refused = listener, policy, on_refused
        self.abi: Abi = native_abi()

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
            self.policy.close()

    def _answer_one(self) -> None:
        notification = _Notification()
        if _libc.ioctl(self.listener, SECCOMP_IOCTL_NOTIF_RECV, ctypes.byref(notification)) != 0:
            return  # the caller died or was interrupted meanwhile (ENOENT/EINTR)
        connecting = notification.nr == self.abi.connect
        verdict, refused, target = Verdict.REFUSE, None, None
        try:
            with open(f"/proc/{notification.pid}/mem", "rb", buffering=0) as memory:
                names = named_sockaddrs(self.abi, notification.nr, list(notification.args),
                                        lambda pointer, size: os.pread(memory.fileno(), size, pointer))  # fmt: skip
            targets = [t for name in names if (t := destination(name, unspec_is_inet=not connecting)) is not None]
            verdict = Verdict.ALLOW
            for target in targets:  # a connect names one; a sendmmsg may name many, each must pass
                verdict = self.policy.verdict(*target, connecting=connecting)
                if verdict is Verdict.REFUSE:
                    refused = target
                    break
        except (OSError, struct.error):  # unreadable: the kernel would have failed it (EFAULT)
            verdict = Verdict.REFUSE
        # The id still pending means the pid read above was that thread's, not a reused one.
        if not self._still_pending(notification.id):
            return
        response = _Response(id=notification.id)
        if verdict is Verdict.ALLOW:
            response.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE
        elif verdict is Verdict.REFUSE or target is None:
            response.error = -(errno.ECONNREFUSED if connecting else errno.EPERM)
            if refused is not None:
                self.on_refused(*refused)
        else:  # a connection the egress proxy takes: QEMU's socket is connected to it here
            handed = Destination(*target, dns=verdict is Verdict.DNS)
            try:
                result = hand_over(_libc.syscall, notification.pid, notification.args[0], self.policy.egress, handed)
            except OSError as error:  # QEMU's thread died meanwhile (ESRCH)...
                result = error.errno or errno.ECONNREFUSED
            if result:
                response.val, response.error = -1, -result
        _libc.ioctl(self.listener, SECCOMP_IOCTL_NOTIF_SEND, ctypes.byref(response))

    def _still_pending(self, notification_id: int) -> bool:
        return (
            _libc.ioctl(self.listener, SECCOMP_IOCTL_NOTIF_ID_VALID, ctypes.byref(ctypes.c_uint64(notification_id)))
            == 0
        )


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
