"""Forks over a real three-node Ray cluster on this machine (tests/ray_cluster.py): Ray places
the siblings, each node's actor runs them; a node lost mid-run fails only its own siblings; a
driver that dies leaves no QEMU behind.  The test that kills a node comes last: the cluster is
this module's."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import anyio
import pytest
from conftest import _HOME, machinen, qemu_of, qemu_processes, runtime_leftovers
from ray_cluster import RayCluster
from test_fork import COUNTER, copied_ram_mib, poke

from machinen_async import MachinenError, RayHosts, boot

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = RayCluster(_HOME / "ray", os.environ["MACHINEN_RUNTIME_DIR"])
    try:
        for label in "abc":
            cluster.add(label)
        yield cluster
    finally:
        cluster.stop()
    for node in cluster.nodes:
        deadline = time.monotonic() + 60
        while runtime_leftovers(node.runtime) and time.monotonic() < deadline:
            time.sleep(0.5)  # each peer stops its VMs once its actor is gone
        assert not runtime_leftovers(node.runtime), f"RAM files survived on Ray node {node.label}"


def node_vms(cluster: RayCluster) -> set[str]:
    """The VMs whose QEMU (or what started it) runs on one of the cluster's nodes."""
    return {re.search(r"machinen\.hostname=(\S+)", line)[1] for line in qemu_processes() if str(cluster.root) in line}


async def test_fork_over_ray_nodes_from_one_instant(ray_cluster, anyio_backend):
    async with RayHosts(ray_cluster.address) as pool, boot(name=f"rsrc-{anyio_backend}") as vm:
        assert len(pool.hosts) == 3
        await vm.exec(["sh", "-c", f"echo 10 > /root/state; {COUNTER}"], check=True)
        assert await poke(vm) == 1
        async with vm.fork(n=6, hosts=pool, name=f"ray-{anyio_backend}") as forks:
            # Ray chose (SPREAD over three nodes with four slots each): two siblings a node.
            assert sorted(Counter(forks.placement.values()).values()) == [2, 2, 2]
            assert set(forks.placement.values()) == {host.name for host in pool.hosts}
            assert await forks.map(lambda sibling, i: poke(sibling)) == [2] * 6  # all from one instant
            hostnames = await forks.map(lambda sibling, i: sibling.exec(["hostname"]))
            assert [h.stdout.decode().strip() for h in hostnames] == [f"ray-{anyio_backend}-{i}" for i in range(6)]
            assert await poke(vm) == 2  # the source went on too
            for sibling in forks:  # on each node the siblings share one template copy-on-write
                assert copied_ram_mib((await sibling.describe())["qemu_pid"]) < 0.08 * 256
            listed = await pool.list()
            assert {row["name"]: row["node"] for row in listed} == forks.placement
            shown = json.loads(machinen("ls", "--ray", ray_cluster.address, "--json", timeout=120).stdout)
            assert {row["name"].rsplit(":", 1)[1]: row["node"] for row in shown} == forks.placement
        assert await pool.list() == []


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_the_pool_places_a_boot_and_holds_its_slot_until_it_closes(ray_cluster):
    """``pool.boot``: Ray picks the node, whose machinen builds what it boots from (its cache starts
    empty) and captures its own boot template; the slot is held until the VM's handle closes."""
    async with RayHosts(ray_cluster.address) as pool:
        async with pool.boot(name="rboot", memory_mib=192, cmd=["sh", "-c", "echo up > /tmp/workload"]) as vm:
            assert vm.host in pool.hosts and len(pool._groups) == 1
            assert (await vm.exec(["hostname"])).stdout == b"rboot\n"
            assert (await vm.describe())["start"] == "cold"
            assert [row["name"] for row in await pool.list()] == ["rboot"]
        assert not pool._groups  # released with the VM, not with the pool
        assert await pool.list() == []
        again = await vm.host.boot(name="rboot2", memory_mib=192)  # the node's template now
        try:
            assert (await again.describe())["start"] == "warm"
        finally:
            await again.aclose()
    assert not qemu_of("rboot") and not qemu_of("rboot2")


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_handoff_to_a_ray_node_and_no_room(ray_cluster):
    async with RayHosts(ray_cluster.address, reserve_timeout=3) as pool, boot(name="rmove") as vm:
        await vm.exec(["sh", "-c", COUNTER], check=True)
        assert await poke(vm) == 1
        moved = await vm.handoff(pool.hosts[0])
        assert await poke(moved) == 2  # the same process, on the node
        assert [row["name"] for row in await pool.hosts[0].list()] == ["rmove"]
        # 3 nodes x 4 slots: a 13th sibling has no room, and Ray says so before the source pauses.
        with pytest.raises(MachinenError) as no_room:
            await moved.fork(n=13, hosts=pool)
        assert no_room.value.code == "FORK_MEMORY_BACKPRESSURE" and no_room.value.retryable
        assert await poke(moved) == 3
        assert [(row["name"], row["node"]) for row in await pool.list()] == [("rmove", pool.hosts[0].name)]
        await moved.aclose()
        assert await pool.list() == []


CLIENT_DRIVER = """
import anyio, json, sys
from machinen_async import RayHosts, boot

async def main():
    async with RayHosts(sys.argv[1]) as pool, boot(name="rclient") as vm:
        async with vm.fork(n=3, hosts=pool, name="rc") as forks:
            names = await forks.map(lambda sibling, i: sibling.exec(["hostname"], check=True))
            print(json.dumps({"placement": forks.placement, "hostnames": [n.stdout.decode().strip() for n in names]}))

anyio.run(main, backend="trio")
"""


def test_fork_through_ray_client(ray_cluster, tmp_path):
    """A driver on "another machine" reaches the cluster through Ray Client (ray://), from trio; its
    stderr stays free of tracebacks (Ray Client logs one for every call whose future was cancelled)."""
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(CLIENT_DRIVER))
    done = subprocess.run([sys.executable, str(script), ray_cluster.client_address], capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["hostnames"] == ["rc-0", "rc-1", "rc-2"]
    assert len(set(result["placement"].values())) == 3  # SPREAD: one a node
    assert not node_vms(ray_cluster) and not qemu_of("rclient")


DRIVER = """
import anyio, sys
from machinen_async import RayHosts, boot

async def main():
    async with RayHosts(sys.argv[1]) as pool, boot(name="rdriver") as vm:
        async with vm.fork(n=3, hosts=pool) as forks:
            await forks.map(lambda sibling, i: sibling.exec(["true"]))
            print("ready", flush=True)
            await anyio.sleep(600)

anyio.run(main)
"""


def test_a_driver_that_dies_leaves_no_qemu(ray_cluster, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    driver = subprocess.Popen([sys.executable, str(script), ray_cluster.address], stdout=subprocess.PIPE)
    try:
        assert driver.stdout.readline() == b"ready\n"
        assert len(node_vms(ray_cluster)) == 3
    finally:
        driver.kill()  # no clean-up of its own: Ray ends its job's actors, their peers stop the VMs
        driver.wait()

    def left() -> list[str]:
        return [*node_vms(ray_cluster), *qemu_of("rdriver")]

    deadline = time.monotonic() + 90
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_lost_node_fails_only_its_siblings(ray_cluster):
    """Last in this module: the node stays dead."""
    async with RayHosts(ray_cluster.address) as pool, boot(name="rlose") as vm:
        async with vm.fork(n=6, hosts=pool, name="lose") as forks:
            await forks.map(lambda sibling, i: sibling.exec(["true"], check=True))
            lost_node = forks.placement["lose-0"]
            os.kill(ray_cluster.raylet_pid(lost_node), signal.SIGKILL)

            async def hostname(sibling, index):
                return (await sibling.exec(["hostname"], timeout=60)).stdout.decode().strip()

            on_lost_node = {name for name, node in forks.placement.items() if node == lost_node}
            failed: set[str] = set()
            with anyio.fail_after(120):
                while failed != on_lost_node:  # each sibling there fails once its link is seen gone
                    results = await forks.map(hostname, return_exceptions=True)
                    failed |= {s.name for s, r in zip(forks, results, strict=True) if isinstance(r, BaseException)}
                    assert failed <= on_lost_node  # never one elsewhere
                    await anyio.sleep(0.5)
            for sibling, result in zip(forks, results, strict=True):
                if sibling.name in failed:  # a typed error a caller may retry elsewhere
                    assert isinstance(result, MachinenError) and result.retryable, result
                else:
                    assert result == sibling.name  # the others keep serving
        with anyio.move_on_after(60):  # the lost node's peer saw its actor go and stopped its VMs
            while node_vms(ray_cluster) & on_lost_node:
                await anyio.sleep(0.5)
        assert not node_vms(ray_cluster) & on_lost_node
