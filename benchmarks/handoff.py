"""Handoff and forks across hosts, measured in one run against real sshd "hosts" on loopback.

    python benchmarks/handoff.py [--mib 256] [--backend asyncio|trio]

The remote hosts are OpenSSH servers started here (tests/ssh_hosts.py), each
with its own machinen state and an empty cache, on this same machine: the
numbers show the protocol and pause costs, not a network.  Prints one JSON
object:

- ``cold_handoff``: first handoff to a host that has nothing (image and
  kernel travel too);
- ``warm_handoff`` / ``warm_handoff_no_precopy``: another VM of the same
  image to the same host, with and without the precopy round;
- ``local_snapshot_pause_ms`` / ``local_restore_s``: the same-host reference;
- ``fork4_local_s`` vs ``fork4_two_hosts_s``: fork n=4 until every sibling
  answered an exec, locally and spread over this host + one remote host;
- ``remote_boot``: ``Host.boot`` on another empty host until the first exec answers: the
  first (that host builds its kernel, initramfs, rootfs and image, boots cold and captures its
  boot template), then warm ones resumed from that template, against warm boots here in the
  same run (``remote_warm_over_local_warm``: what the SSH link and peer add).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ssh_hosts import SSHHosts  # noqa: E402  (the test suite's loopback sshd hosts)

from machinen_async import Host, boot, restore  # noqa: E402


def report_dict(vm) -> dict:
    report = vm.handoff_report
    return {
        "paused_ms": report.paused_ms,
        "total_s": report.total_s,
        "bytes_sent": report.bytes_sent,
        "precopy_bytes": report.precopy.bytes_sent if report.precopy else 0,
        "final_bytes": report.final.bytes_sent,
        "final_chunks": f"{report.final.chunks_sent}/{report.final.chunks_total}",
    }


async def warm(vm) -> None:
    await vm.exec(["sh", "-c", "python3 -c 'import json, hashlib, asyncio' && echo warm > /root/state"], check=True)


async def all_answer(forks) -> None:
    await forks.map(lambda sibling, i: sibling.exec(["true"], check=True))


async def first_exec_s(launch) -> float:
    """A boot (``launch``) until its first exec answered; the VM is stopped after."""
    started = time.monotonic()
    async with launch as vm:
        await vm.exec(["true"], check=True)
        return round(time.monotonic() - started, 3)


async def remote_boots(alias: str, mib: int, runs: int = 3) -> dict:
    async with Host.from_spec(alias) as hostc:
        first = await first_exec_s(hostc.boot(name="rb-first", memory_mib=mib))
        remote = [await first_exec_s(hostc.boot(name=f"rb-{i}", memory_mib=mib)) for i in range(runs)]
        await first_exec_s(boot(name="lb-template", memory_mib=mib))  # this host's template of the key
        local = [await first_exec_s(boot(name=f"lb-{i}", memory_mib=mib)) for i in range(runs)]
    return {
        "first_on_empty_host_s": first,
        "remote_warm_s": remote,
        "local_warm_s": local,
        "remote_warm_over_local_warm": round(statistics.median(remote) / statistics.median(local), 2),
    }


async def main(mib: int, root: Path) -> dict:
    hosts = SSHHosts(root / "ssh", os.environ["MACHINEN_RUNTIME_DIR"])
    os.environ["MACHINEN_SSH_CONFIG"] = str(hosts.config)
    os.environ["MACHINEN_REMOTE_COMMAND"] = f"{sys.executable} -m machinen_async"
    result: dict = {"guest_ram_mib": mib}
    try:
        alias = hosts.add("hostb").alias
        async with Host.from_spec(alias) as hostb:
            for key, precopy in (("cold_handoff", True), ("warm_handoff", True), ("warm_handoff_no_precopy", False)):
                async with boot(name=key.replace("_", "-"), memory_mib=mib, warm=False) as vm:
                    await warm(vm)
                    moved = await vm.handoff(hostb, precopy=precopy)
                    result[key] = report_dict(moved)
                    await moved.aclose()

            async with boot(name="local", memory_mib=mib, warm=False) as vm:
                await warm(vm)
                snap = await vm.snapshot(root / "local.snap")
                result["local_snapshot_pause_ms"] = snap.pause_ms
                started = time.monotonic()
                async with restore(root / "local.snap", name="local-restored") as again:
                    await again.exec(["true"], check=True)
                    result["local_restore_s"] = round(time.monotonic() - started, 3)
                started = time.monotonic()
                async with vm.fork(n=4) as forks:
                    await all_answer(forks)
                    result["fork4_local_s"] = round(time.monotonic() - started, 3)
                started = time.monotonic()
                async with vm.fork(n=4, hosts=[Host.local(), hostb]) as forks:
                    await all_answer(forks)
                    result["fork4_two_hosts_s"] = round(time.monotonic() - started, 3)
                    result["fork4_two_hosts_placement"] = sorted(forks.placement.values())
        result["remote_boot"] = await remote_boots(hosts.add("hostc").alias, mib)
    finally:
        hosts.close()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mnb-", dir="/tmp") as tmp:
        os.environ["MACHINEN_HOME"] = str(Path(tmp) / "home")
        os.environ["MACHINEN_RUNTIME_DIR"] = f"/dev/shm/machinen-bench-{os.getpid()}"
        print(json.dumps(anyio.run(main, args.mib, Path(tmp), backend=args.backend), indent=2))
