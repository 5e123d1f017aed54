"""Fork n siblings over three Ray nodes vs three SSH hosts vs this host alone, in one run.

    python benchmarks/scale_out.py [--n 6] [--mib 256] [--backend asyncio|trio]

The "hosts" are all on this machine (tests/ssh_hosts.py: sshd servers on loopback;
tests/ray_cluster.py: ``ray start`` nodes), each with its own machinen state and an
empty cache: the numbers compare the placement and transport paths, not a network.
Each spread fork is timed twice, until every sibling answered an exec: ``first``
(the image and kernel travel to each host too) and ``again`` (only the chunks the
hosts lack: the new fork instant's RAM and disk).  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ray_cluster import RayCluster  # noqa: E402  (the test suite's loopback hosts)
from ssh_hosts import SSHHosts  # noqa: E402

from machinen_async import Host, RayHosts, boot  # noqa: E402


async def fork_wall(vm, n: int, hosts) -> dict:
    started = time.monotonic()
    async with vm.fork(n=n, hosts=hosts) as forks:
        await forks.map(lambda sibling, i: sibling.exec(["true"], check=True))
        wall = time.monotonic() - started
        spread = sorted(Counter(forks.placement.values()).values()) if hosts is not None else [n]
    return {"fork_wall_s": round(wall, 3), "siblings_per_host": spread}


async def main(n: int, mib: int, root: Path) -> dict:
    ssh = SSHHosts(root / "ssh", os.environ["MACHINEN_RUNTIME_DIR"])
    os.environ["MACHINEN_SSH_CONFIG"] = str(ssh.config)
    os.environ["MACHINEN_REMOTE_COMMAND"] = f"{sys.executable} -m machinen_async"
    cluster = RayCluster(root / "ray", os.environ["MACHINEN_RUNTIME_DIR"])
    result: dict = {"n": n, "guest_ram_mib": mib}
    try:
        aliases = [ssh.add(f"h{i}").alias for i in range(3)]
        for label in "abc":
            cluster.add(label)
        async with boot(name="source", memory_mib=mib, warm=False) as vm, RayHosts(cluster.address) as pool:
            await vm.exec(["sh", "-c", "python3 -c 'import json, hashlib, asyncio' && echo warm > /root/state"])
            result["local"] = await fork_wall(vm, n, None)
            hosts = [Host.from_spec(alias) for alias in aliases]
            try:
                for host in hosts:
                    await host.open()
                for way, target in (("ssh_3_hosts", hosts), ("ray_3_nodes", pool)):
                    result[way] = {"first": await fork_wall(vm, n, target), "again": await fork_wall(vm, n, target)}
            finally:
                for host in hosts:
                    await host.aclose()
        for way in ("ssh_3_hosts", "ray_3_nodes"):
            result[way]["again_vs_local"] = round(
                result[way]["again"]["fork_wall_s"] / result["local"]["fork_wall_s"], 2
            )
    finally:
        cluster.stop()
        ssh.close()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mnb-", dir="/tmp") as tmp:
        os.environ["MACHINEN_HOME"] = str(Path(tmp) / "home")
        os.environ["MACHINEN_RUNTIME_DIR"] = f"/dev/shm/machinen-bench-{os.getpid()}"
        print(json.dumps(anyio.run(main, args.n, args.mib, Path(tmp), backend=args.backend), indent=2))
