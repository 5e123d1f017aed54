"""The network guard (vmm/qemu/netguard.py, issue 24 item 7) without a VM: its decisions, its
seccomp filter run for real on small Python children, and the host's addresses as they change.

Traffic goes only to 127.0.0.1 and to addresses of network namespaces the tests create.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import platform
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import anyio.abc
import anyio.from_thread
import pytest

from machinen_async import MachinenError
from machinen_async.protocol.netpolicy import NetworkPolicy
from machinen_async.vmm.qemu import netguard
from machinen_async.vmm.qemu.egress import Destination, Egress

real_filter = pytest.mark.skipif(platform.machine() not in netguard.ABIS, reason="no filter for this architecture")


@contextmanager
def guarded(code: str, policy: netguard.Policy, *args: str) -> Iterator[tuple[subprocess.Popen, list]]:
    """``python -c code args`` under the guard, as the QEMU backend runs QEMU: (the process, with
    pipes on its stdin and stdout; the destinations refused so far).  Waits for it on exit."""
    refused: list = []
    ours, theirs = socket.socketpair()
    with ours, theirs:
        child = subprocess.Popen(
            netguard.guarded_argv([sys.executable, "-c", code, *args], theirs.fileno()),
            pass_fds=[theirs.fileno()], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        theirs.close()
        ours.settimeout(30)
        guard = netguard.Guard(netguard.receive_listener(ours), policy, lambda *target: refused.append(target))
    serving = threading.Thread(target=guard.serve)
    serving.start()
    with child:
        yield child, refused
    serving.join(timeout=10)
    assert not serving.is_alive()


def run_guarded(code: str, policy: netguard.Policy, *args: str) -> tuple[int, str, list]:
    """(exit status, stdout, the destinations refused) of ``guarded``."""
    with guarded(code, policy, *args) as (child, refused):
        out, _ = child.communicate(timeout=60)
    return child.returncode, out.decode(), refused


def policy_of(*allow: str, host: frozenset = frozenset(), dns: frozenset = frozenset()) -> netguard.Policy:
    return netguard.Policy(host=host, dns=dns, egress=Egress(NetworkPolicy(allow=allow), upstream=[]))


CLOSED_HOST = policy_of(host=frozenset({ipaddress.ip_address("192.0.2.7")}))


# --- decisions -----------------------------------------------------------------------------------


def test_metadata_services_and_every_spelling_of_a_closed_address_are_refused():
    refused = [
        "169.254.169.254",  # cloud metadata (AWS, GCP, Azure, OpenStack...)
        "fd00:ec2::254",  # AWS's metadata over IPv6
        "100.100.100.200",  # Alibaba Cloud's metadata
        "168.63.129.16",  # Azure's WireServer
        "192.0.2.7",  # an address of the host
        "::ffff:169.254.169.254", "::ffff:100.100.100.200", "::ffff:168.63.129.16", "::ffff:192.0.2.7",
        "::ffff:127.0.0.1", "::ffff:0.0.0.0", "::ffff:224.0.0.251", "::ffff:255.255.255.255",
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b::100.100.100.200", "64:ff9b::168.63.129.16", "64:ff9b::192.0.2.7",
        "64:ff9b::127.0.0.1", "64:ff9b::0.0.0.0", "64:ff9b::224.0.0.251", "64:ff9b::255.255.255.255",
    ]  # fmt: skip
    for address in refused:
        assert not CLOSED_HOST.permits(ipaddress.ip_address(address), 80), address
    reachable = [
        "100.100.100.100",  # a tailnet's DNS, not metadata: the rest of 100.64.0.0/10 stays open
        "fd00:ec2::1", "2001:db8::1", "192.0.2.8",
        "::ffff:192.0.2.8", "64:ff9b::192.0.2.8",  # NAT64 of an address open anyway
    ]  # fmt: skip
    for address in reachable:
        assert CLOSED_HOST.permits(ipaddress.ip_address(address), 80), address


def test_allow_rules_and_resolvers_apply_to_where_an_address_leads():
    policy = policy_of("127.0.0.1:8080", "169.254.169.254:80", dns=frozenset({ipaddress.ip_address("127.0.0.53")}))
    for address in ("127.0.0.1", "::ffff:127.0.0.1", "64:ff9b::127.0.0.1"):
        assert policy.permits(ipaddress.ip_address(address), 8080) and not policy.permits(
            ipaddress.ip_address(address), 8081
        ), address
    assert policy.permits(ipaddress.ip_address("64:ff9b::a9fe:a9fe"), 80)
    assert policy.permits(ipaddress.ip_address("::ffff:127.0.0.53"), 53)


def test_a_datagram_to_an_unspecified_family_is_read_as_ipv4():
    """Linux's IPv4 UDP and raw sockets send to an AF_UNSPEC address as to AF_INET."""
    unspec = struct.pack("=H", socket.AF_UNSPEC) + struct.pack("!H", 9) + socket.inet_aton("127.0.0.1") + bytes(8)
    assert netguard.destination(unspec, unspec_is_inet=True) == (ipaddress.ip_address("127.0.0.1"), 9)
    assert netguard.destination(unspec) is None  # connect(AF_UNSPEC) only dissolves an association


# --- the filter ----------------------------------------------------------------------------------


def _run_bpf(program: bytes, nr: int, arch: int, args: tuple[int, ...] = (0,) * 6) -> int:
    """What the kernel would do with a call: a classic BPF interpreter for the filter's opcodes."""
    data = struct.pack("=IIQ6Q", nr, arch, 0, *args)
    instructions = [struct.unpack_from("=HBBI", program, at) for at in range(0, len(program), 8)]
    accumulator, pc = 0, 0
    while True:
        code, jt, jf, k = instructions[pc]
        pc += 1
        if code == 0x20:  # ld [k]
            (accumulator,) = struct.unpack_from("=I", data, k)
        elif code in (0x15, 0x35):  # jeq k, jge k
            taken = accumulator == k if code == 0x15 else accumulator >= k
            pc += jt if taken else jf
        elif code == 0x06:  # ret k
            return k
        else:
            raise AssertionError(f"opcode {code:#x}")


@pytest.mark.parametrize("machine", sorted(netguard.ABIS))
def test_the_filter_of_each_abi_checks_what_names_a_destination_and_kills_other_abis(machine):
    abi = netguard.ABIS[machine]
    program = netguard.filter_program(abi)
    notify, allow, kill = netguard.SECCOMP_RET_USER_NOTIF, netguard.SECCOMP_RET_ALLOW, netguard.SECCOMP_RET_KILL_PROCESS
    native = abi.audit_arch
    assert _run_bpf(program, abi.connect, native) == notify
    assert _run_bpf(program, abi.sendmsg, native) == notify
    assert _run_bpf(program, abi.sendmmsg, native) == notify
    assert _run_bpf(program, abi.sendto, native) == allow  # no address: a connected socket's send()
    assert _run_bpf(program, abi.sendto, native, (3, 0, 1, 0, 0x1000, 16)) == notify
    assert _run_bpf(program, abi.sendto, native, (3, 0, 1, 0, 0x7F00_0000_0000, 16)) == notify  # high half
    assert _run_bpf(program, abi.seccomp, native) == allow
    assert _run_bpf(program, abi.io_uring_setup, native) == netguard.SECCOMP_RET_ERRNO | errno.ENOSYS
    i386, arm = 0x40000003, 0x40000028  # the compat ABIs of x86_64 and aarch64
    for foreign in (i386, arm, *(a.audit_arch for a in netguard.ABIS.values() if a is not abi)):
        for nr in (abi.connect, abi.sendto, 0, 102):  # 102: i386's socketcall
            assert _run_bpf(program, nr, foreign) == kill, (hex(foreign), nr)
    if abi.x32_bit:
        for nr in (abi.connect, 42, 44, 46, 518, 538, 39):  # x32's connect, sendto, sendmsg, sendmmsg, getpid
            assert _run_bpf(program, abi.x32_bit | nr, native) == kill, nr
        assert _run_bpf(program, 0xFFFFFFFF, native) == allow  # -1: a call a tracer skipped


def test_no_filter_no_qemu_on_an_architecture_without_a_table(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    with pytest.raises(MachinenError) as refused:
        netguard.guarded_argv(["qemu-system-x86_64"], 3)
    assert refused.value.code == "BOOT_NETWORK_GUARD_FAILED" and "riscv64" in refused.value.message


X32_GETPID = "import ctypes; print(ctypes.CDLL(None).syscall(0x40000000 | 39))"
I386_GETPID = """
import ctypes, mmap
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(bytes.fromhex("b814000000cd80c3"))  # mov eax, 20 (i386's getpid); int 0x80; ret
print(ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))())
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64's other ABIs")
@pytest.mark.parametrize("code", [X32_GETPID, I386_GETPID], ids=["x32", "i386"])
def test_a_call_through_another_abi_kills_the_guarded_process(code):
    unguarded = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    if unguarded.returncode != 0:  # without the filter, int 0x80 fails only where ia32 emulation is off
        pytest.skip(f"this kernel does not run that ABI at all ({unguarded.returncode})")
    status, out, _ = run_guarded(code, CLOSED_HOST)
    assert status == -signal.SIGSYS, (status, out)


IO_URING_SETUP = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)
print(libc.syscall(425, 4, params), ctypes.get_errno())
"""


@pytest.mark.skipif(platform.machine() not in netguard.ABIS, reason="a host the filter has no table for")
def test_a_guarded_process_gets_no_io_uring():
    """A ring's connect and send operations would never pass the filter: io_uring_setup fails
    (ENOSYS), so QEMU uses ppoll/epoll, as on a kernel without io_uring."""
    status, out, _ = run_guarded(IO_URING_SETUP, CLOSED_HOST)
    assert (status, out.split()) == (0, ["-1", str(errno.ENOSYS)]), (status, out)


# --- datagrams -----------------------------------------------------------------------------------

SENDERS = """
import ctypes, errno, json, socket, struct, sys
port = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_char_p), ("len", ctypes.c_size_t)]
class msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(iovec)),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]
class mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", msghdr), ("len", ctypes.c_uint)]
def sockaddr(family):
    return struct.pack("=H", family) + struct.pack("!H", port) + socket.inet_aton("127.0.0.1") + bytes(8)
def checked(result):
    if result < 0:
        raise OSError(ctypes.get_errno(), "")
def sendmmsg(sock):
    name, payload = sockaddr(socket.AF_INET), iovec(b"sendmmsg", 8)
    messages = (mmsghdr * 2)(*(mmsghdr(msghdr(name, len(name), ctypes.pointer(payload), 1)) for _ in range(2)))
    checked(libc.sendmmsg(sock.fileno(), messages, 2, 0))
def unspec(sock):
    name = sockaddr(socket.AF_UNSPEC)
    checked(libc.sendto(sock.fileno(), b"unspec", 6, 0, name, len(name)))
udp, udp6 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
attempts = {
    "sendto": lambda: udp.sendto(b"sendto", ("127.0.0.1", port)),
    "sendmsg": lambda: udp.sendmsg([b"sendmsg"], [], 0, ("127.0.0.1", port)),
    "sendmmsg": lambda: sendmmsg(udp),
    "unspec": lambda: unspec(udp),
    "mapped": lambda: udp6.sendto(b"mapped", ("::ffff:127.0.0.1", port)),
}
a, b = socket.socketpair()
attempts["no address"] = lambda: a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("=i", 0))])
outcome = {}
for what, attempt in attempts.items():
    try:
        attempt()
        outcome[what] = "sent"
    except OSError as e:
        outcome[what] = errno.errorcode[e.errno]
print(json.dumps(outcome))
"""


def _received(sock: socket.socket) -> list[bytes]:
    sock.setblocking(False)
    datagrams = []
    while True:
        try:
            datagrams.append(sock.recv(64))
        except BlockingIOError:
            return sorted(datagrams)


@real_filter
def test_a_guarded_process_cannot_send_a_datagram_to_a_closed_host_by_any_call():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listening:
        listening.bind(("127.0.0.1", 0))
        port = listening.getsockname()[1]
        status, out, refused = run_guarded(SENDERS, CLOSED_HOST, str(port))
        assert status == 0, out
        assert json.loads(out) == {
            "sendto": "EPERM", "sendmsg": "EPERM", "sendmmsg": "EPERM", "unspec": "EPERM", "mapped": "EPERM",
            "no address": "sent",  # a message without an address (QEMU's own sockets) goes as before
        }  # fmt: skip
        assert _received(listening) == []
        assert set(refused) == {(ipaddress.ip_address(a), port) for a in ("127.0.0.1", "::ffff:127.0.0.1")}

        opened = policy_of(f"127.0.0.1:{port}")
        status, out, refused = run_guarded(SENDERS, opened, str(port))
        assert status == 0 and set(json.loads(out).values()) == {"sent"}, out
        assert _received(listening) == sorted([b"sendto", b"sendmsg", b"sendmmsg", b"sendmmsg", b"unspec", b"mapped"])
        assert refused == []


@real_filter
def test_a_refused_connection_is_refused_at_once():
    code = """
import errno, socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
except OSError as e:
    print(errno.errorcode[e.errno])
"""
    with socket.create_server(("127.0.0.1", 0)) as server:
        status, out, _ = run_guarded(code, CLOSED_HOST, str(server.getsockname()[1]))
    assert (status, out) == (0, "ECONNREFUSED\n")


# --- the host's addresses, as they change --------------------------------------------------------


# For each line on stdin (a JSON list of addresses): a datagram to each, and what became of it.
SENDER = """
import errno, json, socket, sys
for line in sys.stdin:
    outcome = {}
    for address in json.loads(line):
        try:
            socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM).sendto(
                b"x", (address, 9))
            outcome[address] = "sent"
        except OSError as e:
            outcome[address] = errno.errorcode[e.errno]
    print(json.dumps(outcome), flush=True)
"""
# Runs SENDER under the guard in a network namespace of its own (argv[1]: this folder), changing
# the addresses of an interface there after the guard started.
IN_A_NAMESPACE = """
import json, subprocess, sys
sys.path.insert(0, sys.argv[1])
from test_netguard import SENDER, guarded
from machinen_async.protocol.netpolicy import NetworkPolicy
from machinen_async.vmm.qemu import netguard
def ip(*args):
    subprocess.run(["ip", *args], check=True)
ip("link", "set", "lo", "up")
ip("link", "add", "mn-veth0", "type", "veth", "peer", "name", "mn-veth1")  # this kernel may lack dummy
for link in ("mn-veth0", "mn-veth1"):
    ip("link", "set", link, "up")
seen = {}
with guarded(SENDER, netguard.Policy.current(NetworkPolicy())) as (child, refused):
    def send(*addresses):
        child.stdin.write(json.dumps(addresses).encode() + b"\\n")
        child.stdin.flush()
        return json.loads(child.stdout.readline())
    seen["before"] = sorted(map(str, netguard.host_addresses()))
    ip("addr", "add", "10.211.0.1/24", "dev", "mn-veth0")
    ip("addr", "add", "10.211.0.5/24", "dev", "mn-veth0")
    ip("-6", "addr", "add", "fd12:3456::1/64", "dev", "mn-veth0", "nodad")
    seen["added"] = send("10.211.0.1", "10.211.0.5", "fd12:3456::1", "10.211.0.2")
    ip("addr", "del", "10.211.0.5/24", "dev", "mn-veth0")
    seen["removed"] = send("10.211.0.5")
    child.stdin.close()
seen["refused"] = sorted(str(a) for a, _ in refused)
print(json.dumps(seen))
"""


@real_filter
def test_an_address_the_host_gains_after_the_guard_started_is_closed():
    """In a network namespace of the test's own: addresses added to an interface while a guarded
    process runs are closed to it from then on (a neighbour on their link is not); one removed
    is open again."""
    namespace = ["unshare", "--map-root-user", "--net"]
    if subprocess.run([*namespace, "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    ran = subprocess.run([*namespace, sys.executable, "-c", IN_A_NAMESPACE, str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    seen = json.loads(ran.stdout)
    assert not {"10.211.0.1", "10.211.0.5", "fd12:3456::1"} & set(seen["before"]), seen
    assert seen["added"] == {"10.211.0.1": "EPERM", "10.211.0.5": "EPERM", "fd12:3456::1": "EPERM",
                             "10.211.0.2": "sent"}, seen  # fmt: skip
    assert seen["removed"] == {"10.211.0.5": "sent"}, seen
    assert seen["refused"] == ["10.211.0.1", "10.211.0.5", "fd12:3456::1"], seen


class RecordingEgress(Egress):
    """Answers every handed-over connection with where the guest meant it to go."""

    async def _relay_checked(self, stream: anyio.abc.SocketStream, destination: Destination) -> None:
        await stream.send(f"{destination.address}:{destination.port}".encode())


@real_filter
def test_a_connection_to_a_name_is_handed_to_the_egress_proxy_from_any_thread():
    """netguard takes QEMU's socket (pidfd_getfd on the thread's process, not the thread) and connects
    it to the VM's proxy, which learns the destination from the port it was bound to; the caller sees
    its own connect succeed.  An address no allowed name resolved to is refused at connect()."""
    code = """
import socket, sys, threading
def connect(address, results):
    try:
        with socket.create_connection((address, 443), timeout=10) as s:
            results.append(s.recv(100).decode())
    except OSError as e:
        results.append(type(e).__name__)
results = []
for address in sys.argv[1:]:
    worker = threading.Thread(target=connect, args=(address, results))  # not the main thread
    worker.start()
    worker.join()
print(" ".join(results))
"""
    egress = RecordingEgress(NetworkPolicy(allow=["api.test"]), upstream=[])
    egress.resolved.record("api.test", [ipaddress.ip_address("192.0.2.10")], ttl=60)
    policy = netguard.Policy(host=frozenset(), dns=frozenset(), egress=egress)
    with anyio.from_thread.start_blocking_portal() as portal:
        serving = portal.start_task_soon(egress.serve)
        while egress.listener_for(socket.AF_INET) is None:
            time.sleep(0.01)
        status, out, refused = run_guarded(code, policy, "192.0.2.10", "192.0.2.11")
        serving.cancel()
    assert (status, out) == (0, "192.0.2.10:443 ConnectionRefusedError\n")
    assert refused == [(ipaddress.ip_address("192.0.2.11"), 443)]


def test_verdicts_by_name_and_address():
    """What netguard does with each call under an allow list and under the open default."""
    resolver, named, other = (ipaddress.ip_address(a) for a in ("10.255.255.53", "192.0.2.10", "192.0.2.11"))
    listed = Egress(NetworkPolicy(allow=["api.test:443", "10.9.0.0/16"], deny=["10.9.9.9"]), upstream=[])
    listed.resolved.record("api.test", [named], ttl=60)
    policy = netguard.Policy(host=frozenset(), dns=frozenset({resolver}), egress=listed)
    Verdict = netguard.Verdict
    assert policy.verdict(resolver, 53, connecting=True) is Verdict.DNS  # slirp's 10.0.2.3, over TCP
    assert policy.verdict(resolver, 53, connecting=False) is Verdict.REFUSE  # UDP DNS would bypass the resolver
    assert policy.verdict(named, 443, connecting=True) is Verdict.PROXY
    assert policy.verdict(named, 80, connecting=True) is Verdict.REFUSE  # the rule's port only
    assert policy.verdict(named, 443, connecting=False) is Verdict.REFUSE  # no datagram to a name
    assert policy.verdict(other, 443, connecting=True) is Verdict.REFUSE  # nothing resolved to it
    assert policy.verdict(ipaddress.ip_address("10.9.1.1"), 22, connecting=True) is Verdict.ALLOW  # an address rule
    assert policy.verdict(ipaddress.ip_address("10.9.9.9"), 22, connecting=True) is Verdict.REFUSE  # deny wins
    assert policy.verdict(ipaddress.ip_address("127.0.0.1"), 443, connecting=True) is Verdict.REFUSE
    listed.policy = NetworkPolicy()  # set_network: open again
    assert policy.verdict(other, 443, connecting=True) is Verdict.ALLOW
    assert policy.verdict(resolver, 53, connecting=False) is Verdict.ALLOW
    listed.policy = NetworkPolicy(deny=["ads.test"])  # open, with a name to refuse: TCP is checked by name
    assert policy.verdict(other, 443, connecting=True) is Verdict.PROXY
    assert policy.verdict(other, 443, connecting=False) is Verdict.ALLOW
