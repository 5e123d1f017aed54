"""Boot and exec costs, compared inside one run (this machine is noisy).

    python benchmarks/boot_exec.py [--boots 3] [--execs 200] [--mib 256] [--concurrent 16] [--backend asyncio|trio]

Prints one JSON object:
- cold_boot_s: boot(warm=False) call -> first exec answered, per boot (assets already cached);
- warm_boot_s: boot() -> first exec, resuming the image's boot template (built by a boot before),
  and warm_over_cold (median over median);
- pool_acquire_s: warm_pool(size=2).acquire() -> first exec, with a VM ready, and pool_over_cold;
- concurrent_warm_boot_wall_s: `--concurrent` warm boots at once, all answering a first exec,
  against fork_wall_s: `fork(n=--concurrent)` of a warm VM of the same image, all answering;
- warm_private_share: the part of an idle warm VM's guest RAM that is its own (pages it wrote),
  the rest shared with the template and every other VM of the image;
- exec_true_ms: host round trip of `true` through SDK -> supervisor -> agent (p50/p95/mean);
- exec_true_while_streaming_ms: the same round trip while another task of the same VM handle
  streams a process's output continuously (and a third call sits in `sleep`); no call waits
  for another, so this stays close to the idle figure (the ratio is printed too);
- guest_true_ms: the same `true` spawned by a shell loop inside the guest, per iteration: the
  part of the round trip that is process creation in the guest, not our protocol;
- stdout_mb_s: throughput of `head -c N /dev/zero` streamed to the host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import anyio

from machinen_async import boot, warm_pool
from machinen_async.store import boot_templates
from machinen_async.vmm import backend


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "p50": round(percentile(ms, 0.5), 2),
        "p95": round(percentile(ms, 0.95), 2),
        "mean": round(statistics.mean(ms), 2),
        "n": len(ms),
    }


async def round_trips_while_streaming(vm, count: int) -> list[float]:
    """`true` round trips while a process streams output (read by another task) and a sleep runs."""
    round_trips = []
    async with anyio.create_task_group() as tg:
        streaming = anyio.Event()

        async def stream() -> None:
            # One process, no spawning: a shell loop of `sleep` would measure the guest's fork rate.
            script = "import time\nwhile True:\n    print('streaming', flush=True)\n    time.sleep(0.01)"
            async with vm.process(["python3", "-c", script], stdin=False) as proc:
                async for _ in proc.stdout:
                    streaming.set()

        tg.start_soon(stream)
        tg.start_soon(vm.exec, ["sleep", "3600"])
        await streaming.wait()
        for _ in range(count):
            started = time.perf_counter()
            await vm.exec(["true"])
            round_trips.append(time.perf_counter() - started)
        tg.cancel_scope.cancel()
    return round_trips


async def boot_to_first_exec(**options) -> float:
    started = time.perf_counter()
    async with boot(**options) as vm:
        await vm.exec(["true"])
        return time.perf_counter() - started


def private_share(qemu_pid: int, mib: int) -> float:
    """Pages of the template's RAM mapping this VMM wrote (copied on write), over its guest RAM."""
    templates, private_kib, inside = str(boot_templates.templates_dir()), 0, False
    with open(f"/proc/{qemu_pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                inside = templates in line and line.rstrip().endswith("/mem")
            elif inside and line.startswith("Anonymous:"):
                private_kib += int(fields[1])
    return private_kib / 1024 / mib


async def all_answer(launches) -> float:
    """Wall time until every VM of ``launches`` (awaitables of VMs) answered a first exec."""
    started = time.perf_counter()
    vms = []
    try:
        async with anyio.create_task_group() as tg:

            async def one(launch) -> None:
                vm = await launch
                vms.append(vm)
                await vm.exec(["true"])

            for launch in launches:
                tg.start_soon(one, launch)
        return time.perf_counter() - started
    finally:
        async with anyio.create_task_group() as tg:
            for vm in vms:
                tg.start_soon(vm.aclose)


async def warm_start(args: argparse.Namespace, cold_median: float) -> dict:
    await boot_to_first_exec()  # builds the boot template if there is none
    warm_boots = [await boot_to_first_exec() for _ in range(args.boots)]
    acquired = []
    async with warm_pool(size=2) as pool:
        for _ in range(args.boots):
            await anyio.sleep(2)  # the pool has refilled
            started = time.perf_counter()
            vm = await pool.acquire()
            await vm.exec(["true"])
            acquired.append(time.perf_counter() - started)
            await vm.aclose()
    concurrent_wall = await all_answer([boot(boot_timeout=600) for _ in range(args.concurrent)])
    async with boot() as source:
        await anyio.sleep(1)
        private = private_share((await source.describe())["qemu_pid"], 256)
        started = time.perf_counter()
        async with source.fork(n=args.concurrent, boot_timeout=600) as forks:
            async with anyio.create_task_group() as tg:
                for sibling in forks:
                    tg.start_soon(sibling.exec, ["true"])
            fork_wall = time.perf_counter() - started
    return {
        "warm_boot_s": [round(s, 3) for s in warm_boots],
        "warm_boot_s_median": round(statistics.median(warm_boots), 3),
        "warm_over_cold": round(statistics.median(warm_boots) / cold_median, 3),
        "pool_acquire_s": [round(s, 3) for s in acquired],
        "pool_over_cold": round(statistics.median(acquired) / cold_median, 3),
        "concurrent": args.concurrent,
        "concurrent_warm_boot_wall_s": round(concurrent_wall, 3),
        "fork_wall_s": round(fork_wall, 3),
        "concurrent_warm_over_fork": round(concurrent_wall / fork_wall, 3),
        "warm_private_share": round(private, 4),
    }


async def main(args: argparse.Namespace) -> None:
    cold_boots = [await boot_to_first_exec(warm=False) for _ in range(args.boots)]
    warm = await warm_start(args, statistics.median(cold_boots))

    async with boot() as vm:
        for _ in range(10):  # warm the guest's page cache and TCG translations
            await vm.exec(["true"])
        round_trips = []
        for _ in range(args.execs):
            started = time.perf_counter()
            await vm.exec(["true"])
            round_trips.append(time.perf_counter() - started)

        busy_round_trips = await round_trips_while_streaming(vm, args.execs)

        loop = (
            f"s=$(date +%s%N); i=0; while [ $i -lt {args.execs} ]; do /bin/true; i=$((i+1)); done; "
            "e=$(date +%s%N); echo $((e - s))"
        )
        in_guest_ns = int((await vm.exec(["sh", "-c", loop], check=True)).stdout)

        total = args.mib * 1024 * 1024
        received = 0
        started = time.perf_counter()
        async with vm.process(["head", "-c", str(total), "/dev/zero"], stdin=False) as proc:
            async for chunk in proc.stdout:
                received += len(chunk)
            await proc.wait()
        stream_s = time.perf_counter() - started
        assert received == total

    print(
        json.dumps(
            {
                "benchmark": "boot_exec",
                "date": time.strftime("%Y-%m-%d"),
                "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
                "accel": backend.default().choose_accelerator(None),
                "backend": args.backend,
                "cold_boot_s": [round(s, 3) for s in cold_boots],
                "cold_boot_s_median": round(statistics.median(cold_boots), 3),
                **warm,
                "exec_true_ms": summary_ms(round_trips),
                "exec_true_while_streaming_ms": summary_ms(busy_round_trips),
                "streaming_over_idle_p50": round(percentile(busy_round_trips, 0.5) / percentile(round_trips, 0.5), 2),
                "guest_true_ms": round(in_guest_ns / args.execs / 1e6, 2),
                "stdout_mb_s": round(total / stream_s / 1e6, 1),
                "stdout_mib": args.mib,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--execs", type=int, default=200)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    arguments = parser.parse_args()
    anyio.run(main, arguments, backend=arguments.backend)
