"""What confining QEMU costs, compared inside one run (this machine is noisy).

    python benchmarks/confinement_cost.py [--rounds 3] [--siblings 2]

Alternates rounds over three settings, read by each supervisor as it starts QEMU: "none"
($MACHINEN_QEMU_SANDBOX=off, $MACHINEN_QEMU_NAMESPACES=off), "seccomp" (the sandbox only) and
"seccomp+namespaces" (the default: the sandbox, and bubblewrap's namespaces). Per round: a cold boot (boot() -> first exec answered), a fork of
``--siblings`` siblings (fork() -> all answered; the source's pause), and a snapshot + restore
(which move state through file descriptors in every setting). Prints one JSON object with the
medians per setting and their ratios to "none".
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

from machinen_async import boot, restore


async def one_round(siblings: int, workdir: Path) -> dict[str, float]:
    started = time.perf_counter()
    async with boot(network=False, warm=False) as vm:
        await vm.exec(["true"])
        boot_s = time.perf_counter() - started
        started = time.perf_counter()
        async with vm.fork(n=siblings) as forks:
            await forks.map(lambda sibling, i: sibling.exec(["true"]))
            fork_s = time.perf_counter() - started
            pause_ms = forks.source_pause_ms
        bundle_dir = workdir / f"snap-{time.monotonic_ns()}"
        snapshot = await vm.snapshot(bundle_dir)
    started = time.perf_counter()
    async with restore(bundle_dir) as again:
        await again.exec(["true"])
        restore_s = time.perf_counter() - started
    return {"boot_s": boot_s, "fork_s": fork_s, "fork_pause_ms": pause_ms,
            "snapshot_pause_ms": snapshot.pause_ms, "restore_s": restore_s}  # fmt: skip


SETTINGS = {
    "none": {"MACHINEN_QEMU_SANDBOX": "off", "MACHINEN_QEMU_NAMESPACES": "off"},
    "seccomp": {"MACHINEN_QEMU_SANDBOX": "on", "MACHINEN_QEMU_NAMESPACES": "off"},
    "seccomp+namespaces": {"MACHINEN_QEMU_SANDBOX": "on", "MACHINEN_QEMU_NAMESPACES": "on"},
}


async def main(rounds: int, siblings: int) -> dict:
    samples: dict[str, list[dict[str, float]]] = {setting: [] for setting in SETTINGS}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(rounds):
            for setting, env in SETTINGS.items():
                os.environ.update(env)
                samples[setting].append(await one_round(siblings, Path(workdir)))
    medians = {
        setting: {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}
        for setting, runs in samples.items()
    }
    ratios = {
        setting: {key: round(values[key] / medians["none"][key], 2) for key in values if medians["none"][key]}
        for setting, values in medians.items()
        if setting != "none"
    }
    return {"rounds": rounds, "siblings": siblings, "medians": medians, "over_none": ratios}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--siblings", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(anyio.run(main, args.rounds, args.siblings), indent=2))
