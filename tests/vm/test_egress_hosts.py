"""The egress tests' hosts (tests/egress_hosts.py) do what those tests rely on: the DNS server
answers only its records and logs every query, the HTTP(S) hosts record SNI, Host and headers,
and nothing is left behind. Boots no VM; needs root for the network namespace."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from egress_hosts import EgressNetwork, test_network, unavailable

RECORDS = {"allowed.test": ".3", "denied.test": ".4", "cdn.test": ".3"}


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EgressNetwork]:
    if reason := unavailable():
        pytest.skip(reason)
    with test_network(
        tmp_path_factory.mktemp("egress"),
        records=RECORDS,
        txt_records={"policy.test": "v=test1"},
        wildcard_zones={"wild.test": ".5"},
    ) as network:
        yield network


def ask(net: EgressNetwork, name: str, kind: str = "A", *, tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, kind)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(query, net.dns_server, timeout=5)


def answers(response: dns.message.Message) -> list[str]:
    return [item.to_text() for rrset in response.answer for item in rrset]


def test_dns_answers_only_its_records(net: EgressNetwork) -> None:
    assert answers(ask(net, "allowed.test")) == [net.address(".3")]
    assert answers(ask(net, "denied.test", tcp=True)) == [net.address(".4")]
    assert answers(ask(net, "policy.test", "TXT")) == ['"v=test1"']
    assert answers(ask(net, "deep.sub.wild.test")) == [net.address(".5")]
    missing = ask(net, "missing.test")
    assert missing.rcode() == dns.rcode.NXDOMAIN and not missing.answer
    outside = ask(net, "example.com")  # asked of no one: there is no upstream
    assert outside.rcode() == dns.rcode.NXDOMAIN and not outside.answer
    asked = net.queries()
    for name in ("allowed.test", "denied.test", "policy.test", "deep.sub.wild.test", "missing.test", "example.com"):
        assert name in asked
    assert "never-asked.test" not in asked


class NamedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to ``address`` sending (and checking the certificate against) the server name
    ``name``, as a client that resolved ``name`` to ``address`` does."""

    def __init__(self, address: str, name: str, context: ssl.SSLContext) -> None:
        super().__init__(address, 443, timeout=10)
        self.name, self.tls = name, context

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self.tls.wrap_socket(self.sock, server_hostname=self.name)


def test_https_records_sni_and_headers(net: EgressNetwork) -> None:
    before = len(net.requests())
    connection = NamedHTTPSConnection(net.address(".3"), "allowed.test", ssl.create_default_context(cafile=net.ca_pem))
    for path in ("/first", "/second"):  # two requests on one kept-alive connection
        connection.request("GET", path, headers={"Host": "allowed.test", "X-Test-Header": "hello"})
        response = connection.getresponse()
        assert response.status == 200
        body = json.loads(response.read())
        assert body["host"] == net.address(".3") and body["sni"] == "allowed.test"
        assert body["headers"]["x-test-header"] == "hello"
    connection.close()
    seen = net.requests()[before:]
    assert [(r["host"], r["port"], r["tls"], r["sni"], r["method"], r["path"]) for r in seen] == [
        (net.address(".3"), 443, True, "allowed.test", "GET", "/first"),
        (net.address(".3"), 443, True, "allowed.test", "GET", "/second"),
    ]
    assert seen[0]["headers"]["host"] == "allowed.test"


def test_http_records_host_and_body(net: EgressNetwork) -> None:
    before = len(net.requests())
    connection = http.client.HTTPConnection(net.address(".3"), 80, timeout=10)
    connection.request("POST", "/upload?x=1", body=b"payload", headers={"Host": "cdn.test"})
    assert json.loads(connection.getresponse().read())["path"] == "/upload?x=1"
    connection.request("PUT", "/chunked", body=iter([b"ab", b"cd"]), encode_chunked=True)
    assert json.loads(connection.getresponse().read())["body"] == "abcd"
    connection.close()
    first, second = net.requests()[before:]
    assert (first["tls"], first["sni"], first["method"], first["path"]) == (False, None, "POST", "/upload?x=1")
    assert first["headers"]["host"] == "cdn.test" and first["body"] == "payload"
    assert ("Host", "cdn.test") in [tuple(line) for line in first["header_lines"]]
    assert (second["method"], second["body"]) == ("PUT", "abcd")


def test_every_host_serves_its_names(net: EgressNetwork) -> None:
    """Each host's certificate names what points at it: a client checking it against that name passes."""
    context = ssl.create_default_context(cafile=net.ca_pem)
    for host, name in ((".4", "denied.test"), (".5", "x.wild.test"), (".5", "wild.test"), (".3", net.address(".3"))):
        with (
            socket.create_connection((net.address(host), 443), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=name) as tls,
        ):
            assert tls.version() is not None
    with (
        socket.create_connection((net.address(".4"), 443), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(raw, server_hostname="allowed.test")  # not a name of .4


def test_the_namespace_reaches_nothing_else(net: EgressNetwork) -> None:
    routes = subprocess.run(["ip", "-n", net.namespace, "route"], capture_output=True, text=True, check=True).stdout
    assert "default" not in routes
    outside = subprocess.run(
        ["ip", "-n", net.namespace, "route", "get", "192.0.2.1"], capture_output=True, text=True, check=False
    )
    assert outside.returncode != 0 and "unreachable" in outside.stderr


def test_exit_leaves_nothing(tmp_path: Path) -> None:
    if reason := unavailable():
        pytest.skip(reason)
    with test_network(tmp_path, records={"a.test": ".3"}) as network:
        assert network.namespace in namespaces()
    assert network.namespace not in namespaces()
    assert (
        subprocess.run(["ip", "link", "show", network.host_interface], capture_output=True, check=False).returncode != 0
    )
    assert not processes_of(tmp_path)
    with pytest.raises(RuntimeError), test_network(tmp_path / "failing", records={"a.test": ".3"}) as network:
        raise RuntimeError("a test fails inside")
    assert network.namespace not in namespaces()
    assert not processes_of(tmp_path)


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def processes_of(directory: Path) -> list[str]:
    """Processes whose command line names ``directory`` (dnsmasq's log, the server's config)."""
    out = subprocess.run(["pgrep", "-af", str(directory)], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]
