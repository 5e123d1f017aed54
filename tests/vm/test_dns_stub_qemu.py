"""The guest's DNS stub (guest/dns_stub.py, issue 29) in a real VM with a network: resolv.conf names
it, it listens on 127.0.0.53:53 over UDP and TCP, every query gets an answer or a SERVFAIL, and a
flood from inside the guest leaves the agent serving.

No resolver of machinen's answers on the host yet: what slirp does with the stub's TCP connection
to 10.0.2.3:53 (the host's resolver, or nothing) decides between an answer and a SERVFAIL, so the
test takes either.  The names asked are under ``invalid.`` (RFC 6761), which no resolver finds.
"""

from __future__ import annotations

import pytest

from machinen_async import connect

pytestmark = pytest.mark.anyio

# Python in the guest (the base image has python3): ``ask udp|tcp NAME`` prints the reply's rcode,
# or "none" if every try timed out; ``flood N`` sends N UDP queries without waiting for replies.
GUEST_CLIENT = r"""
import socket, struct, sys

STUB = ("127.0.0.53", 53)

def query(name, ident):
    labels = b"".join(bytes([len(label)]) + label.encode() for label in name.split("."))
    return struct.pack("!6H", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", 1, 1)

def check(reply, ident):
    got, flags = struct.unpack("!HH", reply[:4])
    assert got == ident and flags & 0x8000, reply
    return flags & 0xF

def ask_udp(name, ident):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(20)
        s.sendto(query(name, ident), STUB)
        return check(s.recv(65536), ident)

def ask_tcp(name, ident):
    with socket.create_connection(STUB, timeout=20) as s:
        message = query(name, ident)
        s.sendall(len(message).to_bytes(2, "big") + message)
        data = b""
        while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
            chunk = s.recv(65536)
            assert chunk, "closed without an answer"
            data += chunk
        return check(data[2:], ident)

if sys.argv[1] == "flood":
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for ident in range(int(sys.argv[2])):
            s.sendto(query(f"flood{ident}.machinen.invalid", ident), STUB)
    sys.exit()
ask = ask_udp if sys.argv[2] == "udp" else ask_tcp
for attempt in range(6):  # a query the stub dropped (all its slots taken) is asked again, as a client would
    try:
        print(ask(sys.argv[3], 4242 + attempt))
        break
    except socket.timeout:
        continue
else:
    print("none")
"""
NOERROR, SERVFAIL, NXDOMAIN, REFUSED = "0", "2", "3", "5"


async def test_the_stub_listens_answers_and_survives_a_flood(shared_vm):
    async with connect(shared_vm) as vm:
        assert await vm.read_file("/etc/resolv.conf") == b"nameserver 127.0.0.53\noptions edns0 trust-ad\n"
        udp = (await vm.exec(["cat", "/proc/net/udp"], check=True)).stdout.decode()
        tcp = (await vm.exec(["cat", "/proc/net/tcp"], check=True)).stdout.decode()
        assert any(line.split()[1] == "3500007F:0035" for line in udp.splitlines()[1:]), udp
        assert any(line.split()[1:4:2] == ["3500007F:0035", "0A"] for line in tcp.splitlines()[1:]), tcp

        await vm.write_file("/tmp/dns_client.py", GUEST_CLIENT.encode())
        for transport in ("udp", "tcp"):
            asked = await vm.exec(["python3", "/tmp/dns_client.py", "ask", transport, "one.machinen.invalid"],
                                  check=True, timeout=300)  # fmt: skip
            assert asked.stdout.decode().strip() in (NOERROR, SERVFAIL, NXDOMAIN, REFUSED), (transport, asked)

        await vm.exec(["python3", "/tmp/dns_client.py", "flood", "500"], check=True, timeout=300)
        assert (await vm.exec(["echo", "still here"], check=True)).stdout == b"still here\n"
        after = await vm.exec(["python3", "/tmp/dns_client.py", "ask", "udp", "after.machinen.invalid"],
                              check=True, timeout=300)  # fmt: skip
        assert after.stdout.decode().strip() in (NOERROR, SERVFAIL, NXDOMAIN, REFUSED), after
