"""Secrets that never enter the VM (issue 29), for real: a guest sends a placeholder; the HTTPS
test host named by the secret receives the value, any other host the placeholder; the value is in
no byte of the guest's RAM or disk (a snapshot of it)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from egress_hosts import EgressNetwork, test_network, unavailable
from mcp import ClientSession, StdioServerParameters, stdio_client

from machinen_async import Host, NetworkPolicy, Secret, boot, restore
from machinen_async.store.manifest import DISK, MEM, STATE, Manifest

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


async def test_a_restore_given_the_secret_again_binds_it_to_the_placeholder_the_guest_holds(
    net: EgressNetwork, tmp_path: Path, anyio_backend: str
) -> None:
    """A bundle keeps the secret's name, hosts and placeholder, never its value: a restore without
    the value sends the placeholder; one given it (``restore(secrets=)``) sends the value in its
    place, from a process started before the snapshot as from a new command."""
    policy = NetworkPolicy(allow=["api.secret.test"])
    async with boot(name=f"secret-r-{anyio_backend}", network=policy,
                    secrets={"API_KEY": Secret(VALUE, hosts=["api.secret.test"])}) as vm:  # fmt: skip
        placeholder = vm.placeholders["API_KEY"]
        await vm.write_file("/tmp/client.py", CLIENT.encode())
        # A process from before the snapshot: it holds the placeholder, and asks when /tmp/go appears.
        waiter = (
            "(while [ ! -e /tmp/go ]; do sleep 0.2; done; "
            "python3 /tmp/client.py https://api.secret.test/old '' > /tmp/old.out) >/dev/null 2>&1 &"
        )
        await vm.exec(["sh", "-c", waiter], check=True)
        bundle = Path((await vm.snapshot(tmp_path / "snap")).path)
    manifest = Manifest.from_cbor((bundle / "manifest.cbor").read_bytes())
    assert [slot.to_map() for slot in manifest.secrets] == [
        {"name": "API_KEY", "hosts": ["api.secret.test"], "placeholder": placeholder}
    ]
    assert count_in(bundle / "manifest.cbor", VALUE.encode()) == 0

    async with restore(bundle, network=policy) as bare:  # no value given: the placeholder goes as it is
        before = len(net.requests())
        done = await bare.exec(["python3", "/tmp/client.py", "https://api.secret.test/bare", ""], timeout=120)
        assert [r["headers"].get("authorization") for r in net.requests()[before:]] in (
            [],
            [f"Bearer {placeholder}"],  # the guest may not trust the old CA's stand-in: then nothing is sent
        ), done.stdout
    async with restore(bundle, network=policy, secrets={"API_KEY": Secret(VALUE, hosts=["api.secret.test"])}) as vm:
        assert vm.placeholders == {"API_KEY": placeholder}
        before = len(net.requests())
        done = await vm.exec(["python3", "/tmp/client.py", "https://api.secret.test/new", ""], check=True, timeout=120)
        assert json.loads(done.stdout) == [200]
        await vm.write_file("/tmp/go", b"")
        await vm.exec(["sh", "-c", "while [ ! -s /tmp/old.out ]; do sleep 0.2; done"], check=True, timeout=120)
        assert json.loads(await vm.read_file("/tmp/old.out")) == [200]
        served = {r["path"]: r["headers"]["authorization"] for r in net.requests()[before:]}
        assert served == {"/new": f"Bearer {VALUE}", "/old": f"Bearer {VALUE}"}


async def test_an_agent_over_mcp_gives_a_vm_a_secret_by_name_and_never_sees_it(
    net: EgressNetwork, anyio_backend: str
) -> None:
    """``machinen mcp --secret API_KEY=ENVVAR@HOST``: the agent names the secret in ``boot``; the
    named host gets the value; nothing the agent is shown holds it."""
    env = {**os.environ, "TEST_SECRET_VALUE": VALUE}
    server = StdioServerParameters(command=sys.executable, env=env, args=[
        "-m", "machinen_async", "mcp", "--secret", "API_KEY=TEST_SECRET_VALUE@api.secret.test"])  # fmt: skip
    shown: list[str] = []
    async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        shown.append(repr((await session.list_tools()).tools))

        async def call(tool: str, **arguments: object) -> dict:
            result = await session.call_tool(tool, arguments)
            shown.append(repr(result))
            assert not result.is_error, result.content[0].text
            return result.structured_content

        name = (await call("boot", name=f"mcp-secret-{anyio_backend}", allow=["api.secret.test"],
                           secrets=["API_KEY"]))["name"]  # fmt: skip
        await call("write_file", vm=name, path="/tmp/client.py", content=CLIENT)
        before = len(net.requests())
        done = await call("exec", vm=name, cmd=["python3", "/tmp/client.py", "https://api.secret.test/mcp", ""])
        assert json.loads(done["stdout"]) == [200], done
        assert [r["headers"]["authorization"] for r in net.requests()[before:]] == [f"Bearer {VALUE}"]
        echoed = await call("exec", vm=name, cmd="echo $API_KEY")
        assert echoed["stdout"].startswith("machinen-secret-API_KEY-")
    assert not any(VALUE in text for text in shown)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_handoff_takes_the_secrets_along(net: EgressNetwork, ssh_hosts) -> None:
    """The moved VM's guest holds the same placeholder; the destination's proxy puts the value in."""
    host = ssh_hosts.add("secrets-dest", extra_env={"MACHINEN_DNS_SERVERS": net.dns_server,
                                                     "SSL_CERT_FILE": str(net.ca_pem)})  # fmt: skip
    policy = NetworkPolicy(allow=["api.secret.test"])
    async with (
        Host.from_spec(host.alias) as there,
        boot(name="secret-mover", network=policy, secrets={"API_KEY": Secret(VALUE, hosts=["api.secret.test"])}) as vm,
    ):
        await vm.write_file("/tmp/client.py", CLIENT.encode())
        moved = await vm.handoff(there, precopy=False)
        assert moved.placeholders == vm.placeholders and (await moved.describe())["secrets"] == [
            {"name": "API_KEY", "hosts": ["api.secret.test"]}
        ]
        before = len(net.requests())
        done = await moved.exec(["python3", "/tmp/client.py", "https://api.secret.test/moved", ""], check=True,
                                timeout=120)  # fmt: skip
        assert json.loads(done.stdout) == [200]
        assert [r["headers"]["authorization"] for r in net.requests()[before:]] == [f"Bearer {VALUE}"]
        await moved.aclose()
    shutil.rmtree(host.cache, ignore_errors=True)  # what the handoff sent there: a GiB or more
