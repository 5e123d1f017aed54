"""Egress by name (issue 29), for real: a QEMU guest resolves and connects through its host's
resolver and proxy to test hosts in a network namespace (tests/egress_hosts.py: dnsmasq that logs
every query, HTTP/HTTPS servers that record every request with its SNI)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from egress_hosts import EgressNetwork, test_network, unavailable

from machinen_async import VM, NetworkPolicy, boot

pytestmark = pytest.mark.anyio

# Run in the guest (stdlib only): one probe per argument, a JSON line each.
PROBE = r'''
import json, os, socket, ssl, struct, sys

CA = "/tmp/test-ca.pem"

def resolve(name):
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(name, 443, socket.AF_INET, socket.SOCK_STREAM)})
    except socket.gaierror as error:
        return "gaierror %d" % error.errno

def rcode(name, qtype):
    """Ask the guest's resolver (/etc/resolv.conf's) over UDP; the answer's rcode name."""
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    query = struct.pack("!HHHHHH", 0x4d4e, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", qtype, 1)
    server = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(10)
    s.sendto(query, (server, 53))
    answer = s.recv(4096)
    return {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}.get(answer[3] & 15, answer[3] & 15)

def request(address, port, tls_name, host):
    """One GET to address:port (TLS with SNI tls_name if given) saying Host: host."""
    try:
        raw = socket.create_connection((address, port), timeout=15)
        if tls_name is not None:
            raw = ssl.create_default_context(cafile=CA).wrap_socket(raw, server_hostname=tls_name)
        raw.sendall(("GET /probe HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host).encode())
        data = b""
        while True:
            chunk = raw.recv(65536)
            if not chunk:
                break
            data += chunk
        return data.split(b"\r\n", 1)[0].decode() if data else "closed"
    except OSError as error:
        return type(error).__name__ + " " + (os.strerror(error.errno) if error.errno else str(error))

for probe in sys.argv[1:]:
    kind, *args = json.loads(probe)
    result = {"resolve": resolve, "rcode": rcode, "request": request}[kind](*args)
    print(json.dumps(result))
'''


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EgressNetwork]:
    if reason := unavailable():
        pytest.skip(reason)
    records = {"allowed.test": ".3", "cdn.test": ".3", "denied.test": ".4", "other.test": ".5",
               "api.zone.test": ".5", "sibling.zone.test": ".5"}  # fmt: skip
    with (
        test_network(tmp_path_factory.mktemp("egress"), records=records, wildcard_zones={"wild.test": ".5"}) as network,
        pytest.MonkeyPatch.context() as env,
    ):  # what each VM's resolver asks (supervisors inherit it)
        env.setenv("MACHINEN_DNS_SERVERS", network.dns_server)
        yield network


async def probe(vm: VM, net: EgressNetwork, *probes: list[object]) -> list[object]:
    await vm.write_file("/tmp/test-ca.pem", net.ca_pem.read_bytes())
    await vm.write_file("/tmp/probe.py", PROBE.encode())
    done = await vm.exec(["python3", "/tmp/probe.py", *map(json.dumps, probes)], check=True, timeout=120)
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


def https(name: str, address: str | None = None, sni: str | None = None) -> list[object]:
    return ["request", address or name, 443, sni or name, name]


POLICY = NetworkPolicy(allow=["allowed.test", "*.wild.test"], deny=["denied.test", "bad.wild.test"])


async def test_names_decide_what_resolves_and_what_connects(net: EgressNetwork, anyio_backend: str) -> None:
    allowed, denied = net.address("allowed.test"), net.address("denied.test")
    async with boot(name=f"egress-{anyio_backend}", network=POLICY) as vm:
        seen_before = len(net.requests())
        results = await probe(
            vm, net,
            ["resolve", "allowed.test"],
            https("allowed.test"),
            ["request", "allowed.test", 80, None, "allowed.test"],  # plain HTTP, Host checked
            ["resolve", "denied.test"],
            ["request", denied, 443, "denied.test", "denied.test"],  # its address, never resolved here
            ["resolve", "other.test"],  # neither allowed nor denied: an allow list
            ["resolve", "x1.wild.test"],
            ["resolve", "bad.wild.test"],  # deny wins over a wildcard allow
            https("allowed.test", sni="cdn.test"),  # an allowed address, another name on it
            ["request", allowed, 80, None, "cdn.test"],
            ["request", "10.0.2.2", 22, None, "x"],  # the host stays closed
        )  # fmt: skip
        assert results == [
            [allowed], "HTTP/1.1 200 OK", "HTTP/1.1 200 OK",
            "gaierror -2", "ConnectionRefusedError Connection refused",
            "gaierror -2",
            [net.address(".5")],
            "gaierror -2",
            results[8], "closed",
            "ConnectionRefusedError Connection refused",
        ], results  # fmt: skip
        assert results[8] != "HTTP/1.1 200 OK"  # reset in the handshake: the SNI is not a name of .3 here
        served = net.requests()[seen_before:]
        assert [(r["sni"], r["headers"]["host"]) for r in served] == [("allowed.test", "allowed.test"),
                                                                     (None, "allowed.test")]  # fmt: skip
        asked = set(net.queries())
        assert "allowed.test" in asked and "x1.wild.test" in asked
        assert not asked & {"denied.test", "other.test", "bad.wild.test"}  # refused on the host


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_dns_exfiltration_through_a_sibling_name_never_leaves_the_host(net: EgressNetwork) -> None:
    """An allowed zone's sibling, queried for TXT under a random label: NXDOMAIN from the host."""
    async with boot(name="egress-txt", network=NetworkPolicy(allow=["api.zone.test"])) as vm:
        secret_label = "c2VjcmV0LWRhdGE"
        results = await probe(
            vm, net, ["rcode", "api.zone.test", 1], ["rcode", f"{secret_label}.sibling.zone.test", 16]
        )
        assert results == ["NOERROR", "NXDOMAIN"]
        assert not [name for name in net.queries() if secret_label in name]


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_the_policy_changes_at_runtime_and_a_fork_can_be_narrowed(net: EgressNetwork) -> None:
    async with boot(name="egress-live", network=NetworkPolicy(allow=["allowed.test"])) as vm:
        assert await probe(vm, net, ["resolve", "other.test"]) == ["gaierror -2"]
        await vm.set_network(NetworkPolicy(allow=["allowed.test", "other.test"]))
        assert vm.network == NetworkPolicy(allow=["allowed.test", "other.test"])
        assert await probe(vm, net, https("other.test")) == ["HTTP/1.1 200 OK"]
        async with vm.fork(network=NetworkPolicy(allow=["other.test"])) as narrowed:
            assert await probe(narrowed, net, ["resolve", "allowed.test"], https("other.test")) == [
                "gaierror -2", "HTTP/1.1 200 OK"]  # fmt: skip
            assert (await narrowed.describe())["network_policy"]["allow"] == ["other.test"]
            async with vm.fork() as inheriting:  # the source's policy as it is now, and what it resolved:
                other = net.address("other.test")  # an address the sibling's own resolver never gave it
                assert await probe(inheriting, net, https("other.test", address=other)) == ["HTTP/1.1 200 OK"]
        await vm.set_network(NetworkPolicy(allow=["allowed.test"]))
        other = net.address("other.test")  # resolved for this VM a moment ago, but no longer allowed
        assert await probe(vm, net, ["resolve", "other.test"], https("other.test", address=other),
                           https("allowed.test")) == [
            "gaierror -2", "ConnectionRefusedError Connection refused", "HTTP/1.1 200 OK"]  # fmt: skip
        await vm.set_network(NetworkPolicy.closed())
        assert await probe(vm, net, ["resolve", "allowed.test"]) == ["gaierror -2"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_default_policy_resolves_everything_but_denied_names(net: EgressNetwork) -> None:
    async with boot(name="egress-open", network=NetworkPolicy(deny=["denied.test"])) as vm:
        results = await probe(
            vm, net, ["resolve", "other.test"], https("other.test"), ["resolve", "denied.test"],
            https("denied.test", address=net.address("denied.test")),  # by address, naming a denied host
            ["request", net.address("sibling.zone.test"), 80, None, "never-resolved.test"],  # open: any address
        )  # fmt: skip
        assert results[:3] == [[net.address("other.test")], "HTTP/1.1 200 OK", "gaierror -2"]
        assert results[3] != "HTTP/1.1 200 OK"
        assert results[4] == "HTTP/1.1 200 OK"  # an open policy: addresses are open, only names denied
