"""Secrets that never enter the VM (issue 29), for real: a guest sends a placeholder; the HTTPS
test host named by the secret receives the value, any other host the placeholder; the value is in
no byte of the guest's RAM or disk (a snapshot of it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from egress_hosts import EgressNetwork, test_network, unavailable

from machinen_async import NetworkPolicy, Secret, boot
from machinen_async.store.manifest import DISK, MEM, STATE

pytestmark = pytest.mark.anyio

VALUE = "sk-test-5f1d0c2e9a7b4c61"

# In the guest: one GET each to the named hosts, saying Authorization: Bearer $API_KEY.
CLIENT = r"""
import json, os, ssl, sys, urllib.request
results = []
for url, cafile in zip(sys.argv[1::2], sys.argv[2::2]):
    context = ssl.create_default_context(cafile=cafile or None)  # none: the guest's own trust (SSL_CERT_FILE)
    request = urllib.request.Request(url, headers={"Authorization": "Bearer " + os.environ["API_KEY"]})
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as answer:
            results.append(answer.status)
    except Exception as error:
        results.append(type(error).__name__ + ": " + str(error)[:200])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EgressNetwork]:
    if reason := unavailable():
        pytest.skip(reason)
    with (
        test_network(
            tmp_path_factory.mktemp("secrets"), records={"api.secret.test": ".3", "other.test": ".5"}
        ) as network,
        pytest.MonkeyPatch.context() as env,
    ):  # what each VM's supervisor asks and trusts upstream (supervisors inherit it)
        env.setenv("MACHINEN_DNS_SERVERS", network.dns_server)
        env.setenv("SSL_CERT_FILE", str(network.ca_pem))
        yield network


def count_in(path: Path, needle: bytes) -> int:
    found, tail = 0, b""
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            found += (tail + chunk).count(needle)
            tail = chunk[-len(needle) + 1 :]
    return found


async def test_a_secret_goes_to_its_host_only_and_never_into_the_vm(
    net: EgressNetwork, tmp_path: Path, anyio_backend: str
) -> None:
    policy = NetworkPolicy(allow=["api.secret.test", "other.test"])
    secrets = {"API_KEY": Secret(VALUE, hosts=["api.secret.test"])}
    async with boot(name=f"secret-{anyio_backend}", network=policy, secrets=secrets) as vm:
        placeholder = vm.placeholders["API_KEY"]
        assert placeholder.startswith("machinen-secret-API_KEY-") and VALUE not in repr(secrets)
        seen = (await vm.exec(["sh", "-c", "echo $API_KEY"], check=True)).stdout.decode().strip()
        assert seen == placeholder
        assert (await vm.describe())["secrets"] == [{"name": "API_KEY", "hosts": ["api.secret.test"]}]
        await vm.write_file("/tmp/test-ca.pem", net.ca_pem.read_bytes())
        await vm.write_file("/tmp/client.py", CLIENT.encode())
        before = len(net.requests())
        done = await vm.exec(["python3", "/tmp/client.py", "https://api.secret.test/a", "",
                              "https://other.test/b", "/tmp/test-ca.pem"], check=True, timeout=120)  # fmt: skip
        assert json.loads(done.stdout) == [200, 200]
        served = {r["path"]: r["headers"]["authorization"] for r in net.requests()[before:]}
        assert served == {"/a": f"Bearer {VALUE}", "/b": f"Bearer {placeholder}"}
        bundle = await vm.snapshot(tmp_path / "snap")
        for part in (MEM, STATE, DISK):
            assert count_in(Path(bundle.path) / part, VALUE.encode()) == 0, part
        assert count_in(Path(bundle.path) / MEM, placeholder.encode()) > 0  # the guest held this instead
        async with vm.fork(secrets="inherit") as heir, vm.fork() as stranger:
            for sibling, expected in ((heir, f"Bearer {VALUE}"), (stranger, f"Bearer {placeholder}")):
                before = len(net.requests())
                done = await sibling.exec(["python3", "/tmp/client.py", "https://api.secret.test/f", "/tmp/test-ca.pem"
                                           if sibling is stranger else ""], check=True, timeout=120)  # fmt: skip
                assert json.loads(done.stdout) == [200]
                assert [r["headers"]["authorization"] for r in net.requests()[before:]] == [expected]
