"""Live mount vs the guest's own disk, measured in one run (this machine is noisy).

    python benchmarks/mounts.py [--mib 64] [--stats 500] [--backend asyncio|trio]

Sequential write and read (dd, 128 KiB blocks; the read after dropping the
guest's page cache) and ``stat`` latency (a Python loop in the guest) on a
live mount of a host directory and on the guest's root disk.  Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import anyio

from machinen_async import Mount, boot
from machinen_async.vmm import backend

STAT_LOOP = "import os, sys, time; n = int(sys.argv[2]); t = time.perf_counter()\nfor _ in range(n): os.stat(sys.argv[1])\nprint((time.perf_counter() - t) / n * 1e6)"  # noqa: E501


async def measure(vm, directory: str, mib: int, stats: int) -> dict:
    async def timed(script: str) -> float:
        started = time.monotonic()
        await vm.exec(["sh", "-c", script], check=True, timeout=600)
        return time.monotonic() - started

    write_s = await timed(f"dd if=/dev/zero of={directory}/bench bs=128k count={mib * 8} conv=fsync 2>/dev/null")
    read_s = await timed(f"echo 3 > /proc/sys/vm/drop_caches; dd if={directory}/bench of=/dev/null bs=128k 2>/dev/null")
    stat_us = float((await vm.exec(["python3", "-c", STAT_LOOP, f"{directory}/bench", str(stats)], check=True)).stdout)
    await vm.exec(["rm", f"{directory}/bench"], check=True)
    return {"write_mb_s": round(mib * 1.048576 / write_s, 1), "read_mb_s": round(mib * 1.048576 / read_s, 1),
            "stat_us": round(stat_us, 1)}  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as shared:
        async with boot(mounts=[Mount(shared, "/live", live=True)]) as vm:
            result = {
                "benchmark": "mounts",
                "date": time.strftime("%Y-%m-%d"),
                "accel": backend.default().choose_accelerator(None),
                "backend": args.backend,
                "mib": args.mib,
                "guest_disk": await measure(vm, "/root", args.mib, args.stats),
                "live_mount": await measure(vm, "/live", args.mib, args.stats),
            }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--stats", type=int, default=500)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    anyio.run(main, args, backend=args.backend)
