"""Fork fan-out vs cold boots, measured in one run (this machine is noisy).

    python benchmarks/fork_fanout.py [--n 1 4 16] [--mib 256] [--backend asyncio|trio]
    python benchmarks/fork_fanout.py --pause-matrix [--matrix-mib 256 1024 4096] [--touched 0.1 0.9]

For each n: fork a warmed-up VM into n siblings and time until every sibling
answered an exec; then cold-boot n fresh VMs concurrently to their first exec.
Prints a JSON list, one object per n, with at least:
n, fork_wall_s, cold_boot_wall_s, source_pause_ms, private_mib_per_sibling, guest_ram_mib.

private_mib_per_sibling is the copy-on-write part of each sibling's guest-RAM
mapping: smaps "Anonymous", the pages the sibling copied (Private_Dirty would
also count tmpfs pages that only one process maps, without any copy);
qemu_pss_mib_per_sibling is the whole QEMU process
(proportional set size: shared pages divided among sharers), which under TCG
is dominated by QEMU's translation cache, not by guest RAM.  Also measured:
snapshot and restore of the source, a fork of a fork (n=4) and a snapshot and restore of a
fork sibling, each with its ratio to the first-generation number of the same run.

--pause-matrix: for each guest RAM size and share of it touched (written once by the
guest, as an interpreter or a model's weights would), the source pause of one fork with
each capture (MACHINEN_FORK_CAPTURE=copy, auto, then stream; in that order, since a stream
reads, and so allocates, every page of the source's RAM file), and what "auto" chose.
touched_mib is measured on the host: the allocated part of the source's RAM file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from machinen_async import VM, boot, restore
from machinen_async.store import layers
from machinen_async.vmm import backend


def available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable")


def sibling_memory(qemu_pid: int) -> tuple[float, float]:
    """(private MiB of the template RAM mapping, PSS MiB of the whole process)."""
    templates = str(layers.templates_dir())
    private_kib, pss_kib, inside = 0, 0, False
    with open(f"/proc/{qemu_pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                inside = templates in line and line.rstrip().endswith("/mem")
            elif line.startswith("Pss:"):
                pss_kib += int(fields[1])
            elif inside and line.startswith("Anonymous:"):  # pages copied on write
                private_kib += int(fields[1])
    return private_kib / 1024, pss_kib / 1024


async def first_exec_all(vms: list[VM]) -> None:
    async with anyio.create_task_group() as tg:
        for vm in vms:
            tg.start_soon(vm.exec, ["true"])


async def measure(n: int, mib: int, source: VM, cold: bool) -> dict:
    before = available_mib()
    started = time.perf_counter()
    async with source.fork(n=n, boot_timeout=300) as forks:
        await first_exec_all(list(forks))
        fork_wall = time.perf_counter() - started
        memory = [sibling_memory((await vm.describe())["qemu_pid"]) for vm in forks]
        used_by_fork = before - available_mib()
        pause, steps = forks.source_pause_ms, forks.source_pause_steps_ms

    cold_wall = await measure_cold_boots(n, mib) if cold else None
    return {
        "n": n,
        "guest_ram_mib": mib,
        "fork_wall_s": round(fork_wall, 3),
        "cold_boot_wall_s": cold_wall and round(cold_wall, 3),
        "fork_vs_cold": cold_wall and round(fork_wall / cold_wall, 3),
        "source_pause_ms": pause,
        "source_pause_steps_ms": steps,
        "private_mib_per_sibling": round(statistics.mean(m[0] for m in memory), 2),
        "private_share_of_guest_ram": round(statistics.mean(m[0] for m in memory) / mib, 4),
        "qemu_pss_mib_per_sibling": round(statistics.mean(m[1] for m in memory), 1),
        "host_mib_used_by_fork": round(used_by_fork, 1),
    }


async def measure_cold_boots(n: int, mib: int) -> float:
    """Wall time for n fresh VMs booted concurrently to answer their first exec."""
    started = time.perf_counter()
    vms: list[VM] = []
    try:
        async with anyio.create_task_group() as tg:

            async def cold_boot() -> None:
                vm = await boot(memory_mib=mib, boot_timeout=300, warm=False)
                vms.append(vm)
                await vm.exec(["true"])

            for _ in range(n):
                tg.start_soon(cold_boot)
        return time.perf_counter() - started
    finally:
        async with anyio.create_task_group() as tg:
            for vm in vms:
                tg.start_soon(vm.aclose)


FORK_OF_FORK_N = 4


async def measure_snapshot_restore(source: VM) -> dict:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        started = time.perf_counter()
        info = await source.snapshot(Path(tmp) / "bench.snap")
        snapshot_s = time.perf_counter() - started
        started = time.perf_counter()
        async with restore(info.path) as restored:
            await restored.exec(["true"])
            restore_s = time.perf_counter() - started
    return {
        "snapshot_s": round(snapshot_s, 3),
        "snapshot_pause_ms": info.pause_ms,
        "bundle_mib": round(info.size_bytes / 2**20, 1),
        "restore_to_first_exec_s": round(restore_s, 3),
    }


async def measure_fork_of_fork(source: VM, n: int) -> tuple[dict, dict]:
    """A fork of n of a fork sibling, and a snapshot (then restore) of that sibling."""
    async with source.fork(name="bench-child") as child:
        await child.exec(["python3", "-c", "pass"])
        started = time.perf_counter()
        async with child.fork(n=n, boot_timeout=300) as grandchildren:
            await first_exec_all(list(grandchildren))
            wall = time.perf_counter() - started
            memory = [sibling_memory((await vm.describe())["qemu_pid"]) for vm in grandchildren]
            steps = grandchildren.source_pause_steps_ms
        snapshot_of_fork = await measure_snapshot_restore(child)
    guest_ram_mib = (await source.describe())["memory_mib"]
    fork_of_fork = {
        "n": n,
        "fork_wall_s": round(wall, 3),
        "source_pause_ms": steps["total"],
        "source_pause_steps_ms": steps,
        "private_share_of_guest_ram": round(statistics.mean(m[0] for m in memory) / guest_ram_mib, 4),
        "qemu_pss_mib_per_sibling": round(statistics.mean(m[1] for m in memory), 1),
    }
    return fork_of_fork, snapshot_of_fork


# Written once and dropped: the guest frees it, the host keeps the touched pages in the RAM file.
TOUCH = "import sys; b = bytearray(b'Z') * int(sys.argv[1])"


async def touched_mib(vm: VM) -> float:
    return os.stat(Path((await vm.describe())["ram_dir"]) / "mem").st_blocks * 512 / 2**20


async def measure_pause_matrix(sizes: list[int], shares: list[float]) -> list[dict]:
    rows = []
    for mib in sizes:
        for share in shares:
            async with boot(name=f"bench-pause-{mib}", memory_mib=mib, boot_timeout=300, warm=False) as source:
                free = await source.exec(["sh", "-c", "grep MemAvailable /proc/meminfo"], check=True)
                room = int(free.stdout.split()[1]) // 1024 - 48  # MiB the guest can hold at once
                touch = int(max(0, min(mib * share - await touched_mib(source), room)))
                await source.exec(["python3", "-c", TOUCH, str(touch * 2**20)], check=True, timeout=600)
                row: dict = {
                    "guest_ram_mib": mib,
                    "touched_share": share,
                    "touched_mib": round(await touched_mib(source)),
                }
                for capture in ("copy", "auto", "stream"):
                    os.environ["MACHINEN_FORK_CAPTURE"] = capture
                    started = time.perf_counter()
                    async with source.fork(n=1, boot_timeout=300) as forks:
                        await forks[0].exec(["true"])
                        wall = time.perf_counter() - started
                    row[capture] = {"fork_wall_s": round(wall, 3), "pause_steps_ms": forks.source_pause_steps_ms}
                os.environ.pop("MACHINEN_FORK_CAPTURE")
                rows.append(row)
    return rows


async def main(args: argparse.Namespace) -> None:
    if args.pause_matrix:
        print(json.dumps({"benchmark": "fork_pause_matrix", "date": time.strftime("%Y-%m-%d"),
                          "accel": backend.default().choose_accelerator(None),
                          "qemu": backend.default().installed_version(),
                          "results": await measure_pause_matrix(args.matrix_mib, args.touched)}, indent=2))  # fmt: skip
        return
    results = []
    async with boot(name="bench-fork-source", memory_mib=args.mib, warm=False) as source:
        # Warm the source: a Python interpreter and some page cache, like an agent would.
        await source.exec(["python3", "-c", "import json, hashlib, subprocess"], check=True)
        for n in args.n:
            results.append(await measure(n, args.mib, source, cold=not args.skip_cold))
        snapshot_restore = await measure_snapshot_restore(source)
        fork_of_fork, snapshot_of_fork = await measure_fork_of_fork(source, FORK_OF_FORK_N)
    first_generation = next((row for row in results if row["n"] == FORK_OF_FORK_N), None)
    if first_generation:  # the same n in the same run: issue 14's 1.3x goals
        fork_of_fork["vs_first_generation"] = round(fork_of_fork["fork_wall_s"] / first_generation["fork_wall_s"], 3)
    for key in ("snapshot_s", "restore_to_first_exec_s"):
        snapshot_of_fork[f"{key}_vs_first_generation"] = round(snapshot_of_fork[key] / snapshot_restore[key], 3)
    print(
        json.dumps(
            {
                "benchmark": "fork_fanout",
                "date": time.strftime("%Y-%m-%d"),
                "accel": backend.default().choose_accelerator(None),
                "backend": args.backend,
                "results": results,
                "snapshot_restore": snapshot_restore,
                "fork_of_fork": fork_of_fork,
                "snapshot_of_fork": snapshot_of_fork,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--skip-cold", action="store_true", help="Skip the cold-boot comparison (for large n).")
    parser.add_argument("--pause-matrix", action="store_true", help="Source pause by RAM size, touched share, capture.")
    parser.add_argument("--matrix-mib", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--touched", type=float, nargs="+", default=[0.1, 0.9])
    arguments = parser.parse_args()
    anyio.run(main, arguments, backend=arguments.backend)
