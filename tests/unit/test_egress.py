"""The egress proxy and resolver's logic without a VM (vmm/qemu/egress.py): what a connection's
first bytes name, what the policy lets through, what the resolver answers and remembers.  The
real path (a guest, QEMU, netguard's hand-over, test hosts) is tests/vm/test_egress_qemu.py."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import struct
import subprocess
import sys

import anyio
import dns.message
import dns.rcode
import dns.rrset
import msgpack
import pytest
import structlog.testing
from hypothesis import given
from hypothesis import strategies as st

from machinen_async import MachinenError, NetworkPolicy, cli
from machinen_async.protocol.messages import IncomingState
from machinen_async.protocol.netpolicy import NameRule, Rule, normal_name, parse_target
from machinen_async.protocol.secret import SecretRule
from machinen_async.vmm.qemu import egress
from machinen_async.vmm.qemu.egress import Destination, Egress

pytestmark = pytest.mark.anyio


def client_hello(server_name: str | None) -> bytes:
    """The first flight of a real TLS client (this Python's OpenSSL)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    if server_name is None:
        context.check_hostname = False
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_a_client_hello_names_its_server_even_cut_into_pieces():
    hello = client_hello("api.example.com")
    assert egress.classify(hello) == ("tls", "api.example.com")
    for cut in (1, 5, 40, len(hello) - 1):
        assert egress.classify(hello[:cut]) is None  # more is needed
    # The same handshake message split over two records, as a client may send it.
    body = hello[5:]
    split = b"".join(b"\x16\x03\x01" + struct.pack("!H", len(part)) + part for part in (body[:50], body[50:]))
    assert egress.classify(split) == ("tls", "api.example.com")
    assert egress.classify(client_hello(None)) == ("tls", None)
    assert egress.classify(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") == ("tls", None)  # a ServerHello


def test_an_http_request_names_its_host_once():
    assert egress.classify(b"GET / HTTP/1.1\r\nHost: Api.Example.com:8080\r\n\r\n") == ("http", "api.example.com")
    assert egress.classify(b"\r\n\r\nPOST /x HTTP/1.1\r\nhost: a.test\r\n\r\n") == ("http", "a.test")
    assert egress.classify(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n") == ("http", None)
    assert egress.classify(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n") == ("http", None)
    assert egress.classify(b"GET / HTTP/1.1\r\nHost: a.test\r\n") is None  # the head goes on
    assert egress.classify(b"GE") is None
    assert egress.classify(b"SSH-2.0-OpenSSH_9.2\r\n") == ("other", None)


@given(st.binary(max_size=300))
def test_any_first_bytes_are_classified_without_an_error(data: bytes):
    decided = egress.classify(data)
    assert decided is None or decided[0] in ("tls", "http", "other")


class Said:
    """A byte stream that says ``chunks``, then ends."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self.chunks:
            raise anyio.EndOfStream
        return self.chunks.pop(0)[:max_bytes]


async def test_a_preamble_is_read_until_it_names_something_or_ends():
    hello = client_hello("api.example.com")
    assert await egress.read_preamble(Said(hello[:30], hello[30:], b"more"), 5) == (hello, "tls", "api.example.com")
    assert await egress.read_preamble(Said(b"GE"), 5) == (b"GE", "http", None)  # cut short: names nothing
    assert await egress.read_preamble(Said(hello[:30]), 5) == (hello[:30], "tls", None)
    assert await egress.read_preamble(Said(), 5) == (b"", "other", None)


def test_rules_by_name_and_address():
    assert parse_target("*.githubusercontent.com") == NameRule("*.githubusercontent.com", None)
    assert parse_target("DB.internal:5432") == NameRule("db.internal", 5432)
    assert parse_target("10.1.0.0/16") == Rule(ipaddress.ip_network("10.1.0.0/16"), None)
    for bad in ("", "a..b", "-a.test", "1.2.3.400", "a.test:0", "*", "*.", "a b.test", "a.test/8", "é.test"):
        with pytest.raises(MachinenError) as refused:
            parse_target(bad)
        assert refused.value.code == "BOOT_NETWORK_RULE_INVALID", bad
    with pytest.raises(MachinenError):
        NetworkPolicy(allow="pypi.org")  # one string is not a list of rules


@given(st.from_regex(r"[a-z0-9]{1,8}(\.[a-z0-9]{1,8}){0,3}", fullmatch=True))
def test_a_wildcard_matches_names_below_it_only(label: str):
    rule = NameRule("*.example.com", None)
    assert rule.matches_name(f"{label}.example.com")
    assert not rule.matches_name("example.com") and not rule.matches_name(f"{label}example.com")
    assert not rule.matches_name(f"example.com.{label}")


def test_an_allow_list_and_deny_rules():
    open_policy = NetworkPolicy(deny=["*.ads.test"])
    assert not open_policy.is_allow_list and open_policy.resolves("anything.test")
    assert not open_policy.resolves("x.ads.test") and not open_policy.reaches("x.ads.test", 443)
    listed = NetworkPolicy(allow=["api.test:443", "*.cdn.test"], deny=["bad.cdn.test"])
    assert listed.is_allow_list and listed.resolves("api.test") and listed.resolves("a.cdn.test")
    assert listed.reaches("api.test", 443) and not listed.reaches("api.test", 80)
    assert not listed.resolves("bad.cdn.test") and not listed.resolves("cdn.test")
    assert NetworkPolicy.closed().is_allow_list and not NetworkPolicy.closed().resolves("api.test")
    assert NetworkPolicy(allow=["10.0.0.0/8"]).is_allow_list is False  # addresses alone reopen, as before
    assert NetworkPolicy.from_wire(listed.to_wire()) == listed
    assert normal_name("API.Test.") == "api.test" and normal_name("a_b.test") == "a_b.test"


def test_what_resolved_is_remembered_until_its_ttl_and_bounded(monkeypatch: pytest.MonkeyPatch):
    clock = [1000.0]
    monkeypatch.setattr(egress.time, "monotonic", lambda: clock[0])
    resolved = egress.Resolved()
    address = ipaddress.ip_address("192.0.2.1")
    resolved.record("a.test", [address], ttl=300)
    resolved.record("b.test", [address], ttl=1)  # short TTLs are stretched to MIN_TTL_S
    assert sorted(resolved.names_for(address)) == ["a.test", "b.test"]
    clock[0] += egress.MIN_TTL_S + 1
    assert resolved.names_for(address) == ["a.test"]
    for i in range(egress.MAX_NAMES_PER_ADDRESS + 10):
        resolved.record(f"n{i}.test", [address], ttl=600)
    assert len(resolved.names_for(address)) <= egress.MAX_NAMES_PER_ADDRESS
    many = [ipaddress.ip_address(0x0A000000 + i) for i in range(egress.MAX_ADDRESSES + 50)]
    resolved.record("flood.test", many, ttl=600)
    assert len(resolved._names) <= egress.MAX_ADDRESSES


def test_a_connection_is_judged_by_the_names_its_address_resolved_from():
    proxy = Egress(NetworkPolicy(allow=["api.test:443", "db.test"]), upstream=[])
    shared = ipaddress.ip_address("192.0.2.10")
    to_api = Destination(shared, 443)
    assert not proxy.permitted(to_api, "api.test", "tls")  # never resolved for this VM
    proxy.resolved.record("api.test", [shared], ttl=60)
    assert proxy.permitted(to_api, "api.test", "tls") and proxy.permitted(to_api, "api.test", "http")
    assert not proxy.permitted(to_api, "other.test", "tls")  # another site on the same address
    assert not proxy.permitted(to_api, None, "tls")  # no SNI: no name to check
    assert proxy.permitted(to_api, None, "other")  # not TLS or HTTP: by address
    assert not proxy.permitted(Destination(shared, 80), "api.test", "http")  # the rule's port only
    proxy.policy = NetworkPolicy(allow=["db.test"])  # set_network: the next connection follows it
    assert not proxy.permitted(to_api, "api.test", "tls")
    opened = Egress(NetworkPolicy(deny=["bad.test"]), upstream=[])
    assert opened.permitted(to_api, "anything.test", "tls") and opened.permitted(to_api, None, "other")
    assert not opened.permitted(to_api, "bad.test", "http")


class Upstream:
    """A DNS server on loopback (UDP) answering every A query with one address, counting queries."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = self.sock.getsockname()

    def answer_one(self) -> None:
        data, peer = self.sock.recvfrom(4096)
        query = dns.message.from_wire(data)
        self.asked.append(query.question[0].name.to_text(omit_final_dot=True))
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(query.question[0].name, 120, "IN", "A", "192.0.2.77"))
        self.sock.sendto(response.to_wire(), peer)


async def test_the_resolver_answers_allowed_names_only_and_remembers_their_addresses():
    upstream = Upstream()
    with upstream.sock:
        proxy = Egress(NetworkPolicy(allow=["api.test"]), upstream=[upstream.address])
        refused = dns.message.from_wire(await proxy.answer(dns.message.make_query("leak.evil.test", "TXT").to_wire()))
        assert refused.rcode() == dns.rcode.NXDOMAIN and upstream.asked == []
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, upstream.answer_one)
            answered = await proxy.answer(dns.message.make_query("API.test", "A").to_wire())
        assert dns.message.from_wire(answered).rcode() == dns.rcode.NOERROR and upstream.asked == ["API.test"]
        assert proxy.resolved.names_for(ipaddress.ip_address("192.0.2.77")) == ["api.test"]
        assert await proxy.answer(b"\x00" * 5) is None  # not DNS: the connection closes
        two = dns.message.make_query("api.test", "A")
        two.question.append(two.question[0])
        assert dns.message.from_wire(await proxy.answer(two.to_wire())).rcode() == dns.rcode.REFUSED


async def test_no_upstream_is_a_servfail():
    proxy = Egress(NetworkPolicy(), upstream=[])
    answer = dns.message.from_wire(await proxy.answer(dns.message.make_query("a.test", "A").to_wire()))
    assert answer.rcode() == dns.rcode.SERVFAIL


async def test_a_handed_over_connection_is_checked_then_relayed():
    """The listener side of a hand-over: a client bound to the port netguard registered reaches
    the destination only if its SNI/Host passes; any other local connection is dropped."""

    async def reply(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            request = await stream.receive()
            await stream.send(b"HTTP/1.1 200 OK\r\n\r\n" + request.split(b"\r\n")[0])

    proxy = Egress(NetworkPolicy(allow=["api.test"]), upstream=[])
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as server, anyio.create_task_group() as tg:
        tg.start_soon(server.serve, reply)
        target = Destination(ipaddress.ip_address("127.0.0.1"), server.extra(anyio.abc.SocketAttribute.local_port))
        proxy.resolved.record("api.test", [target.address], ttl=60)
        await tg.start(proxy.serve)

        def through_proxy(host: str, *, registered: bool = True) -> bytes:
            with socket.socket() as client:
                client.settimeout(30)
                client.bind(("127.0.0.1", 0))
                if registered:
                    assert proxy.expect(socket.AF_INET, client.getsockname()[1], target)
                client.connect(proxy.listener_for(socket.AF_INET))
                client.sendall(f"GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                received = b""
                with contextlib.suppress(ConnectionResetError):  # closed with the request unread
                    while chunk := client.recv(4096):
                        received += chunk
                return received

        assert await anyio.to_thread.run_sync(through_proxy, "api.test") == b"HTTP/1.1 200 OK\r\n\r\nGET /x HTTP/1.1"
        assert await anyio.to_thread.run_sync(through_proxy, "other.test") == b""
        assert await anyio.to_thread.run_sync(lambda: through_proxy("api.test", registered=False)) == b""
        tg.cancel_scope.cancel()


def test_the_cli_flags_make_one_policy_and_refuse_a_bad_rule_before_anything_starts():
    assert cli._network_policy((), (), (), None) is None  # the command's default (boot: open; restore: closed)
    assert cli._network_policy(("pypi.org",), (11434,), ("*.ads.test",), None) == NetworkPolicy(
        allow=["127.0.0.1:11434", "pypi.org"], deny=["*.ads.test"]
    )
    assert cli._network_policy((), (), (), True) == NetworkPolicy.closed()
    assert cli._network_policy((), (), (), False) == NetworkPolicy()
    for command in (["boot", "--allow", "no where"], ["restore", "/parked", "--deny", "*"]):
        refused = subprocess.run([sys.executable, "-m", "machinen_async", *command], capture_output=True, check=False)
        assert refused.returncode == 1 and b"error [BOOT_NETWORK_RULE_INVALID]" in refused.stderr, refused.stderr


async def test_stalled_guests_do_not_hold_up_others_and_cancel_closes_everything(monkeypatch: pytest.MonkeyPatch):
    """Guests that connect and say nothing (or half a ClientHello) wait on their own; a request beside
    them is relayed at once; cancelling ``serve`` closes the listeners and every connection."""
    monkeypatch.setattr(egress, "PREAMBLE_TIMEOUT_S", 60.0)

    async def reply(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(b"HTTP/1.1 200 OK\r\n\r\n")

    proxy = Egress(NetworkPolicy(allow=["api.test"]), upstream=[])
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as server, anyio.create_task_group() as tg:
        tg.start_soon(server.serve, reply)
        target = Destination(ipaddress.ip_address("127.0.0.1"), server.extra(anyio.abc.SocketAttribute.local_port))
        proxy.resolved.record("api.test", [target.address], ttl=60)
        serving = anyio.CancelScope()

        async def run_proxy(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            with serving:
                await proxy.serve(task_status=task_status)

        await tg.start(run_proxy)
        listener = proxy.listener_for(socket.AF_INET)

        def handed_over() -> socket.socket:
            client = socket.socket()
            client.settimeout(30)
            client.bind(("127.0.0.1", 0))
            assert proxy.expect(socket.AF_INET, client.getsockname()[1], target)
            client.connect(listener)
            return client

        stalled = [await anyio.to_thread.run_sync(handed_over) for _ in range(20)]
        stalled[0].sendall(client_hello("api.test")[:20])
        talking = await anyio.to_thread.run_sync(handed_over)
        talking.sendall(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        assert await anyio.to_thread.run_sync(talking.recv, 100) == b"HTTP/1.1 200 OK\r\n\r\n"
        serving.cancel()
        await anyio.wait_all_tasks_blocked()
        for client in [*stalled, talking]:
            with client, contextlib.suppress(ConnectionResetError):
                assert await anyio.to_thread.run_sync(client.recv, 100) == b""  # closed by the proxy
        assert proxy.listener_for(socket.AF_INET) is None
        with pytest.raises(OSError):
            socket.create_connection(listener, timeout=5).close()
        tg.cancel_scope.cancel()


async def test_a_stalled_upstream_resolver_gives_servfail(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(egress, "DNS_UPSTREAM_TIMEOUT_S", 0.2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
        silent.bind(("127.0.0.1", 0))
        proxy = Egress(NetworkPolicy(), upstream=[silent.getsockname()])
        answer = await proxy.answer(dns.message.make_query("a.test", "A").to_wire())
    assert dns.message.from_wire(answer).rcode() == dns.rcode.SERVFAIL


def test_hand_overs_in_flight_are_bounded():
    proxy = Egress(NetworkPolicy(), upstream=[])
    target = Destination(ipaddress.ip_address("192.0.2.1"), 443)
    assert all(proxy.expect(socket.AF_INET, port, target) for port in range(1, egress.MAX_PENDING + 1))
    assert not proxy.expect(socket.AF_INET, 65000, target)  # QEMU's connect is refused, nothing grows
    proxy.forget(socket.AF_INET, 1)
    assert proxy.expect(socket.AF_INET, 65000, target)


def test_what_resolved_goes_to_a_fork_with_the_time_it_had_left(monkeypatch: pytest.MonkeyPatch):
    clock = [500.0]
    monkeypatch.setattr(egress.time, "monotonic", lambda: clock[0])
    source = egress.Resolved()
    source.record("api.test", [ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("2001:db8::1")], ttl=300)
    clock[0] += 100
    entries = source.entries()
    assert sorted(entries) == [("api.test", "192.0.2.1", 200.0), ("api.test", "2001:db8::1", 200.0)]
    wire = msgpack.unpackb(msgpack.packb(IncomingState([], 0, [], False, resolved_names=entries).to_wire()))
    sibling = egress.Resolved()
    sibling.seed(IncomingState.from_wire(wire).resolved_names)
    assert sibling.names_for(ipaddress.ip_address("192.0.2.1")) == ["api.test"]
    clock[0] += 201  # the source's answer ran out: the sibling's copy with it
    assert sibling.names_for(ipaddress.ip_address("192.0.2.1")) == []
    for bad in ([["API.test", "192.0.2.1", 1]], [["a.test", "nowhere", 1]], [["a.test", "192.0.2.1", -1]],
                [["a.test", "192.0.2.1"]], [["a.test", "192.0.2.1", True]], "a.test"):  # fmt: skip
        with pytest.raises(MachinenError) as refused:
            IncomingState.from_wire({**IncomingState([], 0, [], False).to_wire(), "resolved_names": bad})
        assert refused.value.code == "BOOT_NETWORK_RULE_INVALID", bad


def test_the_cli_reads_a_secret_from_this_machines_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPENAI_KEY", "sk-from-env")
    secrets = cli._secrets(("OPENAI_API_KEY=OPENAI_KEY@api.openai.com,*.openai.com",))
    assert secrets is not None and secrets["OPENAI_API_KEY"].value == "sk-from-env"
    assert secrets["OPENAI_API_KEY"].hosts == ["api.openai.com", "*.openai.com"]
    assert "sk-from-env" not in repr(secrets)
    assert cli._secrets(()) is None
    for spec in ("NOVALUE", "A=MISSING_VAR@x.test", "A=OPENAI_KEY"):
        with pytest.raises(MachinenError) as refused:
            cli._secrets((spec,))
        assert refused.value.code == "BOOT_SECRET_INVALID"


def test_the_dns_servers_setting_takes_addresses_with_ports_and_refuses_anything_else(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv("MACHINEN_DNS_SERVERS", "192.0.2.1, 192.0.2.2:5353,[2001:db8::1]:53,2001:db8::2,[2001:db8::3]")
    assert egress.upstream_resolvers() == [("192.0.2.1", 53), ("192.0.2.2", 5353), ("2001:db8::1", 53),
                                           ("2001:db8::2", 53), ("2001:db8::3", 53)]  # fmt: skip
    for bad in [
        "dns.test",
        "192.0.2.1:0",
        "192.0.2.1:x",
        "[2001:db8::1]53",
        "[2001:db8::1",
        "192.0.2.1,",
        "1.2.3.4:70000",
    ]:
        monkeypatch.setenv("MACHINEN_DNS_SERVERS", bad)
        with pytest.raises(MachinenError) as caught:
            egress.upstream_resolvers()
        assert caught.value.code == "BOOT_DNS_SERVERS_INVALID", bad


async def test_a_placeholder_in_the_clear_to_another_host_goes_as_it_is_and_is_noted():
    """Plain HTTP to a host of no secret: the placeholder is not replaced (the value goes nowhere
    but TLS to its hosts) and the attempt is logged, without the value."""
    received: list[bytes] = []

    async def reply(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            received.append(await stream.receive())
            await stream.send(b"HTTP/1.1 204 No Content\r\n\r\n")

    proxy = Egress(NetworkPolicy(), upstream=[])  # open: with secrets netguard hands every TCP connection over
    secret = SecretRule("API_KEY", "the-real-value", ("api.test",))
    proxy.set_secrets([secret])
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as server, anyio.create_task_group() as tg:
        tg.start_soon(server.serve, reply)
        target = Destination(ipaddress.ip_address("127.0.0.1"), server.extra(anyio.abc.SocketAttribute.local_port))
        await tg.start(proxy.serve)

        def send() -> bytes:
            with socket.socket() as client:
                client.settimeout(30)
                client.bind(("127.0.0.1", 0))
                assert proxy.expect(socket.AF_INET, client.getsockname()[1], target)
                client.connect(proxy.listener_for(socket.AF_INET))
                client.sendall(f"GET / HTTP/1.1\r\nHost: other.test\r\nX-Key: {secret.placeholder}\r\n\r\n".encode())
                return client.recv(4096)

        with structlog.testing.capture_logs() as logs:
            assert (await anyio.to_thread.run_sync(send)).startswith(b"HTTP/1.1 204")
        tg.cancel_scope.cancel()
    assert secret.placeholder.encode() in received[0] and b"the-real-value" not in received[0]
    noted = [entry for entry in logs if entry["event"] == "secret placeholder sent to another host"]
    assert noted and noted[0]["name"] == "API_KEY" and noted[0]["host"] == "other.test"
    assert "the-real-value" not in repr(logs)
