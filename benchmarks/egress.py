"""Egress by name (issue 29): HTTPS request rate from a guest through its VM's egress proxy vs
direct, and DNS lookups through the host's filtering resolver; one VM, compared inside one run
(this machine is noisy).

    python benchmarks/egress.py [--requests 200] [--rounds 3] [--lookups 200]

Setup (not timed): test hosts in a network namespace (tests/egress_hosts.py: dnsmasq, an HTTPS
server with a test CA); nothing connects anywhere else.  One VM; its policy switches with
``vm.set_network`` between ``NetworkPolicy(allow=["bench.test"])`` (an allow list: every connection
goes through the proxy, which reads the ClientHello's SNI before it relays) and ``NetworkPolicy()``
(open: QEMU connects directly; DNS still goes through the resolver).  In the guest a Python client
makes ``--requests`` HTTPS requests, each on a new TLS connection (the proxy's cost is per
connection), and then as many on one keep-alive connection; rounds alternate the two policies.

Then secrets (``vm.give_secrets``: a secret for ``secret.bench.test``, a second name of the same
test host): rounds alternate requests to ``secret.bench.test`` (the proxy terminates the guest's
TLS with the VM's CA, opens its own verified TLS upstream and rewrites the headers: ``injected``)
with requests to ``bench.test`` (checked and relayed as before: ``proxied_beside``).

Prints one JSON object: per policy and mode, the median rate (requests/s) over the rounds, and the
ratios proxied / direct and injected / proxied; DNS lookups/s through the guest's stub and the
host's resolver.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import anyio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from egress_hosts import test_network, unavailable

from machinen_async import NetworkPolicy, Secret, boot
from machinen_async.sdk.network import secret_rules

CLIENT = r"""
import http.client, json, os, socket, ssl, sys, time
mode, count, host, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
context = ssl.create_default_context(cafile=cafile or None)  # none: the guest's trust (the VM's CA)
headers = {"Authorization": "Bearer " + os.environ.get("BENCH_KEY", "none")}
start = time.perf_counter()
if mode == "lookups":
    for _ in range(count):
        socket.getaddrinfo(host, 443, socket.AF_INET, socket.SOCK_STREAM)
elif mode == "new":
    for _ in range(count):
        connection = http.client.HTTPSConnection(host, context=context, timeout=30)
        connection.request("GET", "/", headers=headers)
        connection.getresponse().read()
        connection.close()
else:
    connection = http.client.HTTPSConnection(host, context=context, timeout=30)
    for _ in range(count):
        connection.request("GET", "/", headers=headers)
        connection.getresponse().read()
print(json.dumps(count / (time.perf_counter() - start)))
"""
TEST_CA = "/tmp/test-ca.pem"


async def main(requests: int, rounds: int, lookups: int) -> dict[str, object]:
    proxied, direct = NetworkPolicy(allow=["bench.test", "secret.bench.test"]), NetworkPolicy()
    rates: dict[str, list[float]] = {
        f"{policy}_{mode}": []
        for policy in ("proxied", "direct", "injected", "proxied_beside")
        for mode in ("new", "keepalive")
    }
    records = {"bench.test": ".3", "secret.bench.test": ".3"}
    with tempfile.TemporaryDirectory() as directory, test_network(Path(directory), records=records) as net:
        os.environ["MACHINEN_DNS_SERVERS"] = net.dns_server
        os.environ["SSL_CERT_FILE"] = str(net.ca_pem)  # what the supervisor trusts upstream (secrets)
        async with boot(name="bench-egress", network=proxied) as vm:
            await vm.write_file(TEST_CA, net.ca_pem.read_bytes())
            await vm.write_file("/tmp/client.py", CLIENT.encode())

            async def rate(mode: str, count: int, host: str = "bench.test", cafile: str = TEST_CA) -> float:
                argv = ["python3", "/tmp/client.py", mode, str(count), host, cafile]
                done = await vm.exec(argv, check=True, timeout=600)
                return float(json.loads(done.stdout))

            await rate("new", 5)  # warm: the guest's page cache, the resolver's first answer
            for round_ in range(rounds):
                order = (("proxied", proxied), ("direct", direct))
                for name, policy in order if round_ % 2 == 0 else order[::-1]:
                    await vm.set_network(policy)
                    rates[f"{name}_new"].append(await rate("new", requests))
                    rates[f"{name}_keepalive"].append(await rate("keepalive", requests))
            lookup_rate = await rate("lookups", lookups)

            await vm.set_network(proxied)
            await vm.give_secrets(
                secret_rules({"BENCH_KEY": Secret("bench-value-0123456789", hosts=["secret.bench.test"])})
            )
            await rate("new", 5, "secret.bench.test", "")  # warm: the VM CA's first leaf
            sent = net.requests()[-1]["headers"]["authorization"]
            assert sent == "Bearer bench-value-0123456789", "the value went in place of the placeholder"
            for round_ in range(rounds):
                order = (("injected", ("secret.bench.test", "")), ("proxied_beside", ("bench.test", TEST_CA)))
                for name, (host, cafile) in order if round_ % 2 == 0 else order[::-1]:
                    rates[f"{name}_new"].append(await rate("new", requests, host, cafile))
                    rates[f"{name}_keepalive"].append(await rate("keepalive", requests, host, cafile))
    medians = {key: round(statistics.median(values), 1) for key, values in rates.items()}
    return {
        "requests_per_round": requests,
        "rounds": rounds,
        "https_requests_per_s": medians,
        "proxied_over_direct": {
            mode: round(medians[f"proxied_{mode}"] / medians[f"direct_{mode}"], 3) for mode in ("new", "keepalive")
        },
        "injected_over_proxied": {
            mode: round(medians[f"injected_{mode}"] / medians[f"proxied_beside_{mode}"], 3)
            for mode in ("new", "keepalive")
        },
        "dns_lookups_per_s": round(lookup_rate, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lookups", type=int, default=200)
    arguments = parser.parse_args()
    if reason := unavailable():
        sys.exit(f"egress benchmark: {reason}")
    print(json.dumps(anyio.run(main, arguments.requests, arguments.rounds, arguments.lookups), indent=2))
