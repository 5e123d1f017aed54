"""Secrets injected on egress without a VM (vmm/qemu/secrets.py): a real TLS upstream with its own
CA on loopback, the real egress preamble reader in front of ``inject``, and a "guest" client that
trusts only the VM's CA.  What the upstream receives, what the guest gets back, what is refused."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.abc
import h11
import pytest
from anyio.streams.tls import TLSListener
from hypothesis import given
from hypothesis import strategies as st
from oci_registry import Certificate, make_certificate

from machinen_async import MachinenError
from machinen_async.protocol.netpolicy import normal_name
from machinen_async.protocol.secret import PLACEHOLDER_PREFIX, SecretRule, SecretSlot
from machinen_async.store import registry
from machinen_async.vmm.qemu import egress, secrets
from machinen_async.vmm.qemu.secrets import VmCA, rewrite_headers

pytestmark = pytest.mark.anyio

KEY = "sk-the-real-key-0123456789"
OTHER_KEY = "gh-other-real-key-9876543210"
NAMES = ["api.example.test", "other.example.test", "x.wild.test"]


@dataclass
class Received:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes:
        (value,) = [v for n, v in self.headers if n == name]
        return value


@dataclass
class Events:
    seen: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    def __call__(self, message: str, /, **fields: object) -> None:
        self.seen.append((message, fields))

    def messages(self) -> list[str]:
        return [message for message, _ in self.seen]


@dataclass
class Upstream:
    """An HTTP/1.1 server over TLS: records each request, answers "hello <target>" (or, at /echo,
    the Authorization header it got, in the body and in an X-Echo header)."""

    requests: list[Received] = field(default_factory=list)
    connections: int = 0

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        self.connections += 1
        connection = h11.Connection(h11.SERVER)
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, h11.ProtocolError, ssl.SSLError):
                while isinstance(request := await next_event(connection, stream), h11.Request):
                    if connection.they_are_waiting_for_100_continue:
                        await stream.send(
                            connection.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                        )
                    body = b""
                    while isinstance(event := await next_event(connection, stream), h11.Data):
                        body += event.data
                    received = Received(request.method, request.target, list(request.headers), body)
                    self.requests.append(received)
                    payload = (
                        received.header(b"authorization") if request.target == b"/echo" else b"hello " + request.target
                    )
                    echoed = [("X-Echo", payload)] if request.target == b"/echo" else []
                    await stream.send(connection.send(h11.Response(
                        status_code=200, headers=[("Content-Length", str(len(payload))), *echoed])))  # fmt: skip
                    if request.method != b"HEAD":
                        await stream.send(connection.send(h11.Data(data=payload)))
                    await stream.send(connection.send(h11.EndOfMessage()))
                    if connection.our_state is not h11.DONE or request.target == b"/bye":  # bye: an idle timeout
                        return
                    connection.start_next_cycle()  # fmt: skip


async def next_event(connection: h11.Connection, stream: anyio.abc.ByteStream) -> h11.Event:
    while (event := connection.next_event()) is h11.NEED_DATA:
        try:
            connection.receive_data(await stream.receive())
        except anyio.EndOfStream:
            connection.receive_data(b"")
    return event  # type: ignore[return-value]


@dataclass
class PKI:
    ca: Certificate
    server: Certificate
    stranger: Certificate  # a CA the proxy does not trust


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_certificate(directory, "test-ca")
    return PKI(
        ca, make_certificate(directory, "upstream", issuer=ca, dns=NAMES), make_certificate(directory, "stranger")
    )


@dataclass
class Proxy:
    ca: VmCA
    port: int
    upstream: Upstream
    events: Events
    upstream_port: int

    async def connect(self, sni: str, context: ssl.SSLContext | None = None) -> anyio.abc.ByteStream:
        """A guest's connection to ``sni`` through the proxy, trusting the VM's CA (or ``context``)."""
        return await anyio.connect_tcp(
            "127.0.0.1", self.port, ssl_context=context or guest_context(self.ca), tls_hostname=sni,
            tls_standard_compatible=False,
        )  # fmt: skip


def guest_context(ca: VmCA) -> ssl.SSLContext:
    """A guest's client context: the VM's CA in its trust store, strict checks (as Python 3.13's)."""
    context = ssl.create_default_context(cadata=ca.ca_pem.decode())
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


@contextlib.asynccontextmanager
async def proxy(
    pki: PKI, rules: Sequence[SecretRule], *, upstream_ca: Certificate | None = None,
    current: list[SecretRule] | None = None,
) -> AsyncIterator[Proxy]:  # fmt: skip
    """The upstream server and, in front of it, the egress proxy's TLS path: ``egress.read_preamble``
    reads the ClientHello, ``inject`` does the rest (every SNI goes to the one upstream)."""
    upstream_server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    upstream_server.load_cert_chain(pki.server.cert_path, pki.server.key_path)
    upstream_trust = secrets.upstream_context()
    upstream_trust.load_verify_locations(cafile=(upstream_ca or pki.ca).cert_path)
    upstream, events = Upstream(), Events()
    ca = VmCA(name for rule in rules for name in rule.names)
    upstream_listener = TLSListener(
        await anyio.create_tcp_listener(local_host="127.0.0.1"), upstream_server, standard_compatible=False
    )
    upstream_port = upstream_listener.listener.extra(anyio.abc.SocketAttribute.local_port)
    # The upstream listens on a port of its own, not 443: the rules name it (same placeholders).
    # ``current``: the VM's secrets as they change (read at each request), by default ``rules``.

    def ported() -> list[SecretRule]:
        return [dataclasses.replace(rule, hosts=tuple(f"{name}:{upstream_port}" for name in rule.names))
                for rule in (rules if current is None else current)]  # fmt: skip

    async def handle(guest: anyio.abc.SocketStream) -> None:
        async with guest:
            preamble, kind, sni = await egress.read_preamble(guest, 5)
            assert kind == "tls" and sni is not None
            await secrets.inject(guest, preamble, sni, ("127.0.0.1", upstream_port), ported, ca, upstream_trust, events)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, upstream_listener, anyio.create_task_group() as tg:
        tg.start_soon(upstream_listener.serve, upstream.handle)
        tg.start_soon(listener.serve, handle)
        yield Proxy(ca, listener.extra(anyio.abc.SocketAttribute.local_port), upstream, events, upstream_port)
        tg.cancel_scope.cancel()


async def request(
    stream: anyio.abc.ByteStream,
    connection: h11.Connection,
    target: str,
    headers: Iterable[tuple[str, str]],
    *,
    method: str = "GET",
    body: Sequence[bytes] = (),
) -> tuple[h11.Response, bytes]:
    """One request on a guest's connection, and the response with its body."""
    sent = connection.send(h11.Request(method=method, target=target, headers=list(headers))) or b""
    sent += b"".join(connection.send(h11.Data(data=part)) or b"" for part in body)
    await stream.send(sent + (connection.send(h11.EndOfMessage()) or b""))
    response = await next_event(connection, stream)
    assert isinstance(response, h11.Response)
    data = b""
    while isinstance(event := await next_event(connection, stream), h11.Data):
        data += event.data
    assert isinstance(event, h11.EndOfMessage)
    return response, data


def openai() -> SecretRule:
    return SecretRule("OPENAI_API_KEY", KEY, ("api.example.test",))


async def get(
    p: Proxy, sni: str, headers: Iterable[tuple[str, str]], target: str = "/v1/models"
) -> tuple[h11.Response, bytes]:
    async with await p.connect(sni) as stream:
        return await request(stream, h11.Connection(h11.CLIENT), target, headers)


# --- end to end ----------------------------------------------------------------------------------


async def test_the_named_host_receives_the_value_and_the_guest_never_sees_it(pki: PKI) -> None:
    rule = openai()
    async with proxy(pki, [rule]) as p:
        response, body = await get(
            p, "api.example.test", [("Host", "api.example.test"), ("Authorization", f"Bearer {rule.placeholder}")]
        )
    assert response.status_code == 200 and body == b"hello /v1/models"
    (received,) = p.upstream.requests
    assert received.header(b"authorization") == f"Bearer {KEY}".encode()
    assert KEY.encode() not in body + b"".join(v for _, v in response.headers)
    assert p.events.seen == []


async def test_a_placeholder_sent_to_another_host_stays_and_is_reported(pki: PKI) -> None:
    rules = [openai(), SecretRule("GH_TOKEN", OTHER_KEY, ("other.example.test",))]
    async with proxy(pki, rules) as p:
        await get(p, "other.example.test", [("Host", "other.example.test"), ("Authorization", f"Bearer {rules[0].placeholder}"),
                                             ("X-Api-Key", rules[1].placeholder)])  # fmt: skip
    (received,) = p.upstream.requests
    assert received.header(b"authorization") == f"Bearer {rules[0].placeholder}".encode()
    assert received.header(b"x-api-key") == OTHER_KEY.encode()  # its own secret goes
    assert p.events.seen == [("secret placeholder sent to another host",
                              {"name": "OPENAI_API_KEY", "host": "other.example.test", "port": p.upstream_port,
                               "host_header": "other.example.test"})]  # fmt: skip


async def test_a_host_header_naming_another_host_gets_no_value(pki: PKI) -> None:
    """A front end shared by several names routes by Host: the value goes only where both say."""
    rule = openai()
    async with proxy(pki, [rule]) as p:
        await get(p, "api.example.test", [("Host", "other.example.test"), ("Authorization", rule.placeholder)])
    assert p.upstream.requests[0].header(b"authorization") == rule.placeholder.encode()
    assert p.events.messages() == ["secret placeholder sent to another host"]


async def test_headers_only_a_body_with_the_placeholder_passes_as_it_is(pki: PKI) -> None:
    rule = openai()
    payload = f'{{"key": "{rule.placeholder}"}}'.encode()
    async with proxy(pki, [rule]) as p, await p.connect("api.example.test") as stream:
        headers = [
            ("Host", "api.example.test"),
            ("Authorization", rule.placeholder),
            ("Content-Length", str(len(payload))),
        ]
        await request(stream, h11.Connection(h11.CLIENT), f"/q?key={rule.placeholder}", headers,
                                    method="POST", body=[payload])  # fmt: skip
    (received,) = p.upstream.requests
    assert received.body == payload and received.target == f"/q?key={rule.placeholder}".encode()
    assert received.header(b"authorization") == KEY.encode()


async def test_keep_alive_every_request_on_one_connection_is_rewritten(pki: PKI) -> None:
    rule = openai()
    async with proxy(pki, [rule]) as p, await p.connect("api.example.test") as stream:
        connection = h11.Connection(h11.CLIENT)
        for n in range(3):
            _, body = await request(
                stream, connection, f"/{n}", [("Host", "api.example.test"), ("Authorization", rule.placeholder)]
            )
            assert body == f"hello /{n}".encode()
            connection.start_next_cycle()
        _, body = await request(
            stream, connection, "/last", [("Host", "api.example.test"), ("Connection", "close")], method="HEAD"
        )
        assert body == b"" and connection.their_state is h11.MUST_CLOSE
    assert [r.header(b"authorization") for r in p.upstream.requests[:3]] == [KEY.encode()] * 3
    assert [r.method for r in p.upstream.requests] == [b"GET"] * 3 + [b"HEAD"]
    assert p.upstream.connections == 1


async def test_an_upstream_closing_an_idle_connection_closes_the_guests(pki: PKI) -> None:
    rule = openai()
    async with proxy(pki, [rule]) as p, await p.connect("api.example.test") as stream:
        response, _ = await request(stream, h11.Connection(h11.CLIENT), "/bye", [("Host", "api.example.test")])
        assert not any(name == b"connection" for name, _ in response.headers)  # kept alive, as far as it said
        with anyio.fail_after(60), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):  # a hang guard
            await stream.receive()


async def test_a_chunked_body_streams_through_intact(pki: PKI) -> None:
    rule = openai()
    parts = [os.urandom(size) for size in (1, 70000, 5, 200000)]
    async with proxy(pki, [rule]) as p, await p.connect("api.example.test") as stream:
        headers = [("Host", "api.example.test"), ("Authorization", rule.placeholder), ("Transfer-Encoding", "chunked")]
        response, body = await request(
            stream, h11.Connection(h11.CLIENT), "/upload", headers, method="POST", body=parts
        )
    assert response.status_code == 200 and body == b"hello /upload"
    assert p.upstream.requests[0].body == b"".join(parts)


async def test_a_body_waits_for_100_continue_from_the_upstream(pki: PKI) -> None:
    rule = openai()
    async with proxy(pki, [rule]) as p, await p.connect("api.example.test") as stream:
        connection = h11.Connection(h11.CLIENT)
        headers = [("Host", "api.example.test"), ("Authorization", rule.placeholder), ("Expect", "100-continue"),
                   ("Content-Length", "4")]  # fmt: skip
        await stream.send(connection.send(h11.Request(method="PUT", target="/put", headers=headers)) or b"")
        informational = await next_event(connection, stream)
        assert isinstance(informational, h11.InformationalResponse) and informational.status_code == 100
        await stream.send(
            b"".join(connection.send(event) or b"" for event in (h11.Data(data=b"body"), h11.EndOfMessage()))
        )
        response = await next_event(connection, stream)
        assert isinstance(response, h11.Response) and response.status_code == 200
    assert p.upstream.requests[0].body == b"body"
    assert p.upstream.requests[0].header(b"authorization") == KEY.encode()


async def test_a_response_header_echoing_the_value_is_scrubbed_a_body_is_not(pki: PKI) -> None:
    """Headers come back with the value put back to the placeholder; a body is relayed as it is
    (the documented limit: an upstream that echoes a request in its body hands the value back)."""
    rule = openai()
    async with proxy(pki, [rule]) as p:
        response, body = await get(
            p, "api.example.test", [("Host", "api.example.test"), ("Authorization", rule.placeholder)], "/echo"
        )
    assert dict(response.headers)[b"x-echo"] == rule.placeholder.encode()
    assert body == KEY.encode()


async def test_an_upstream_that_cannot_prove_its_name_gets_nothing(pki: PKI) -> None:
    rule = openai()
    async with proxy(pki, [rule], upstream_ca=pki.stranger) as p:
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError, OSError)):
            await get(p, "api.example.test", [("Host", "api.example.test"), ("Authorization", rule.placeholder)])
    assert p.upstream.requests == []
    ((message, fields),) = p.events.seen
    assert message == "secret host not reached" and fields["host"] == "api.example.test"
    assert "certificate verify failed" in str(fields["error"])


async def test_a_guest_that_does_not_trust_the_vm_ca_fails_its_handshake(pki: PKI) -> None:
    async with proxy(pki, [openai()]) as p:
        with pytest.raises(ssl.SSLCertVerificationError):
            await p.connect("api.example.test", ssl.create_default_context())
    assert p.upstream.requests == []


@pytest.mark.parametrize("refused", [
    ("CONNECT", "api.example.test:443", []),
    ("GET", "/socket", [("Upgrade", "websocket"), ("Connection", "Upgrade")]),
    ("TRACE", "/", []), ("trace", "/", []), ("TRACK", "/", []), ("get", "/", []),  # echo methods; only these
    ("POST", "/", [("X-HTTP-Method-Override", "TRACE")]),
    ("GET", "https://other.example.test/", []),
    ("GET", "//other.example.test/x", []),  # a network-path reference to some frameworks
    # Framed two ways: a server that trusts Content-Length reads the chunks as a second request.
    ("POST", "/", [("Content-Length", "4"), ("Transfer-Encoding", "chunked")]),
])  # fmt: skip
async def test_what_the_relay_does_not_carry_closes_the_connection(
    pki: PKI, refused: tuple[str, str, list[tuple[str, str]]]
) -> None:
    method, target, extra = refused
    rule = openai()
    async with proxy(pki, [rule]) as p, await p.connect("api.example.test") as stream:
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, h11.RemoteProtocolError)):
            await request(
                stream,
                h11.Connection(h11.CLIENT),
                target,
                [("Host", "api.example.test"), ("Authorization", rule.placeholder), *extra],
                method=method,
            )
    assert p.upstream.requests == []
    assert p.events.messages() == ["guest request to a secret host refused"]


@pytest.mark.parametrize("host", ["api.example.test:1@other.test", "api.example.test:{placeholder}",
                                  "api.example.test:8443", "api.example.test.other.test"])  # fmt: skip
async def test_a_host_header_that_is_not_exactly_the_sni_gets_no_value(pki: PKI, host: str) -> None:
    """ "NAME:1@other" reads as authority "other" to a URL parser; a placeholder in the Host's port
    would come back in redirects: only "NAME" or "NAME:PORT" of this connection passes, and the Host
    header itself is never rewritten."""
    rule = openai()
    async with proxy(pki, [rule]) as p:
        sent = host.format(placeholder=rule.placeholder)
        await get(p, "api.example.test", [("Host", sent), ("Authorization", rule.placeholder)])
    (received,) = p.upstream.requests
    assert received.header(b"host") == sent.encode() and received.header(b"authorization") == rule.placeholder.encode()
    assert p.events.messages() == ["secret placeholder sent to another host"]


async def test_a_placeholder_goes_only_in_the_headers_its_secret_names(pki: PKI) -> None:
    """Headers servers echo or keep (Origin, X-Request-Id, Content-Type, x-amz-meta-*) never get
    the value: only ``SecretRule(headers=)``, by default the headers API keys go in."""
    rule = openai()
    custom = SecretRule("CUSTOM", OTHER_KEY, ("api.example.test",), headers=("X-Custom-Key",))
    async with proxy(pki, [rule, custom]) as p:
        await get(p, "api.example.test", [("Host", "api.example.test"), ("Origin", rule.placeholder),
                                           ("X-Request-Id", rule.placeholder), ("X-Api-Key", rule.placeholder),
                                           ("X-Custom-Key", custom.placeholder), ("Authorization", custom.placeholder)])  # fmt: skip
    (received,) = p.upstream.requests
    assert received.header(b"origin") == received.header(b"x-request-id") == rule.placeholder.encode()
    assert received.header(b"x-api-key") == KEY.encode() and received.header(b"x-custom-key") == OTHER_KEY.encode()
    assert received.header(b"authorization") == custom.placeholder.encode()
    assert [fields["header"] for _, fields in p.events.seen] == ["origin", "x-request-id", "authorization"]


async def test_secrets_changed_apply_to_the_next_request_of_an_open_connection(pki: PKI) -> None:
    """``inject`` reads the secrets at each request: one taken away is not put in after that,
    even on a connection kept alive from before."""
    rule = openai()
    current: list[SecretRule] = [rule]
    async with proxy(pki, [rule], current=current) as p, await p.connect("api.example.test") as stream:
        connection = h11.Connection(h11.CLIENT)
        for _ in range(2):
            await request(stream, connection, "/", [("Host", "api.example.test"), ("Authorization", rule.placeholder)])
            connection.start_next_cycle()
            current.clear()
    assert [r.header(b"authorization") for r in p.upstream.requests] == [KEY.encode(), rule.placeholder.encode()]


async def test_a_wildcard_host_rule_covers_the_names_below_it(pki: PKI) -> None:
    rule = SecretRule("WILD", KEY, ["*.wild.test"])
    async with proxy(pki, [rule]) as p:
        await get(p, "x.wild.test", [("Host", "x.wild.test"), ("Authorization", rule.placeholder)])
    assert p.upstream.requests[0].header(b"authorization") == KEY.encode()
    assert rule.goes_to("x.wild.test", 443) and rule.goes_to("a.b.wild.test", 443)
    assert not rule.goes_to("wild.test", 443) and not rule.goes_to("x.wild.test", 8443)


# --- the VM's CA ---------------------------------------------------------------------------------


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> str | None:
    """A TLS handshake in memory; the ALPN protocol the client got."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(client_in, client_out, server_hostname=name)
    server_side = server.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(4):
        for side in (client_side, server_side):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    client_side.do_handshake()
    return client_side.selected_alpn_protocol()


def test_the_ca_vouches_for_the_secret_hosts_with_http1_only() -> None:
    ca = VmCA(["api.example.test", "*.wild.test"])
    assert handshake(ca.context_for("api.example.test"), guest_context(ca), "api.example.test") == "http/1.1"
    assert handshake(ca.context_for("a.b.wild.test"), guest_context(ca), "a.b.wild.test") == "http/1.1"
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(ca.context_for("api.example.test"), guest_context(ca), "other.example.test")


def test_the_ca_name_constraints_refuse_other_names() -> None:
    """Even its key could not vouch for a name outside the secrets' hosts in the guest."""
    ca = VmCA(["api.example.test"])
    with pytest.raises(ssl.SSLCertVerificationError, match="subtree"):
        handshake(ca.context_for("bank.test"), guest_context(ca), "bank.test")


def test_another_vm_ca_is_not_trusted() -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(
            VmCA(["api.example.test"]).context_for("api.example.test"),
            guest_context(VmCA(["api.example.test"])),
            "api.example.test",
        )


def test_the_leaf_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets, "LEAF_CACHE_SIZE", 3)
    ca = VmCA(["*.example.test"])
    first = ca.context_for("a.example.test")
    assert ca.context_for("a.example.test") is first
    for name in ("b", "c", "d"):
        ca.context_for(f"{name}.example.test")
    assert ca.context_for("d.example.test") is ca.context_for("d.example.test")
    assert ca.context_for("a.example.test") is not first  # the least recently used went


# --- rules and rewriting -------------------------------------------------------------------------


def test_a_secret_rule_never_shows_its_value() -> None:
    rule = SecretRule("OPENAI_API_KEY", KEY, ["API.Example.TEST"])
    assert KEY not in repr(rule) and KEY not in str(rule)
    assert rule.hosts == ("api.example.test",)
    prefix, random = rule.placeholder.rsplit("-", 1)
    assert prefix == "machinen-secret-OPENAI_API_KEY" and len(random) == 24 and int(random, 16) >= 0
    assert SecretRule("OPENAI_API_KEY", KEY, ["api.example.test"]).placeholder != rule.placeholder


@pytest.mark.parametrize("name, value, hosts", [
    ("NOT-A-NAME", KEY, ["a.test"]), ("K", "two\r\nlines", ["a.test"]), ("K", " padded", ["a.test"]),
    ("K", KEY, []), ("K", KEY, "a.test"), ("K", KEY, ["10.0.0.1"]), ("K", KEY, ["a.test:x"]), ("K", KEY, [3]),
    ("K\n", KEY, ["a.test"]), ("K", KEY + "\n", ["a.test"]),  # a final newline ("$" would let it through)
    ("K", KEY, ["*.test"]),  # a wildcard over a whole top-level domain
])  # fmt: skip
def test_a_bad_secret_is_a_typed_error(name: str, value: str, hosts: object) -> None:
    with pytest.raises(MachinenError) as caught:
        SecretRule(name, value, hosts)  # type: ignore[arg-type]
    assert caught.value.code == "BOOT_SECRET_INVALID"
    assert KEY not in str(caught.value)


@pytest.mark.parametrize("placeholder", [
    "application/json; charset=utf-8",  # text benign requests carry: the proxy would replace it in them
    f"{PLACEHOLDER_PREFIX}OTHER-{'0' * 24}",  # another secret's
    f"{PLACEHOLDER_PREFIX}K-{'0' * 23}", f"{PLACEHOLDER_PREFIX}K-{'G' * 24}", f"{PLACEHOLDER_PREFIX}K-{'0' * 24}\n",
])  # fmt: skip
def test_only_a_placeholder_machinen_makes_is_taken_from_a_bundle(placeholder: str) -> None:
    assert SecretSlot("K", ("a.test",), f"{PLACEHOLDER_PREFIX}K-{'0' * 24}").placeholder.endswith("0" * 24)
    with pytest.raises(MachinenError) as caught:
        SecretSlot("K", ("a.test",), placeholder)
    assert caught.value.code == "BOOT_SECRET_INVALID"


def test_a_vm_name_or_host_name_with_a_final_newline_is_not_one() -> None:
    with pytest.raises(MachinenError) as caught:
        registry.validate_name("vm\n")
    assert caught.value.code == "REGISTRY_NAME_INVALID"
    assert normal_name("api.example.test\n") is None and normal_name("API.example.test.") == "api.example.test"


header_names = st.sampled_from([b"authorization", b"x-api-key", b"cookie", b"accept"])
header_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20).map(str.encode)
RULES = [SecretRule("A", "value-of-a", ["api.example.test"]), SecretRule("B", "value-of-b", ["*.example.test"]),
         SecretRule("C", "value-of-c", ["elsewhere.test"])]  # fmt: skip


@st.composite
def request_headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """Headers with placeholders of the rules here and there, and a Host header or not."""
    pieces = st.one_of(header_text, st.sampled_from([rule.placeholder.encode() for rule in RULES]))
    headers = [
        (draw(header_names), b"".join(draw(st.lists(pieces, max_size=4)))) for _ in range(draw(st.integers(0, 5)))
    ]
    host = draw(st.sampled_from([None, b"api.example.test", b"API.example.test:443", b"b.example.test", b"other.test"]))
    return headers if host is None else [(b"host", host), *headers]


@given(
    headers=request_headers(),
    sni=st.sampled_from(["api.example.test", "b.example.test", "elsewhere.test", "none.test"]),
)
def test_rewriting_replaces_exactly_the_placeholders_that_may_go(headers: list[tuple[bytes, bytes]], sni: str) -> None:
    rewritten = rewrite_headers(headers, sni, 443, RULES)
    host = secrets.request_host(headers)
    destined = host is not None and host[0] == sni and host[1] in (None, 443)
    assert [name for name, _ in rewritten.headers] == [name for name, _ in headers]
    for rule in RULES:
        present = any(rule.placeholder.encode() in value for _, value in headers)
        goes = destined and rule.goes_to(sni, 443)
        for (name, sent), (_, out) in zip(headers, rewritten.headers, strict=True):
            here = rule.placeholder.encode() in sent
            replaced = here and goes and name.decode() in rule.headers
            assert (rule.placeholder.encode() in out) == (here and not replaced)
            assert (rule.value.encode() in out) == replaced or rule.value.encode() in sent
        assert (rule.name in rewritten.elsewhere) == (present and not goes)
        if not goes:
            assert not any(rule.value.encode() in v for _, v in rewritten.headers)


def test_rewriting_changes_nothing_without_placeholders() -> None:
    headers = [(b"host", b"api.example.test"), (b"authorization", b"Bearer mine")]
    assert rewrite_headers(headers, "api.example.test", 443, RULES) == secrets.Rewritten(headers, [], [])
