"""The guest's DNS stub (guest/dns_stub.py, issue 29) without a VM: the stub on 127.0.0.1, a free
port, against a fake upstream that speaks DNS over TCP on a thread; its message helpers alone.

Traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given
from hypothesis import strategies as st

from machinen_async.guest import dns_stub
from machinen_async.guest.dns_stub import DnsStub

CLIENT_TIMEOUT_S = 30.0  # how long a test waits for what must come; never a measure of speed
STALL = "stall.test."
BIG = "big.test."


def _framed_receive(sock: socket.socket) -> bytes:
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    return exactly(int.from_bytes(exactly(2), "big"))


def _hung_up(client: socket.socket) -> bool:
    """Whether the stub closed ``client`` (a reset when it left what the client sent unread)."""
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True


def _stub_threads() -> int:
    return sum(thread.name == "dns-query" for thread in threading.enumerate())


def _answer_of(query: dns.message.Message) -> dns.message.Message:
    """Big names get ~3 KB of TXT, every other name an A record."""
    response = dns.message.make_response(query)
    name = query.question[0].name
    if name.to_text() == BIG:
        texts = [f'"{index:02d}{"x" * 200}"' for index in range(15)]
        response.answer.append(dns.rrset.from_text(name, 60, "IN", "TXT", *texts))
    else:
        response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.1"))
    return response


class FakeUpstream:
    """A DNS-over-TCP server: answers each query (``_answer_of``), or, for ``STALL`` and while
    ``stall_all``, holds the connection unanswered until ``release`` is set."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.release = threading.Event()
        self.stall_all = False
        self.lock = threading.Lock()
        self.seen: list[int] = []  # ids of the queries that arrived
        self.connections = 0
        self.peak_connections = 0
        self.peak_stub_threads = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.getsockname()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self.lock:
            self.connections += 1
            self.peak_connections = max(self.peak_connections, self.connections)
            self.peak_stub_threads = max(self.peak_stub_threads, _stub_threads())
        try:
            with conn:
                query = dns.message.from_wire(_framed_receive(conn))
                with self.lock:
                    self.seen.append(query.id)
                if self.stall_all or query.question[0].name.to_text() == STALL:
                    self.release.wait()
                    return
                wire = _answer_of(query).to_wire()
                conn.sendall(len(wire).to_bytes(2, "big") + wire)
        except (OSError, dns.exception.DNSException):
            pass
        finally:
            with self.lock:
                self.connections -= 1

    def close(self) -> None:
        self.release.set()
        self.listener.close()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    yield fake
    fake.close()


@pytest.fixture
def make_stub(upstream: FakeUpstream) -> Iterator[Callable[..., DnsStub]]:
    """Stubs against ``upstream``; on teardown, every query thread must end (none hangs)."""
    stubs: list[DnsStub] = []

    def make(timeout: float = CLIENT_TIMEOUT_S, max_in_flight: int = dns_stub.MAX_IN_FLIGHT) -> DnsStub:
        stub = DnsStub(("127.0.0.1", 0), upstream.address, timeout=timeout, max_in_flight=max_in_flight)
        stub.start()
        stubs.append(stub)
        return stub

    yield make
    upstream.release.set()
    for stub in stubs:
        stub.close()
    deadline = time.monotonic() + CLIENT_TIMEOUT_S
    while _stub_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _stub_threads() == 0, "a query thread outlived its stub"


def _udp_client() -> socket.socket:
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(CLIENT_TIMEOUT_S)
    return client


def _ask_udp(stub: DnsStub, query: dns.message.Message) -> dns.message.Message:
    with _udp_client() as client:
        client.sendto(query.to_wire(), stub.address)
        return dns.message.from_wire(client.recv(65536), ignore_trailing=True)


def _ask_tcp(stub: DnsStub, query: dns.message.Message) -> dns.message.Message:
    with socket.create_connection(stub.address, timeout=CLIENT_TIMEOUT_S) as client:
        wire = query.to_wire()
        client.sendall(len(wire).to_bytes(2, "big") + wire)
        return dns.message.from_wire(_framed_receive(client))


def test_a_udp_query_gets_the_upstream_answer_with_its_id(make_stub) -> None:
    stub = make_stub()
    query = dns.message.make_query("host.test.", "A")
    answer = _ask_udp(stub, query)
    assert answer.id == query.id
    assert answer.rcode() == dns.rcode.NOERROR
    assert [rrset.to_text() for rrset in answer.answer] == ["host.test. 60 IN A 192.0.2.1"]


def test_a_large_answer_is_truncated_over_udp_and_whole_over_tcp(make_stub) -> None:
    stub = make_stub()
    plain = dns.message.make_query(BIG, "TXT")
    truncated = _ask_udp(stub, plain)
    assert truncated.id == plain.id
    assert truncated.flags & dns.flags.TC
    assert truncated.question == plain.question and not truncated.answer

    whole = _ask_tcp(stub, plain)
    assert not whole.flags & dns.flags.TC
    assert len(whole.answer[0]) == 15 and len(whole.to_wire()) > dns_stub.PLAIN_UDP_BYTES

    # A client that says (EDNS0) it takes 4096 bytes gets the whole answer over UDP.
    edns = dns.message.make_query(BIG, "TXT", use_edns=0, payload=4096)
    assert len(_ask_udp(stub, edns).answer[0]) == 15


def test_several_queries_on_one_tcp_connection(make_stub) -> None:
    stub = make_stub()
    with socket.create_connection(stub.address, timeout=CLIENT_TIMEOUT_S) as client:
        for name in ("one.test.", "two.test."):
            query = dns.message.make_query(name, "A")
            wire = query.to_wire()
            client.sendall(len(wire).to_bytes(2, "big") + wire)
            answer = dns.message.from_wire(_framed_receive(client))
            assert (answer.id, answer.question) == (query.id, query.question)


def test_a_stalled_upstream_times_out_into_servfail_and_others_are_served(make_stub) -> None:
    stub = make_stub(timeout=0.3)
    with _udp_client() as stalled, _udp_client() as other:
        stalled_query = dns.message.make_query(STALL, "A")
        stalled.sendto(stalled_query.to_wire(), stub.address)
        other_query = dns.message.make_query("other.test.", "A")
        other.sendto(other_query.to_wire(), stub.address)
        assert dns.message.from_wire(other.recv(65536)).answer
        failed = dns.message.from_wire(stalled.recv(65536))
    assert (failed.id, failed.rcode(), failed.question) == (
        stalled_query.id,
        dns.rcode.SERVFAIL,
        stalled_query.question,
    )


def test_an_unreachable_upstream_is_a_servfail() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()  # bound, never listening: connections are refused
        stub = DnsStub(("127.0.0.1", 0), closed_port, timeout=CLIENT_TIMEOUT_S)
        stub.start()
        try:
            query = dns.message.make_query("host.test.", "A")
            assert _ask_udp(stub, query).rcode() == dns.rcode.SERVFAIL
            assert _ask_tcp(stub, query).rcode() == dns.rcode.SERVFAIL
        finally:
            stub.close()


def test_a_flood_never_runs_more_queries_than_the_cap(make_stub, upstream: FakeUpstream) -> None:
    cap = 4
    stub = make_stub(max_in_flight=cap)
    upstream.stall_all = True
    with _udp_client() as client:
        for _ in range(200):
            client.sendto(dns.message.make_query("flood.test.", "A").to_wire(), stub.address)
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        while len(upstream.seen) < cap and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(upstream.seen) == cap
        # TCP clients count against the same cap: one beyond it is closed at once.
        with socket.create_connection(stub.address, timeout=CLIENT_TIMEOUT_S) as refused:
            assert _hung_up(refused)
        assert _stub_threads() <= cap

        upstream.stall_all = False
        upstream.release.set()  # the stalled ones end (SERVFAIL), and the stub serves again
        sentinel = dns.message.make_query("after.test.", "A")
        while True:  # sent again until a slot is free: while all are taken, a query is dropped
            client.sendto(sentinel.to_wire(), stub.address)
            client.settimeout(0.5)
            try:
                while dns.message.from_wire(client.recv(65536)).id != sentinel.id:
                    pass
                break
            except TimeoutError:
                assert time.monotonic() < deadline + CLIENT_TIMEOUT_S, "the stub stopped serving"
    assert upstream.peak_connections <= cap and upstream.peak_stub_threads <= cap


def test_malformed_queries_are_dropped(make_stub, upstream: FakeUpstream) -> None:
    stub = make_stub()
    with _udp_client() as client:
        answer_shaped = dns.message.make_response(dns.message.make_query("reply.test.", "A")).to_wire()
        for junk in (b"\x12\x34\x01", bytes(dns_stub.MAX_QUERY_BYTES + 1), answer_shaped):
            client.sendto(junk, stub.address)
        query = dns.message.make_query("good.test.", "A")
        client.sendto(query.to_wire(), stub.address)
        assert dns.message.from_wire(client.recv(65536)).id == query.id
    with socket.create_connection(stub.address, timeout=CLIENT_TIMEOUT_S) as client:
        client.sendall(b"\xff\xff" + bytes(100))  # announces more than a query may be
        assert _hung_up(client)
    with socket.create_connection(stub.address, timeout=CLIENT_TIMEOUT_S) as client:
        client.sendall(b"\x00\x05hello")  # shorter than a header
        assert _hung_up(client)
    assert upstream.seen == [query.id]


def test_udp_limit_reads_the_edns0_payload_size() -> None:
    assert dns_stub.udp_limit(dns.message.make_query("a.test.", "A").to_wire()) == 512
    for payload, limit in ((1232, 1232), (100, 512), (65000, dns_stub.MAX_UDP_ANSWER_BYTES)):
        query = dns.message.make_query("a.test.", "A", use_edns=0, payload=payload)
        assert dns_stub.udp_limit(query.to_wire()) == limit


@given(st.binary(min_size=dns_stub.HEADER_BYTES, max_size=600))
def test_the_helpers_take_any_bytes(message: bytes) -> None:
    """What a guest program or the upstream sends never makes a helper raise; replies keep the ID."""
    dns_stub.udp_limit(message)
    for reply in (dns_stub.servfail(message), dns_stub.fit_for_udp(message, message)):
        assert reply[:2] == message[:2] and len(reply) >= dns_stub.HEADER_BYTES


@given(st.from_regex(r"[a-z0-9]{1,20}(\.[a-z0-9]{1,20}){0,3}\.", fullmatch=True), st.sampled_from(["A", "AAAA", "TXT"]))
def test_servfail_answers_the_question(name: str, rdtype: str) -> None:
    query = dns.message.make_query(name, rdtype, use_edns=0)
    failed = dns.message.from_wire(dns_stub.servfail(query.to_wire()))
    assert (failed.id, failed.rcode(), failed.question) == (query.id, dns.rcode.SERVFAIL, query.question)
    assert failed.flags & dns.flags.QR and failed.flags & dns.flags.RD
