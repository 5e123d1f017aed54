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

Prints one JSON object: per policy and mode, the median rate (requests/s) over the rounds, and the
ratio proxied / direct; DNS lookups/s through the guest's stub and the host's resolver.
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

from machinen_async import NetworkPolicy, boot

CLIENT = r"""
import http.client, json, socket, ssl, sys, time
mode, count = sys.argv[1], int(sys.argv[2])
context = ssl.create_default_context(cafile="/tmp/test-ca.pem")
start = time.perf_counter()
if mode == "lookups":
    for _ in range(count):
        socket.getaddrinfo("bench.test", 443, socket.AF_INET, socket.SOCK_STREAM)
elif mode == "new":
    for _ in range(count):
        connection = http.client.HTTPSConnection("bench.test", context=context, timeout=30)
        connection.request("GET", "/")
        connection.getresponse().read()
        connection.close()
else:
    connection = http.client.HTTPSConnection("bench.test", context=context, timeout=30)
    for _ in range(count):
        connection.request("GET", "/")
        connection.getresponse().read()
print(json.dumps(count / (time.perf_counter() - start)))
"""


async def main(requests: int, rounds: int, lookups: int) -> dict[str, object]:
    proxied, direct = NetworkPolicy(allow=["bench.test"]), NetworkPolicy()
    rates: dict[str, list[float]] = {
        f"{policy}_{mode}": [] for policy in ("proxied", "direct") for mode in ("new", "keepalive")
    }
    with tempfile.TemporaryDirectory() as directory, test_network(Path(directory), records={"bench.test": ".3"}) as net:
        os.environ["MACHINEN_DNS_SERVERS"] = net.dns_server
        async with boot(name="bench-egress", network=proxied) as vm:
            await vm.write_file("/tmp/test-ca.pem", net.ca_pem.read_bytes())
            await vm.write_file("/tmp/client.py", CLIENT.encode())

            async def rate(mode: str, count: int) -> float:
                done = await vm.exec(["python3", "/tmp/client.py", mode, str(count)], check=True, timeout=600)
                return float(json.loads(done.stdout))

            await rate("new", 5)  # warm: the guest's page cache, the resolver's first answer
            for round_ in range(rounds):
                order = (("proxied", proxied), ("direct", direct))
                for name, policy in order if round_ % 2 == 0 else order[::-1]:
                    await vm.set_network(policy)
                    rates[f"{name}_new"].append(await rate("new", requests))
                    rates[f"{name}_keepalive"].append(await rate("keepalive", requests))
            lookup_rate = await rate("lookups", lookups)
    medians = {key: round(statistics.median(values), 1) for key, values in rates.items()}
    return {
        "requests_per_round": requests,
        "rounds": rounds,
        "https_requests_per_s": medians,
        "proxied_over_direct": {
            mode: round(medians[f"proxied_{mode}"] / medians[f"direct_{mode}"], 3) for mode in ("new", "keepalive")
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
