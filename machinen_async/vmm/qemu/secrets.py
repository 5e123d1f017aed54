"""Secrets that never enter the VM: the guest holds a placeholder, the host's egress proxy puts the
real value into the outbound HTTP request headers of connections to the hosts the secret names.

``boot(secrets={"OPENAI_API_KEY": Secret(value, hosts=["api.openai.com"])})`` becomes one
``SecretRule`` per secret, in the supervisor's memory only: its value is never written to the
guest, a disk, a snapshot, a log or ``repr``.  The guest's environment holds ``rule.placeholder``
(``machinen-secret-OPENAI_API_KEY-<24 random hex>``: recognisable in a log, not guessable).

When the guest opens a TLS connection whose SNI a secret's host matches, the egress proxy
(``egress.py``), which has read the ClientHello already, calls ``inject``:

- It connects to where the guest meant to go and speaks TLS there for that SNI, verifying the real
  certificate with ``upstream_context`` (the host's trust store).  A server that cannot prove it is
  that name gets nothing: the guest's connection is closed.  So a guest that points a secret host's
  name at an address of its choosing still sends the value only to that name's real owner.
- It terminates the guest's TLS with a certificate for the SNI signed by ``VmCA``, a certificate
  authority made for this VM alone, which the guest trusts (its certificate is installed at boot;
  its key never leaves the supervisor's memory).  The CA's name constraints permit only the
  secrets' host names, so even its key could vouch for nothing else in the guest.
- It relays HTTP/1.1 (h11 on both sides).  In the values of the headers a secret may go in
  (``SecretRule.headers``: Authorization, X-Api-Key... never Host, Origin or others servers echo
  or keep; not the request target, not the body) its placeholder becomes its value when the SNI
  and port match one of that secret's hosts and the request's Host header is exactly the SNI
  (with this port, if it names one): a shared front end routing by Host would otherwise pass the
  value on to a neighbour.  The secrets are read at each request, so a change applies to
  connections already open.  A placeholder left as it is (another host, another header) is
  reported (``on_event``): code in the guest sending a key where it does not belong is worth
  knowing about.  Response headers get the values put back to placeholders.  Bodies stream
  through in bounded chunks.

Limits:

- HTTP/1.1 only: ALPN offers the guest ``http/1.1`` alone, so HTTP/2 clients fall back; a client
  that speaks only HTTP/2 (gRPC) fails its handshake.
- Only GET, HEAD, POST, PUT, PATCH, DELETE and OPTIONS (``TRACE`` echoes the request, value
  included; ``CONNECT`` tunnels), no method override to another, no ``Upgrade`` (WebSockets), a
  target that is a path (not "//host/..."), and never both Content-Length and Transfer-Encoding
  (framed two ways: request smuggling): anything else closes the connection.
- Response bodies are relayed as they are: an upstream that echoes a request's headers in its
  body (a debugging endpoint) hands the value to the guest.  That is the secret host's doing; pick
  hosts that do not.
- A client that pins certificates, or brings its own trust store and ignores ``SSL_CERT_FILE``,
  does not trust the VM's CA and fails its handshake to the secret hosts.
- Plain HTTP carries no secret: ``inject`` is for TLS.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import ipaddress
import os
import re
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio
import anyio.abc
import h11
from anyio.streams.tls import TLSAttribute, TLSStream
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ...protocol.netpolicy import normal_name
from ...protocol.secret import SecretRule

MAX_HEADER_BYTES = 65536  # a request's or response's head; more closes the connection
RELAY_CHUNK = 65536
UPSTREAM_CONNECT_TIMEOUT_S = 30.0
HANDSHAKE_TIMEOUT_S = 30.0
CLOSE_NOTIFY_TIMEOUT_S = 2.0
LEAF_CACHE_SIZE = 256  # leaf contexts kept per VM: the secret hosts are few, a wildcard's names may not be
CERTIFICATE_LIFETIME = datetime.timedelta(days=3650)  # trusted by one VM only, for as long as it runs
CLOCK_SKEW = datetime.timedelta(days=2)  # a guest's clock may lag the host's (a restored snapshot)
ALPN = ["http/1.1"]


# --- header rewriting ----------------------------------------------------------------------------

Header = tuple[bytes, bytes]


def request_host(headers: Sequence[Header]) -> tuple[str, int | None] | None:
    """The host name and port a request's (only) Host header names: ``NAME`` or ``NAME:PORT``
    exactly; None for anything else (none, several, an address, "NAME:1@other", ...)."""
    hosts = [value for name, value in headers if name.lower() == b"host"]
    if len(hosts) != 1:
        return None
    found = _HOST.fullmatch(hosts[0].decode("ascii", "replace").strip())
    name = normal_name(found["name"]) if found is not None else None
    if found is None or name is None:
        return None
    return name, int(found["port"]) if found["port"] else None


_HOST = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)(?::(?P<port>[0-9]{1,5}))?")


def _as_text(host: tuple[str, int | None] | None) -> str:
    """A Host header as ``request_host`` read it, for a log line ("" if it named none)."""
    return "" if host is None else host[0] if host[1] is None else f"{host[0]}:{host[1]}"


def carries_placeholder(data: bytes, secret: SecretRule) -> bool:
    return secret.placeholder.encode() in data


@dataclass(frozen=True)
class Rewritten:
    """A request's headers after ``rewrite_headers``, and what stayed as the guest sent it."""

    headers: list[Header]
    elsewhere: list[str]  # secrets whose placeholder went toward a host they may not go to
    wrong_header: list[tuple[str, str]]  # (secret, header): a placeholder in a header it may not go in


def rewrite_headers(headers: Sequence[Header], sni: str, port: int, secrets: Sequence[SecretRule]) -> Rewritten:
    """``headers`` with each placeholder of a secret that may go to ``sni`` on ``port`` replaced by
    its value in the values of the headers that secret may go in, when the Host header names
    ``sni`` (and that port, if it names one) too; what was left as it was, by why."""
    host = request_host(headers)
    destined = host is not None and host[0] == sni and host[1] in (None, port)
    rewritten: list[Header] = []
    elsewhere: set[str] = set()
    wrong_header: list[tuple[str, str]] = []
    for name, value in headers:
        header = name.decode("ascii", "replace").lower()
        for secret in secrets:
            if not carries_placeholder(value, secret):
                continue
            if not (destined and secret.goes_to(sni, port)):
                elsewhere.add(secret.name)
            elif header not in secret.headers:
                wrong_header.append((secret.name, header[:64]))
            else:
                value = value.replace(secret.placeholder.encode(), secret.value.encode())
        rewritten.append((name, value))
    return Rewritten(rewritten, sorted(elsewhere), wrong_header)


def scrub(headers: Sequence[Header], secrets: Sequence[SecretRule]) -> list[Header]:
    """Response ``headers`` with each secret's value put back to its placeholder: an upstream that
    echoes a request header (CORS, a request id, a redirect) does not hand the guest the value."""
    scrubbed = []
    for name, value in headers:
        for secret in secrets:
            value = value.replace(secret.value.encode(), secret.placeholder.encode())
        scrubbed.append((name, value))
    return scrubbed


# --- the VM's certificate authority --------------------------------------------------------------


def _permitted_subtree(pattern: str) -> str:
    """The name constraint that covers a host pattern: "*.example.com" -> "example.com" (which
    permits the names below it, RFC 5280 4.2.1.10), a name -> itself."""
    return pattern.removeprefix("*.")


class VmCA:
    """A certificate authority for one VM's guest, in memory only: ``ca_pem`` goes into the guest's
    trust store; ``context_for(sni)`` is a TLS server context presenting a certificate for ``sni``
    signed by it.  ``hosts`` (the secrets' host patterns) become its name constraints: clients that
    honour them (OpenSSL, Go, NSS, rustls) accept its certificates for those names only."""

    def __init__(self, hosts: Iterable[str]) -> None:
        now = datetime.datetime.now(datetime.UTC)
        self._not_before: datetime.datetime = now - CLOCK_SKEW
        self._not_after: datetime.datetime = now + CERTIFICATE_LIFETIME
        self._key: ec.EllipticCurvePrivateKey = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key: ec.EllipticCurvePrivateKey = ec.generate_private_key(
            ec.SECP256R1()
        )  # one for every leaf: they live here only
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"machinen VM egress CA {os.urandom(4).hex()}")])
        # Non-critical, though RFC 5280 says critical: the stacks that know name constraints
        # enforce them either way, and a critical one makes the few that do not (mbedTLS) reject
        # the CA altogether.  IP addresses are excluded: the CA never vouches for an address.
        constraints = x509.NameConstraints(
            permitted_subtrees=[x509.DNSName(_permitted_subtree(host)) for host in sorted(set(hosts))] or None,
            excluded_subtrees=[x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
                               x509.IPAddress(ipaddress.ip_network("::/0"))],
        )  # fmt: skip
        self.certificate: x509.Certificate = (
            self._builder(subject, subject, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(constraints, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self._contexts: collections.OrderedDict[str, ssl.SSLContext] = collections.OrderedDict()

    @property
    def ca_pem(self) -> bytes:
        """The CA's certificate, for the guest's trust store."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def _builder(
        self, subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )

    def leaf_for(self, sni: str) -> x509.Certificate:
        """A server certificate for host name ``sni``, signed by this CA."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "machinen egress")])  # the SAN names it
        return (
            self._builder(subject, self.certificate.subject, self._leaf_key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(sni)]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def context_for(self, sni: str) -> ssl.SSLContext:
        """A TLS server context for ``sni`` (ALPN: http/1.1 only), the last ``LEAF_CACHE_SIZE`` kept."""
        context = self._contexts.pop(sni, None) or self._new_context(sni)
        self._contexts[sni] = context
        while len(self._contexts) > LEAF_CACHE_SIZE:
            self._contexts.popitem(last=False)
        return context

    def _new_context(self, sni: str) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(ALPN)
        chain = self.leaf_for(sni).public_bytes(serialization.Encoding.PEM) + self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # ssl loads a certificate and key only from a file.  A memfd is a file in no file system:
        # the key is never on a disk (nor on a tmpfs another process could list), and it is gone
        # when the descriptor closes, right after loading.
        fd = os.memfd_create("machinen-leaf", os.MFD_CLOEXEC)
        try:
            with open(fd, "wb", closefd=False) as file:
                file.write(chain)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return context


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )  # fmt: skip


def upstream_context() -> ssl.SSLContext:
    """How the proxy checks a secret host: the host's trust store, and HTTP/1.1 (what it relays)."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(ALPN)
    return context


# --- the relay -----------------------------------------------------------------------------------


class EventSink(Protocol):
    """Where ``inject`` reports what the guest did (the caller budgets the log lines)."""

    def __call__(self, message: str, /, **fields: object) -> None: ...


class Replayed(anyio.abc.ByteStream):
    """A stream whose first bytes received are ``preamble`` (already read from ``stream``)."""

    def __init__(self, stream: anyio.abc.ByteStream, preamble: bytes) -> None:
        self._stream: anyio.abc.ByteStream = stream
        self._preamble: bytes = preamble

    async def receive(self, max_bytes: int = RELAY_CHUNK) -> bytes:
        if self._preamble:
            data, self._preamble = self._preamble[:max_bytes], self._preamble[max_bytes:]
            return data
        return await self._stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


class _Refused(Exception):
    """A request the relay does not carry: the connection closes."""


_CLOSED = (h11.ProtocolError, _Refused, anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
           OSError, ssl.SSLError)  # fmt: skip


Secrets = Callable[[], Sequence[SecretRule]]  # the VM's secrets as they are now: read at each request


async def inject(
    guest: anyio.abc.ByteStream,
    preamble: bytes,
    sni: str,
    destination: tuple[str, int],
    secrets: Secrets,
    ca: VmCA,
    upstream_context: ssl.SSLContext,
    on_event: EventSink,
) -> None:
    """Carry the guest's TLS connection to ``sni`` (of which ``preamble``, its ClientHello, has been
    read), with the secrets put in its requests' headers, to ``destination`` (address, port),
    until either side closes; returns then, or at once if the upstream is not ``sni``."""
    address, port = destination
    try:
        with anyio.fail_after(UPSTREAM_CONNECT_TIMEOUT_S):
            upstream = await anyio.connect_tcp(
                address, port, ssl_context=upstream_context, tls_hostname=sni, tls_standard_compatible=False
            )
    except (*_CLOSED, TimeoutError) as error:
        on_event("secret host not reached", host=sni, address=address, port=port, error=str(error)[:300])
        return
    async with upstream:
        if upstream.extra(TLSAttribute.alpn_protocol) not in (None, "http/1.1"):
            return  # an upstream_context that offered h2 too
        try:
            with anyio.fail_after(HANDSHAKE_TIMEOUT_S):
                tls = await TLSStream.wrap(
                    Replayed(guest, preamble),
                    server_side=True,
                    ssl_context=ca.context_for(sni),
                    standard_compatible=False,
                )
        except (*_CLOSED, TimeoutError):
            return  # the guest does not trust the CA, or said something else
        async with tls:
            await relay_requests(tls, upstream, (sni, port), secrets, on_event)
            # Say the end in TLS (close_notify), so a guest reading a body to the end is not left
            # wondering whether it was cut; wait a little for the guest to say it too.
            with anyio.move_on_after(CLOSE_NOTIFY_TIMEOUT_S), contextlib.suppress(*_CLOSED):
                await tls.unwrap()


async def relay_requests(
    guest: anyio.abc.ByteStream,
    upstream: anyio.abc.ByteStream,
    server_name: tuple[str, int],
    secrets: Secrets,
    on_event: EventSink,
) -> None:
    """HTTP/1.1 from ``guest`` to ``upstream`` (``server_name``: its SNI and port) and back,
    request after request, headers rewritten (``rewrite_headers``, with the secrets as they are
    at that request), responses' headers scrubbed, until a side closes, breaks the protocol or a
    request is refused."""
    sni, port = server_name
    server = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)  # facing the guest
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)  # facing the upstream
    with contextlib.suppress(*_CLOSED):
        while True:
            request = await _next_request(server, guest, upstream)
            if not isinstance(request, h11.Request):
                return  # a side closed between requests
            _check(request, sni, on_event)
            now = secrets()
            rewritten = rewrite_headers(list(request.headers.raw_items()), sni, port, now)
            for name in rewritten.elsewhere:
                on_event("secret placeholder sent to another host", name=name, host=sni, port=port,
                         host_header=_as_text(request_host(rewritten.headers)))  # fmt: skip
            for name, header in rewritten.wrong_header:
                on_event("secret placeholder in a header it may not go in", name=name, host=sni, header=header)
            forwarded = h11.Request(method=request.method, target=request.target, headers=rewritten.headers)
            if not await _exchange(forwarded, server, guest, client, upstream, now):
                return
            server.start_next_cycle()
            client.start_next_cycle()


async def _next_request(
    server: h11.Connection, guest: anyio.abc.ByteStream, upstream: anyio.abc.ByteStream
) -> h11.Event | None:
    """The guest's next request, or None when the upstream closes (an idle keep-alive timing out)
    first: the guest's connection closes then too, so its connection pool sees it gone rather
    than sending a request into a dead one."""
    request: h11.Event | None = None
    async with anyio.create_task_group() as tg:

        async def upstream_gone() -> None:
            with contextlib.suppress(*_CLOSED):
                await upstream.receive()  # nothing is due between responses: whatever comes ends it
            tg.cancel_scope.cancel()

        tg.start_soon(upstream_gone)
        with contextlib.suppress(*_CLOSED):
            (request,) = await _events(server, guest)
        tg.cancel_scope.cancel()
    return request


# Methods a secret's host is sent: TRACE (and IIS's TRACK) echo the request, CONNECT tunnels.
METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})
METHOD_OVERRIDES = frozenset({b"x-http-method-override", b"x-http-method", b"x-method-override"})


def _check(request: h11.Request, sni: str, on_event: EventSink) -> None:
    """Refuse what the relay cannot carry as HTTP/1.1 requests, what would echo a secret, and what
    two servers could frame two ways (request smuggling)."""
    headers = [(name.lower(), value) for name, value in request.headers]
    names = {name for name, _ in headers}
    reason = None
    if request.method not in METHODS:
        reason = f"method {request.method[:16].decode('ascii', 'replace')}"
    elif any(name in METHOD_OVERRIDES and value.strip().upper() not in METHODS for name, value in headers):
        reason = "method override"
    elif b"upgrade" in names:
        reason = "upgrade"
    elif b"content-length" in names and b"transfer-encoding" in names:
        reason = "both Content-Length and Transfer-Encoding"  # RFC 9112 6.3: framed two ways
    elif not (request.target.startswith(b"/") or (request.target == b"*" and request.method == b"OPTIONS")):
        reason = "target not a path"
    elif request.target.startswith(b"//"):
        reason = "target names a host"  # "//other/x" is a network-path reference to some frameworks
    if reason is not None:
        on_event("guest request to a secret host refused", host=sni, reason=reason)
        raise _Refused(reason)


async def _exchange(
    request: h11.Request,
    server: h11.Connection,
    guest: anyio.abc.ByteStream,
    client: h11.Connection,
    upstream: anyio.abc.ByteStream,
    secrets: Sequence[SecretRule],
) -> bool:
    """The request up and the response down, at once (a server may answer before the body ends,
    or ask for it with 100 Continue); whether the connection can carry another request."""
    broken = False

    async def request_up() -> None:
        nonlocal broken
        try:
            await _relay_request(request, server, guest, client, upstream)
        except _CLOSED:
            broken = True
            tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(request_up)
        try:
            await _relay_response(client, upstream, server, guest, secrets)
        except _CLOSED:
            broken = True
        if broken or server.their_state not in (h11.DONE, h11.MUST_CLOSE):
            tg.cancel_scope.cancel()  # answered before the request ended: this connection cannot go on
            return False
    return not broken and server.our_state is h11.DONE and client.their_state is h11.DONE


async def _relay_request(
    request: h11.Request,
    server: h11.Connection,
    guest: anyio.abc.ByteStream,
    client: h11.Connection,
    upstream: anyio.abc.ByteStream,
) -> None:
    """The request's head, then its body as it comes, through to its end.  Every event that can
    be parsed is, before bytes are sent: the request is known complete (``server.their_state``
    DONE) before its last bytes leave, so a response cannot seem to overtake its end."""
    events = [request, *_parsed(server)]
    while True:
        await upstream.send(b"".join(client.send(event) or b"" for event in events))
        if server.their_state is not h11.SEND_BODY:
            return
        events = await _events(server, guest)


async def _relay_response(
    client: h11.Connection,
    upstream: anyio.abc.ByteStream,
    server: h11.Connection,
    guest: anyio.abc.ByteStream,
    secrets: Sequence[SecretRule],
) -> None:
    """Informational responses, the response and its body, through to its end."""
    while client.their_state is not h11.DONE:
        events = await _events(client, upstream)
        if any(isinstance(event, h11.ConnectionClosed) for event in events):
            raise anyio.EndOfStream
        await guest.send(b"".join(server.send(_as_sent(event, secrets)) or b"" for event in events))


def _as_sent(event: h11.Event, secrets: Sequence[SecretRule]) -> h11.Event:
    """An event received by one h11 connection, to send with another (a response's headers
    keep their original case, and are scrubbed of the secrets' values)."""
    if isinstance(event, h11.Response):
        headers = scrub(list(event.headers.raw_items()), secrets)
        return h11.Response(status_code=event.status_code, headers=headers, reason=event.reason)
    if isinstance(event, h11.InformationalResponse):
        headers = scrub(list(event.headers.raw_items()), secrets)
        return h11.InformationalResponse(status_code=event.status_code, headers=headers, reason=event.reason)
    return event


def _parsed(connection: h11.Connection) -> list[h11.Event]:
    """The events ``connection`` can parse from what it has received, up to the end of a message."""
    events: list[h11.Event] = []
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            return events
        if not isinstance(event, h11.Event):  # PAUSED: a protocol switch, whose requests are refused before
            raise _Refused("paused")
        events.append(event)
        if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed | h11.Request | h11.Response):
            return events


async def _events(connection: h11.Connection, stream: anyio.abc.ByteStream) -> list[h11.Event]:
    """``_parsed``, after receiving (``RELAY_CHUNK`` at a time) until there is at least one."""
    while not (events := _parsed(connection)):
        connection.receive_data(await _receive(stream))
    return events


async def _receive(stream: anyio.abc.ByteStream) -> bytes:
    """Bytes, or b"" at the end (h11's way of saying so)."""
    try:
        return await stream.receive(RELAY_CHUNK)
    except anyio.EndOfStream:
        return b""
