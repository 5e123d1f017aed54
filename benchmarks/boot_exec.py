"""Boot and exec costs, compared inside one run (this machine is noisy).

    python benchmarks/boot_exec.py [--boots 3] [--execs 200] [--mib 256] [--backend asyncio|trio]

Prints one JSON object:
- cold_boot_s: boot() call -> first exec answered, per boot (assets already cached);
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

from machinen_async import boot
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


async def main(args: argparse.Namespace) -> None:
    cold_boots = []
    for _ in range(args.boots):
        started = time.perf_counter()
        async with boot() as vm:
            await vm.exec(["true"])
            cold_boots.append(time.perf_counter() - started)

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
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    arguments = parser.parse_args()
    anyio.run(main, arguments, backend=arguments.backend)
