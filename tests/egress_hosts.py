"""Test hosts with addresses of their own, for the egress tests: names, DNS and HTTP(S) that
never leave this machine.

``test_network(directory, ...)`` makes a network namespace joined to the root namespace by a
veth pair on a free ``10.213.N.0/24``: the root side is ``.1``, the namespace holds ``.2`` (the
test DNS server: dnsmasq, answering only the records given) and ``.3``, ``.4``, ``.5`` (the test
hosts: HTTP on port 80 and HTTPS on 443, certificates from a test CA). Whatever the host side
opens to those addresses (a proxy, QEMU's user-mode network) reaches them through the veth's
connected route. The namespace has no default route, so nothing in it reaches anything else.

Every DNS query (``queries()``) and HTTP request (``requests()``) is recorded, so a test can
prove what reached them and what never did.

Needs root (network namespaces, veth), ``ip`` (iproute2) and ``dnsmasq`` (dnsmasq-base).
Run as a script (``python egress_hosts.py <config.json>``), this file is the hosts' HTTP(S)
server, started inside the namespace.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from oci_registry import make_certificate

DNSMASQ = "/usr/sbin/dnsmasq"
HOST_SUFFIXES = (".3", ".4", ".5")
HTTP_PORTS = {80: False, 443: True}  # port -> TLS


class Request(TypedDict):
    """One HTTP request as a test host saw it (and the JSON body it answered with)."""

    host: str  # the address it was sent to
    port: int
    tls: bool
    sni: str | None  # the server name the client's TLS ClientHello carried
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    header_lines: list[tuple[str, str]]  # every header as sent, in order, names as sent
    body: str


def unavailable() -> str | None:
    """Why this machine cannot make a test network (a reason to skip), or None."""
    if os.geteuid() != 0:
        return "the egress test hosts need root: network namespaces and veth pairs"
    if shutil.which("ip") is None:
        return "the egress test hosts need `ip` (iproute2)"
    if not Path(DNSMASQ).exists():
        return "the egress test hosts need dnsmasq: apt-get install dnsmasq-base (make test-deps)"
    return None


@dataclass(frozen=True)
class EgressNetwork:
    """A running test network (see ``test_network``)."""

    namespace: str
    host_interface: str  # the root side of the veth pair
    prefix: str  # "10.213.N"
    records: Mapping[str, str]  # A records: name -> address
    ca_pem: Path  # the test CA every HTTPS host's certificate chains to
    dns_log: Path
    request_log: Path

    def address(self, host: str) -> str:
        """``".3"`` -> ``"10.213.N.3"``; a name of an A record -> its address."""
        return f"{self.prefix}{host}" if host.startswith(".") else self.records[host]

    @property
    def network(self) -> str:
        return f"{self.prefix}.0/24"

    @property
    def gateway(self) -> str:
        """The root namespace's address on the test network (where every client comes from)."""
        return self.address(".1")

    @property
    def dns_server(self) -> str:
        return self.address(".2")

    @property
    def hosts(self) -> tuple[str, ...]:
        """The HTTP(S) hosts' addresses."""
        return tuple(self.address(suffix) for suffix in HOST_SUFFIXES)

    def queries(self) -> list[str]:
        """The names the DNS server was asked, in order (any record type)."""
        text = self.dns_log.read_text() if self.dns_log.exists() else ""
        return re.findall(r" query\[\w+\] (\S+) from ", text)

    def requests(self) -> list[Request]:
        """Every HTTP(S) request the hosts answered, in order."""
        if not self.request_log.exists():
            return []
        return [json.loads(line) for line in self.request_log.read_text().splitlines()]


@contextmanager
def test_network(
    directory: Path,
    *,
    records: Mapping[str, str] | None = None,
    txt_records: Mapping[str, str] | None = None,
    wildcard_zones: Mapping[str, str] | None = None,
    certificate_names: Mapping[str, Sequence[str]] | None = None,
) -> Iterator[EgressNetwork]:
    """A test network whose DNS server answers ``records`` (A: name -> address), ``txt_records``
    (name -> text) and ``wildcard_zones`` (zone -> address for the zone and every name under it),
    and NXDOMAIN for anything else; it asks no one. An address is ``".3"``-style (on the test
    network) or a whole IPv4 address (anywhere: say, to test what a resolver does with a name
    that points at loopback). Each HTTPS host's certificate names the names that point at it
    (``*.zone`` for a zone), its address, and any extra ``certificate_names`` (address -> names).

    Files (certificates, logs) go under ``directory``. On exit, even on error: the servers are
    stopped and waited for, the veth pair and the namespace removed."""
    directory.mkdir(parents=True, exist_ok=True)
    prefix = _free_prefix()
    name = f"mneg-{secrets.token_hex(4)}"
    net = EgressNetwork(
        namespace=name,
        host_interface=name,
        prefix=prefix,
        records={host: _full(prefix, address) for host, address in (records or {}).items()},
        ca_pem=directory / "egress-test-ca.pem",
        dns_log=directory / "dnsmasq.log",
        request_log=directory / "requests.jsonl",
    )
    zones = {zone: _full(prefix, address) for zone, address in (wildcard_zones or {}).items()}
    with ExitStack() as cleanup:
        _create_namespace(net, cleanup)
        dnsmasq = [
            DNSMASQ,
            "--no-daemon",  # stays our child, so we stop and wait for it
            "--conf-file=/dev/null",  # not the machine's /etc/dnsmasq.conf, if any
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--local=/#/",  # every name is local: answer from the records below or NXDOMAIN, never forward
            f"--listen-address={net.dns_server}",
            "--bind-interfaces",
            "--user=root",  # not nobody: its log is under ``directory``, which may be root's alone (pytest's are 0700)
            f"--pid-file={directory / 'dnsmasq.pid'}",
            "--log-queries",
            f"--log-facility={net.dns_log}",
            *(f"--host-record={host},{address}" for host, address in net.records.items()),
            *(f"--txt-record={host},{text}" for host, text in (txt_records or {}).items()),
            *(f"--address=/{zone}/{address}" for zone, address in zones.items()),
        ]
        cleanup.enter_context(_serving(net, dnsmasq, directory / "dnsmasq.out", [(net.dns_server, 53)]))
        config = directory / "egress-hosts.json"
        config.write_text(json.dumps(_server_config(net, directory, zones, certificate_names or {})))
        server = [sys.executable, str(Path(__file__).resolve()), str(config)]
        listeners = [(host, port) for host in net.hosts for port in HTTP_PORTS]
        cleanup.enter_context(_serving(net, server, directory / "egress-hosts.out", listeners))
        yield net


test_network.__test__ = False  # type: ignore[attr-defined]  # a test module imports it: not a test itself


def _full(prefix: str, address: str) -> str:
    """``".3"`` on the test network, or a whole address; checked, since dnsmasq would read a
    malformed one in a record as one more name."""
    return str(ipaddress.IPv4Address(f"{prefix}{address}" if address.startswith(".") else address))


def _free_prefix() -> str:
    """A ``10.213.N`` whose /24 overlaps no address of this machine (another session's test
    network included)."""
    used = [
        ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network
        for interface in json.loads(_ip("-j", "addr").stdout)
        for info in interface.get("addr_info", [])
    ]
    candidates = [
        n for n in range(1, 255) if not any(ipaddress.ip_network(f"10.213.{n}.0/24").overlaps(u) for u in used)
    ]
    if not candidates:
        raise RuntimeError("no free 10.213.N.0/24 for a test network")
    return f"10.213.{random.choice(candidates)}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _create_namespace(net: EgressNetwork, cleanup: ExitStack) -> None:
    """The namespace and the veth pair, their removal registered on ``cleanup`` as each exists."""
    _ip("netns", "add", net.namespace)
    cleanup.callback(_ip, "netns", "del", net.namespace, check=False)
    _ip("link", "add", net.host_interface, "type", "veth", "peer", "name", "eth0", "netns", net.namespace)
    # Deleting one end deletes both: the pair goes now, not whenever the namespace is freed.
    cleanup.callback(_ip, "link", "del", net.host_interface, check=False)
    _ip("addr", "add", f"{net.gateway}/24", "dev", net.host_interface)
    _ip("link", "set", net.host_interface, "up")
    for suffix in (".2", *HOST_SUFFIXES):
        _ip("-n", net.namespace, "addr", "add", f"{net.address(suffix)}/24", "dev", "eth0")
    _ip("-n", net.namespace, "link", "set", "eth0", "up")
    _ip("-n", net.namespace, "link", "set", "lo", "up")


@contextmanager
def _serving(
    net: EgressNetwork, command: Sequence[str], output: Path, listeners: Sequence[tuple[str, int]]
) -> Iterator[None]:
    """``command`` running in the namespace until exit, once it accepts TCP on every listener
    (connecting from the root namespace, as the clients under test will)."""
    with output.open("ab") as out:
        # `ip netns exec` execs the command: the process is the server itself.
        process = subprocess.Popen(
            ["ip", "netns", "exec", net.namespace, *command], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        for address, port in listeners:
            _wait_accepting(process, address, port, output)
        yield
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _wait_accepting(process: subprocess.Popen[bytes], address: str, port: int, output: Path) -> None:
    """Until ``address:port`` accepts; else the process's ``output`` (named after it) says why."""
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection((address, port), timeout=1):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{output.stem} did not listen on {address}:{port}:\n{output.read_text()[-3000:]}")
            time.sleep(0.05)


def _server_config(
    net: EgressNetwork, directory: Path, zones: Mapping[str, str], extra_names: Mapping[str, Sequence[str]]
) -> dict[str, object]:
    """What the server script reads: where to log, and each host's certificate and key."""
    ca = make_certificate(directory, "egress-test-ca")
    hosts = {}
    for address in net.hosts:
        names = [name for name, target in net.records.items() if target == address]
        names += [name for zone, target in zones.items() if target == address for name in (zone, f"*.{zone}")]
        names += extra_names.get(address, [])
        certificate = make_certificate(directory, address, issuer=ca, dns=names, ips=[address])
        hosts[address] = {"cert": str(certificate.cert_path), "key": str(certificate.key_path)}
    return {"log": str(net.request_log), "hosts": hosts}


# --- the hosts' HTTP(S) server, run inside the namespace -----------------------------------------


class _HostServer(http.server.ThreadingHTTPServer):
    """One listener of one host; with ``tls``, each connection's handshake happens on its own
    thread (so a stalled client holds up no one), recording the SNI it sent."""

    daemon_threads = True
    request_queue_size = 1024  # a benchmark opens connections in bursts

    def __init__(self, address: str, port: int, tls: ssl.SSLContext | None, record: Callable[[Request], None]) -> None:
        self.address, self.port, self.tls, self.record = address, port, tls, record
        super().__init__((address, port), _Handler)

    def finish_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: object) -> None:
        if self.tls is not None:
            assert isinstance(request, socket.socket)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return  # a client that gave up or refused our certificate: nothing to answer
        super().finish_request(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: _HostServer

    def answer(self) -> None:
        body = self.read_body().decode(errors="replace")
        headers: dict[str, str] = {}
        for key, value in self.headers.items():
            headers[key.lower()] = f"{headers[key.lower()]}, {value}" if key.lower() in headers else value
        record = Request(
            host=self.server.address,
            port=self.server.port,
            tls=self.server.tls is not None,
            sni=getattr(self.connection, "sni", None),
            method=self.command,
            path=self.path,
            headers=headers,
            header_lines=list(self.headers.items()),
            body=body,
        )
        self.server.record(record)  # before answering: a client that has the answer finds the record
        data = json.dumps(record).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def read_body(self) -> bytes:
        """All of the request's body, so the next request on the connection starts where it should."""
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # the CRLF after each chunk
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(chunks)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = answer

    def log_message(self, format: str, *args: object) -> None:
        pass  # the JSON log is the record


def _tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def remember_sni(connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        connection.sni = server_name  # type: ignore[union-attr]  # read by the handler

    context.sni_callback = remember_sni
    return context


def _serve(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    log = os.open(config["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    lock = threading.Lock()

    def record(request: Request) -> None:
        with lock:
            os.write(log, json.dumps(request).encode() + b"\n")  # one write: a reader sees whole lines

    servers = [
        _HostServer(address, port, _tls_context(files["cert"], files["key"]) if tls else None, record)
        for address, files in config["hosts"].items()
        for port, tls in HTTP_PORTS.items()
    ]
    threads = [threading.Thread(target=server.serve_forever, daemon=True) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()  # until SIGTERM


if __name__ == "__main__":
    _serve(sys.argv[1])
