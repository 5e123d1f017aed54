"""The guest's DNS stub: UDP and TCP on ``127.0.0.53:53``, every query relayed over TCP to QEMU's
DNS address, where the host answers.

Why TCP: the host's resolver for a VM runs unprivileged, so it cannot answer UDP from port 53, and
slirp would rewrite the source port of a UDP answer anyway; DNS over TCP (RFC 7766: a 2-byte
big-endian length, then the message) has neither problem.  Guest programs (glibc, musl) send UDP
to the nameserver of /etc/resolv.conf, which init points here.

Each query is one thread and one new upstream connection under one deadline: nothing outlives a
query, so a VM snapshotted, forked or restored mid-query (its TCP connections gone) loses only
that query, which the client asks again.  At most ``MAX_IN_FLIGHT`` UDP queries and TCP clients
are served at once; beyond that a query is dropped, as a lossy network would, so a flood in the
guest cannot exhaust the agent.  A UDP client gets at most its EDNS0 payload size (512 bytes
without one; never more than 4096, a simplification: loopback carries more, but clients retry
over TCP); a longer answer goes back as its question with TC set, and the client asks over TCP.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

from ..protocol.guest_abi import DNS_IP

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing into PID 1 (slow under TCG)
if TYPE_CHECKING:
    from collections.abc import Callable

LISTEN_ADDRESS = ("127.0.0.53", 53)
UPSTREAM_ADDRESS = (DNS_IP, 53)
UPSTREAM_TIMEOUT_S = 10.0
MAX_IN_FLIGHT = 64
HEADER_BYTES = 12
MAX_QUERY_BYTES = 4096
PLAIN_UDP_BYTES = 512  # RFC 1035: what a client without EDNS0 takes
MAX_UDP_ANSWER_BYTES = 4096
# A listening socket that fails (out of descriptors, say) fails again at once: pause, not spin.
LISTEN_ERROR_PAUSE_S = 0.05
# Header flags and codes (RFC 1035 4.1.1, RFC 6891).
QR, OPCODE, TC, RD, RA = 0x8000, 0x7800, 0x0200, 0x0100, 0x0080
SERVFAIL = 2
OPT = 41


def _count(message: bytes, at: int) -> int:
    return int.from_bytes(message[at : at + 2], "big")


def _skip_name(message: bytes, offset: int) -> int:
    """The offset after the (possibly compressed) domain name at ``offset``."""
    while True:
        if offset >= len(message):
            raise ValueError("name runs past the message")
        length = message[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:  # a pointer ends the name
            return offset + 2
        if length & 0xC0:
            raise ValueError("reserved label type")
        offset += 1 + length


def _questions_end(message: bytes) -> int:
    offset = HEADER_BYTES
    for _ in range(_count(message, 4)):
        offset = _skip_name(message, offset) + 4  # QTYPE, QCLASS
    if offset > len(message):
        raise ValueError("question runs past the message")
    return offset


def _record(message: bytes, offset: int) -> tuple[int, int, int]:
    """The type and class of the resource record at ``offset``, and where the next one starts."""
    offset = _skip_name(message, offset)
    if offset + 10 > len(message):
        raise ValueError("record runs past the message")
    rr_type, rr_class, _ttl, rdlength = struct.unpack_from("!HHIH", message, offset)
    return rr_type, rr_class, offset + 10 + rdlength


def udp_limit(query: bytes) -> int:
    """How long an answer a UDP client takes: its OPT record's payload size (RFC 6891: never
    below 512; capped at ``MAX_UDP_ANSWER_BYTES``), else 512."""
    try:
        offset = _questions_end(query)
        for _ in range(_count(query, 6) + _count(query, 8) + _count(query, 10)):
            rr_type, rr_class, offset = _record(query, offset)
            if rr_type == OPT:
                return min(max(rr_class, PLAIN_UDP_BYTES), MAX_UDP_ANSWER_BYTES)
    except ValueError:
        pass
    return PLAIN_UDP_BYTES


def _reply_head(message: bytes, flags: int) -> bytes:
    """``message``'s ID and question under ``flags``, no records (a truncated answer, a SERVFAIL)."""
    try:
        end, questions = _questions_end(message), _count(message, 4)
    except ValueError:
        end, questions = HEADER_BYTES, 0
    return message[:2] + struct.pack("!HHHHH", flags, questions, 0, 0, 0) + message[HEADER_BYTES:end]


def fit_for_udp(query: bytes, answer: bytes) -> bytes:
    """``answer`` if the client of ``query`` takes it over UDP, else its question with TC set."""
    if len(answer) <= udp_limit(query):
        return answer
    return _reply_head(answer, _count(answer, 2) | TC)


def servfail(query: bytes) -> bytes:
    return _reply_head(query, QR | (_count(query, 2) & (OPCODE | RD)) | RA | SERVFAIL)


def is_query(message: bytes) -> bool:
    return HEADER_BYTES <= len(message) <= MAX_QUERY_BYTES and not _count(message, 2) & QR


def _answers(query: bytes, answer: bytes) -> bool:
    return len(answer) >= HEADER_BYTES and answer[:2] == query[:2] and bool(_count(answer, 2) & QR)


def _framed(message: bytes) -> bytes:
    return len(message).to_bytes(2, "big") + message


def _receive(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("DNS peer too slow")
        sock.settimeout(remaining)
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("DNS peer closed the connection")
        data += chunk
    return bytes(data)


def _receive_framed(sock: socket.socket, deadline: float, most: int = 0xFFFF) -> bytes:
    """One length-prefixed message (RFC 7766) of at most ``most`` bytes."""
    length = _count(_receive(sock, 2, deadline), 0)
    if length > most:
        raise ValueError(f"a DNS message of {length} bytes")
    return _receive(sock, length, deadline)


class DnsStub:
    """Bound when made (so a caller sees a failure to bind), served from ``start``."""

    def __init__(
        self,
        listen: tuple[str, int] = LISTEN_ADDRESS,
        upstream: tuple[str, int] = UPSTREAM_ADDRESS,
        timeout: float = UPSTREAM_TIMEOUT_S,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.upstream: tuple[str, int] = upstream
        self.timeout: float = timeout
        self.slots: threading.BoundedSemaphore = threading.BoundedSemaphore(max_in_flight)
        self.closed: bool = False
        self.udp: socket.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tcp: socket.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.udp.bind(listen)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.tcp.bind(self.udp.getsockname())  # the same port, also when ``listen`` asks for any
            self.tcp.listen(max_in_flight)
        except OSError:
            self.udp.close()
            self.tcp.close()
            raise

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.udp.getsockname()
        return host, port

    def start(self) -> None:
        for serve in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=serve, name="dns-listener", daemon=True).start()

    def close(self) -> None:
        """Stop listening; queries in flight finish on their own deadline."""
        self.closed = True
        for sock in (self.udp, self.tcp):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked on it, as close() would not
            except OSError:
                pass  # an unconnected UDP socket says ENOTCONN, and is woken all the same
            sock.close()

    def _spawn(self, target: Callable[..., None], *args: object) -> bool:
        """Run ``target`` on a thread of its own if a slot is free (``target`` releases it)."""
        if not self.slots.acquire(blocking=False):
            return False
        try:
            threading.Thread(target=target, args=args, name="dns-query", daemon=True).start()
        except RuntimeError:  # no thread to be had: dropped, as beyond the cap
            self.slots.release()
            return False
        return True

    def _serve_udp(self) -> None:
        while not self.closed:
            try:
                query, client = self.udp.recvfrom(MAX_QUERY_BYTES + 1)
            except OSError:
                time.sleep(LISTEN_ERROR_PAUSE_S)
                continue
            if is_query(query):
                self._spawn(self._answer_udp, query, client)

    def _serve_tcp(self) -> None:
        while not self.closed:
            try:
                client, _ = self.tcp.accept()
            except OSError:
                time.sleep(LISTEN_ERROR_PAUSE_S)
                continue
            if not self._spawn(self._serve_tcp_client, client):
                client.close()

    def _answer_udp(self, query: bytes, client: tuple[str, int]) -> None:
        try:
            self.udp.sendto(fit_for_udp(query, self._answer(query)), client)
        except OSError:
            pass  # the client is gone, or the stub closed: it asks again
        finally:
            self.slots.release()

    def _serve_tcp_client(self, client: socket.socket) -> None:
        """One query at a time, until the client closes, sends garbage or idles past the timeout."""
        try:
            with client:
                while True:
                    query = _receive_framed(client, time.monotonic() + self.timeout, MAX_QUERY_BYTES)
                    if not is_query(query):
                        return
                    answer = self._answer(query)
                    client.settimeout(self.timeout)
                    client.sendall(_framed(answer))
        except (OSError, ValueError):
            pass  # gone, too slow, or not speaking DNS: hung up on
        finally:
            self.slots.release()

    def _answer(self, query: bytes) -> bytes:
        """The upstream's answer, or a SERVFAIL when it cannot be had in time."""
        deadline = time.monotonic() + self.timeout
        try:
            with socket.create_connection(self.upstream, timeout=self.timeout) as upstream:
                upstream.sendall(_framed(query))
                answer = _receive_framed(upstream, deadline)
        except OSError:
            return servfail(query)
        return answer if _answers(query, answer) else servfail(query)
