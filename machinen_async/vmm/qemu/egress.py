"""A VM's egress by name: the host's DNS resolver for its guest, and the proxy that its TCP
connections to names pass through.

netguard (``netguard.py``) sees every connect(2) QEMU makes for the guest.  When a policy names
hosts, or denies some, a connection cannot be judged by its address alone: many names share an
address (a CDN), and any name resolves through the host.  So:

- **DNS**: the guest's agent sends its DNS queries over TCP to slirp's 10.0.2.3:53 (guest/dns_stub.py;
  the host cannot answer UDP from port 53 unprivileged), which QEMU turns into a connection to the
  host's resolver; netguard hands that connection here instead.  ``Resolver`` answers only names the
  policy resolves (others: NXDOMAIN, never asked upstream), asks the host's resolvers for the rest,
  and remembers which addresses each allowed name resolved to, until the answer's TTL.
- **Connections**: netguard hands a connection to an address an allowed name resolved to (or, with
  denied names, every connection) to ``Egress``'s listener: it binds QEMU's socket (taken with
  pidfd_getfd) to a loopback port first, so the listener knows by the peer's port where the guest
  meant to go.  The proxy reads the first bytes: a TLS ClientHello's SNI or an HTTP request's Host
  must be a name that resolved to that address for this VM (and be allowed to that port); other
  protocols go by the address.  Then it connects there itself and relays.

The guest sees its connection established before the check: a refused one is reset, not refused.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import heapq
import ipaddress
import math
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import dns.asyncbackend
import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import sniffio
import structlog
from anyio.abc import SocketAttribute
from anyio.streams.stapled import MultiListener

from ...errors import BootError
from ...protocol.netpolicy import MAX_RESOLVED_NAMES, IPAddress, NetworkPolicy, ResolvedName, normal_name
from ...protocol.secret import SecretRule
from .. import capped_log
from . import secrets as injection

log: structlog.typing.FilteringBoundLogger = structlog.get_logger("machinen.egress")

MIN_TTL_S = 30.0  # a name stays usable a little past a short TTL: clients connect after resolving
MAX_TTL_S = 86400.0
MAX_ADDRESSES = 4096  # remembered per VM: a guest resolving names without end costs bounded memory
MAX_NAMES_PER_ADDRESS = 64
MAX_PENDING = 1024  # connections handed over and not yet accepted
MAX_CONNECTIONS = 512  # relayed or answered at once per VM
PREAMBLE_LIMIT = 16384  # bytes read to find a ClientHello's SNI or an HTTP Host
PREAMBLE_TIMEOUT_S = 5.0  # a client that says nothing first (SMTP, MySQL...) is judged by address
UPSTREAM_CONNECT_TIMEOUT_S = 30.0
DNS_QUERY_LIMIT = 4096
DNS_IDLE_TIMEOUT_S = 30.0
DNS_UPSTREAM_TIMEOUT_S = 5.0
RELAY_CHUNK = 65536
EVENTS_PER_WINDOW = 20


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


def upstream_resolvers() -> list[tuple[str, int]]:
    """Where allowed queries go: ``$MACHINEN_DNS_SERVERS`` (``ADDR[:PORT]``, comma-separated; IPv6
    in brackets), else the host's /etc/resolv.conf nameservers."""
    configured = os.environ.get("MACHINEN_DNS_SERVERS", "").strip()
    if not configured:
        return [(str(address), 53) for address in sorted(resolvers(), key=str)]
    return [_dns_server(item.strip()) for item in configured.split(",")]


def _dns_server(item: str) -> tuple[str, int]:
    """``ADDR``, ``ADDR:PORT``, ``[IPV6]`` or ``[IPV6]:PORT``."""
    if item.startswith("["):
        host, closed, rest = item[1:].partition("]")
        port = rest[1:] if closed and rest.startswith(":") else "" if closed and not rest else "-"  # "-": not one
    elif item.count(":") == 1:
        host, port = item.split(":")
    else:
        host, port = item, ""
    try:
        address = ipaddress.ip_address(host)
        number = int(port) if port else 53
        if not 0 < number < 65536:
            raise ValueError(number)
    except ValueError:
        raise BootError(f"MACHINEN_DNS_SERVERS: {item!r:.100} is not ADDR[:PORT] (IPv6 in brackets)",
                        code="BOOT_DNS_SERVERS_INVALID") from None  # fmt: skip
    return str(address), number


class Resolved:
    """Which allowed names resolved to which addresses for this VM, until their TTL.  Written by the
    resolver (event loop), read by netguard's thread: behind a lock, bounded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: dict[IPAddress, dict[str, float]] = {}  # address -> name -> expiry (monotonic)

    def record(self, name: str, addresses: list[IPAddress], ttl: float, *, floor: float = MIN_TTL_S) -> None:
        now = time.monotonic()
        expiry = now + min(max(ttl, floor), MAX_TTL_S)
        with self._lock:
            for address in addresses:
                names = self._names.setdefault(address, {})
                names[name] = max(names.get(name, 0.0), expiry)
                if len(names) > MAX_NAMES_PER_ADDRESS:
                    del names[min(names, key=names.__getitem__)]
            if len(self._names) > MAX_ADDRESSES:
                self._forget_expired(now)
            excess = len(self._names) - MAX_ADDRESSES
            if excess > 0:  # the ones that expire first go, found in one pass
                for address in heapq.nsmallest(excess, self._names, key=lambda a: max(self._names[a].values())):
                    del self._names[address]

    def _forget_expired(self, now: float) -> None:
        for address in list(self._names):
            names = {name: expiry for name, expiry in self._names[address].items() if expiry > now}
            if names:
                self._names[address] = names
            else:
                del self._names[address]

    def entries(self) -> list[ResolvedName]:
        """What still holds, the longest-lived first, at most MAX_RESOLVED_NAMES: (name, address, seconds left)."""
        now = time.monotonic()
        with self._lock:
            held = [(name, str(address), expiry - now) for address, names in self._names.items()
                    for name, expiry in names.items() if expiry > now]  # fmt: skip
        return sorted(held, key=lambda entry: -entry[2])[:MAX_RESOLVED_NAMES]

    def seed(self, entries: Sequence[ResolvedName]) -> None:
        """Take over ``entries`` (a fork source's): each until its own answer's time is up."""
        for name, address, left in entries:
            self.record(name, [ipaddress.ip_address(address)], left, floor=0.0)

    def names_for(self, address: IPAddress) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return [name for name, expiry in self._names.get(address, {}).items() if expiry > now]


@dataclass(frozen=True)
class Destination:
    """Where the guest meant a handed-over connection to go; ``dns``: to slirp's DNS, answered here."""

    address: IPAddress
    port: int
    dns: bool = False


class Verdict(enum.Enum):
    ALLOW = "allow"  # QEMU's call goes on as it is
    REFUSE = "refuse"
    PROXY = "proxy"  # a connection checked and relayed by Egress
    DNS = "dns"  # a connection to the host's resolver, answered by Egress's Resolver


class Egress:
    """One VM's resolver and proxy (``serve`` runs them for as long as its QEMU runs).  ``policy``
    is read at each decision: replacing it (``set_network``) rules new queries and connections."""

    def __init__(self, policy: NetworkPolicy, upstream: list[tuple[str, int]] | None = None) -> None:
        self.policy: NetworkPolicy = policy
        self.resolved: Resolved = Resolved()
        self.upstream: list[tuple[str, int]] = upstream_resolvers() if upstream is None else upstream
        self._pending: dict[tuple[int, int], Destination] = {}  # (family, local port) -> destination
        self._pending_lock = threading.Lock()
        self._listening: dict[int, tuple[str, int]] = {}  # family -> the listener's address
        self._events = capped_log.Budget(EVENTS_PER_WINDOW, capped_log.BUDGET_WINDOW_S)
        # Secrets put into requests to their hosts (secrets.py), with the CA the guest trusts for them.
        self.secrets: tuple[SecretRule, ...] = ()
        self.ca: injection.VmCA | None = None
        self._upstream_tls: ssl.SSLContext | None = None

    def set_secrets(self, secrets: Sequence[SecretRule]) -> bytes:
        """Put ``secrets`` in the guest's requests from now on; the PEM of the new CA their
        connections are terminated with, which the guest must trust."""
        self.ca = injection.VmCA(name for secret in secrets for name in secret.names)
        self._upstream_tls = self._upstream_tls or injection.upstream_context()
        self.secrets = tuple(secrets)
        return self.ca.ca_pem

    # --- netguard's side (its own thread) ---

    def listener_for(self, family: int) -> tuple[str, int] | None:
        return self._listening.get(family)

    def expect(self, family: int, local_port: int, destination: Destination) -> bool:
        """A connection from ``local_port`` of loopback is on its way; False if too many are."""
        with self._pending_lock:
            if len(self._pending) >= MAX_PENDING:
                return False
            self._pending[(family, local_port)] = destination
            return True

    def forget(self, family: int, local_port: int) -> None:
        with self._pending_lock:
            self._pending.pop((family, local_port), None)

    def _take(self, family: int, local_port: int) -> Destination | None:
        with self._pending_lock:
            return self._pending.pop((family, local_port), None)

    # --- the event loop's side ---

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen on loopback (IPv4, and IPv6 where the host has it) until cancelled."""
        listeners: list[MultiListener[anyio.abc.SocketStream]] = []
        try:
            for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                try:
                    listener = await anyio.create_tcp_listener(local_host=address, local_port=0, family=family)
                except OSError:
                    if family == socket.AF_INET:
                        raise
                    continue  # no IPv6 loopback: the guest's IPv6 connections to names are refused
                listeners.append(listener)
                self._listening[family] = listener.listeners[0].extra(SocketAttribute.local_address)[:2]
            limiter = anyio.CapacityLimiter(MAX_CONNECTIONS)
            async with anyio.create_task_group() as tg:
                for listener in listeners:
                    tg.start_soon(listener.serve, functools.partial(self._handle, limiter=limiter), tg)
                task_status.started()
        finally:
            self._listening.clear()
            with anyio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    async def _handle(self, stream: anyio.abc.SocketStream, *, limiter: anyio.CapacityLimiter) -> None:
        async with stream:
            try:
                limiter.acquire_on_behalf_of_nowait(stream)
            except anyio.WouldBlock:
                return  # too many at once: this one is closed
            try:
                peer = stream.extra(SocketAttribute.remote_address)
                destination = self._take(stream.extra(SocketAttribute.family), peer[1])
                if destination is None:
                    return  # not a connection netguard handed over: some other local process
                if destination.dns:
                    await self._answer_dns(stream)
                else:
                    await self._relay_checked(stream, destination)
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
                pass  # either side went away
            except Exception as error:  # noqa: BLE001 - one connection's failure must not end the VM's egress
                log.warning("guest egress connection failed", error=type(error).__name__)  # its text may hold data
            finally:
                limiter.release_on_behalf_of(stream)

    def _event(self, message: str, **fields: object) -> None:
        if self._events.spend():
            log.info(message, **fields)
        elif self._events.just_exhausted:
            log.info("guest egress events keep coming: not logged for a while")

    # --- connections ---

    def permitted(self, destination: Destination, claimed: str | None, kind: str) -> bool:
        """Whether a connection may go on: ``kind`` "tls"/"http" with the SNI/Host it ``claimed``, or
        "other" (no name in it)."""
        policy = self.policy
        if not policy.is_allow_list:  # open: only denied names are refused
            return claimed is None or policy.reaches(claimed, destination.port)
        names = [n for n in self.resolved.names_for(destination.address) if policy.reaches(n, destination.port)]
        if kind == "other":
            return bool(names)
        return claimed is not None and claimed in names

    async def _relay_checked(self, stream: anyio.abc.SocketStream, destination: Destination) -> None:
        """Judge the connection by what the guest says first, then relay it.  A guest that says
        nothing for a while may be waiting for the server to speak first (SMTP, MySQL...): the
        proxy connects then, relays the server's words, and judges the guest's first ones whenever
        they come, so waiting does not skip the check."""
        preamble, kind, claimed = await read_preamble(stream, PREAMBLE_TIMEOUT_S)
        if not preamble and not self.permitted(destination, None, "other"):
            return self._refused(destination, kind, claimed)
        if preamble and not self.permitted(destination, claimed, kind):
            return self._refused(destination, kind, claimed)
        self._report_placeholders(preamble, destination, claimed)
        if kind == "tls" and claimed is not None and self._secrets_for(claimed, destination.port):
            assert self.ca is not None and self._upstream_tls is not None  # set with the secrets
            await injection.inject(stream, preamble, claimed, (str(destination.address), destination.port),
                                   lambda: self.secrets, self.ca, self._upstream_tls, self._event)  # fmt: skip
            return
        with anyio.fail_after(UPSTREAM_CONNECT_TIMEOUT_S):
            upstream = await anyio.connect_tcp(str(destination.address), destination.port)
        async with upstream, anyio.create_task_group() as tg:
            tg.start_soon(_copy, upstream, stream)
            if not preamble:
                preamble, kind, claimed = await read_preamble(stream, None)
                if not self.permitted(destination, claimed, kind):
                    tg.cancel_scope.cancel()
                    return self._refused(destination, kind, claimed)
                self._report_placeholders(preamble, destination, claimed)
            if preamble:
                await upstream.send(preamble)
            await _copy(stream, upstream)

    def _secrets_for(self, name: str, port: int) -> bool:
        return any(secret.goes_to(name, port) for secret in self.secrets)

    def _report_placeholders(self, preamble: bytes, destination: Destination, claimed: str | None) -> None:
        """A placeholder in the clear in what the guest says first (plain HTTP's request head, any
        protocol's opening bytes) goes out as it is, never replaced: noted as an attempt.  (Inside
        TLS to a host of no secret it cannot be seen; to a secret's host, ``inject`` notes it.)"""
        for secret in self.secrets:
            if injection.carries_placeholder(preamble, secret):
                self._event("secret placeholder sent to another host", name=secret.name,
                            destination=str(destination.address), port=destination.port, host=claimed)  # fmt: skip

    def _refused(self, destination: Destination, kind: str, claimed: str | None) -> None:
        self._event("guest connection refused", destination=str(destination.address), port=destination.port,
                    protocol=kind, name=claimed)  # fmt: skip

    # --- DNS ---

    async def _answer_dns(self, stream: anyio.abc.SocketStream) -> None:
        """DNS over TCP (a 2-byte length, then the message), one query after another."""
        while True:
            query = None
            with anyio.move_on_after(DNS_IDLE_TIMEOUT_S):
                (length,) = struct.unpack("!H", await _receive_exactly(stream, 2))
                if not 12 <= length <= DNS_QUERY_LIMIT:
                    return
                query = await _receive_exactly(stream, length)
            if query is None:
                return  # idle
            answer = await self.answer(query)
            if answer is None:
                return
            await stream.send(struct.pack("!H", len(answer)) + answer)

    async def answer(self, query: bytes) -> bytes | None:
        """The answer to one DNS message from the guest, or None to close (not DNS at all)."""
        try:
            message = dns.message.from_wire(query)
        except (dns.exception.DNSException, ValueError):
            return None
        if message.flags & dns.flags.QR:
            return None
        if message.opcode() != dns.opcode.QUERY or len(message.question) != 1:
            return _reply(message, dns.rcode.REFUSED)
        question = message.question[0]
        name = normal_name(question.name.to_text(omit_final_dot=True))
        if name is None or not self.policy.resolves(name):
            self._event("guest DNS query refused", name=question.name.to_text()[:255])
            return _reply(message, dns.rcode.NXDOMAIN)
        response = await self._ask_upstream(message)
        if response is None:
            return _reply(message, dns.rcode.SERVFAIL)
        addresses, ttl = [], MAX_TTL_S
        for rrset in response.answer:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                addresses += [ipaddress.ip_address(rdata.address) for rdata in rrset]
                ttl = min(ttl, rrset.ttl)
        if addresses:
            self.resolved.record(name, addresses, ttl)
        return response.to_wire()

    async def _ask_upstream(self, message: dns.message.Message) -> dns.message.Message | None:
        # dnspython would keep the first event loop library it saw, for the whole process
        backend = dns.asyncbackend.get_backend(sniffio.current_async_library())
        for address, port in self.upstream:
            with contextlib.suppress(dns.exception.DNSException, OSError):
                response = await dns.asyncquery.udp(
                    message, address, port=port, timeout=DNS_UPSTREAM_TIMEOUT_S, backend=backend
                )
                if response.flags & dns.flags.TC:
                    response = await dns.asyncquery.tcp(
                        message, address, port=port, timeout=DNS_UPSTREAM_TIMEOUT_S, backend=backend
                    )
                return response
        return None


def _reply(message: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    response = dns.message.make_response(message)
    response.set_rcode(rcode)
    return response.to_wire()


async def _receive_exactly(stream: anyio.abc.ByteReceiveStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += await stream.receive(size - len(data))
    return data


async def _copy(source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream) -> None:
    """One direction of a relay; its end half-closes the other side (the reply may still come)."""
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        while True:
            await sink.send(await source.receive(RELAY_CHUNK))
    with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
        await sink.send_eof()


# --- what a connection says first -------------------------------------------------------------------


async def read_preamble(stream: anyio.abc.ByteReceiveStream, timeout: float | None) -> tuple[bytes, str, str | None]:
    """(the bytes read, "tls"/"http"/"other", the SNI or Host they name or None), once they say what
    they are, the guest half-closes or ``timeout`` passes."""
    data = b""
    with anyio.move_on_after(math.inf if timeout is None else timeout):
        while (decided := classify(data)) is None:
            try:
                data += await stream.receive(PREAMBLE_LIMIT - len(data))
            except anyio.EndOfStream:
                break
        else:
            return data, *decided
    # Cut short: what it began as, naming nothing (nothing at all: judged by address).
    request = data.lstrip(b"\r\n")
    kind = "tls" if data[:1] == b"\x16" else "http" if request and _could_be_http(request) else "other"
    return data, kind, None


HTTP_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")


def classify(data: bytes) -> tuple[str, str | None] | None:
    """What ``data`` (a connection's first bytes) is: ("tls", SNI), ("http", Host) (either name
    None if absent or not a host name), ("other", None); None: more bytes are needed."""
    if not data:
        return None
    if data[0] == 0x16:
        sni = client_hello_sni(data)
        if sni is _MORE:
            return None if len(data) < PREAMBLE_LIMIT else ("tls", None)
        return "tls", sni if isinstance(sni, str) else None
    request = data.lstrip(b"\r\n")  # servers skip empty lines before a request line (RFC 9112 2.2)
    if not _could_be_http(request):
        return "other", None
    end = request.find(b"\r\n\r\n")
    if end < 0:
        return None if len(data) < PREAMBLE_LIMIT else ("http", None)
    return "http", http_host(request[:end]) if request.startswith(HTTP_METHODS) else None


def _could_be_http(data: bytes) -> bool:
    """Whether ``data`` begins an HTTP request (or could, with more bytes: empty, or a method cut short)."""
    return data.startswith(HTTP_METHODS) or any(method.startswith(data) for method in HTTP_METHODS)


def http_host(head: bytes) -> str | None:
    """The host name of an HTTP/1 request head's (only) Host header, without its port."""
    hosts = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:]
             if line[:5].lower() == b"host:"]  # fmt: skip
    if len(hosts) != 1:
        return None  # none, or two (which one would the server read?)
    host = hosts[0].decode("ascii", "replace")
    if host.startswith("["):
        return None  # an IPv6 literal names no host
    return normal_name(host.rsplit(":", 1)[0] if host.count(":") == 1 else host)


class _More:
    pass


_MORE = _More()


def client_hello_sni(data: bytes) -> str | None | _More:
    """The server name a TLS ClientHello (in handshake records, possibly several) asks for; None if
    it names none or is not a ClientHello; ``_MORE`` if ``data`` ends before the message does."""
    handshake = b""
    at = 0
    while True:
        if len(data) < at + 5:
            return _MORE
        kind, length = data[at], struct.unpack_from("!H", data, at + 3)[0]
        if kind != 0x16:
            return None
        if len(data) < at + 5 + length:
            return _MORE
        handshake += data[at + 5 : at + 5 + length]
        at += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != 0x01:
                return None  # not a ClientHello
            needed = 4 + int.from_bytes(handshake[1:4], "big")
            if len(handshake) >= needed:
                return _sni_of(handshake[4:needed])
            if needed > PREAMBLE_LIMIT:
                return None


def _sni_of(hello: bytes) -> str | None:
    try:
        at = 2 + 32  # client version, random
        at += 1 + hello[at]  # session id
        at += 2 + struct.unpack_from("!H", hello, at)[0]  # cipher suites
        at += 1 + hello[at]  # compression methods
        end = at + 2 + struct.unpack_from("!H", hello, at)[0]
        at += 2
        while at + 4 <= end:
            kind, length = struct.unpack_from("!HH", hello, at)
            at += 4
            if kind == 0:  # server_name: a list of (type, length, name); type 0 is a host name
                names = hello[at + 2 : at + length]
                while len(names) >= 3:
                    name_type, name_length = names[0], struct.unpack_from("!H", names, 1)[0]
                    if name_type == 0:
                        return normal_name(names[3 : 3 + name_length].decode("ascii", "replace"))
                    names = names[3 + name_length :]
                return None
            at += length
    except (IndexError, struct.error):
        pass
    return None


# --- netguard's hand-over -----------------------------------------------------------------------------

SYS_PIDFD_GETFD = 438  # the same on x86_64 and aarch64 (asm-generic)


def _thread_group(tid: int) -> int:
    """The process a thread belongs to (pidfd_open takes only a process before Linux 6.9)."""
    for line in Path(f"/proc/{tid}/status").read_text().splitlines():
        if line.startswith("Tgid:"):
            return int(line.split()[1])
    raise ProcessLookupError(tid)


def hand_over(libc_syscall: Callable[..., int], pid: int, fd: int, egress: Egress, destination: Destination) -> int:
    """Point QEMU's socket ``fd`` (being connected, in process ``pid``) at Egress's listener
    instead: bound first to a loopback port by which the listener knows ``destination``.  Returns
    what connect(2) returns for it: 0 or an errno (EINPROGRESS for QEMU's non-blocking sockets)."""
    pidfd = os.pidfd_open(_thread_group(pid))  # the notification names a thread; the descriptor table is its process's
    try:
        ours = libc_syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    if ours < 0:
        return errno.ECONNREFUSED
    with socket.socket(fileno=ours) as sock:  # a copy of QEMU's descriptor: closing it leaves QEMU's
        listener = egress.listener_for(sock.family)
        if sock.type != socket.SOCK_STREAM or listener is None:
            return errno.ECONNREFUSED
        sock.bind((listener[0], 0))
        port = sock.getsockname()[1]
        if not egress.expect(sock.family, port, destination):
            return errno.ECONNREFUSED
        result = sock.connect_ex(listener)
        if result not in (0, errno.EINPROGRESS):
            egress.forget(sock.family, port)
        return result
