"""Fan one warmed-up VM out into siblings that each answer a different prompt.

    python examples/fork_pi/run.py [--backend asyncio|trio]

Steps: boot the base image, install the agent into it and warm it up, fork
it into one sibling per prompt (copy-on-write memory and disk, all from the
same instant), give each sibling its prompt in parallel and gather the
answers with timings.  With no API key the offline scripted agent
(offline_agent.py) answers, so the demo always runs end to end; the output
says which mode ran.  (The real mode, the `pi` coding agent from npm with an
API key, is not built yet: it needs node >= 20.6, newer than Debian bookworm's.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anyio

from machinen_async import VM, boot

HERE = Path(__file__).resolve().parent
AGENT_PATH = "/opt/agent/offline_agent.py"
PROMPTS = [
    "what is pi",
    "hash the word fork",
    "summarise why copy-on-write siblings are cheap",
]


async def install_agent(vm: VM) -> None:
    await vm.write_file(AGENT_PATH, (HERE / "offline_agent.py").read_bytes(), mode=0o755, parents=True)
    await vm.exec(["python3", AGENT_PATH, "warm", "up"], check=True)  # first run compiles and caches


async def ask(vm: VM, prompt: str) -> tuple[str, float]:
    started = time.perf_counter()
    result = await vm.exec(["python3", AGENT_PATH, *prompt.split()], check=True)
    return result.stdout.decode().strip(), time.perf_counter() - started


async def main(backend: str) -> None:
    print(f"mode: offline scripted agent (no API key); backend: {backend}")
    started = time.perf_counter()
    async with boot(name="fork-pi-template", progress=lambda m: print(f"  {m}")) as template:
        await install_agent(template)
        print(f"template booted and warmed in {time.perf_counter() - started:.1f} s ({template.info['accel']})")

        fork_started = time.perf_counter()
        async with template.fork(n=len(PROMPTS), name="fork-pi") as siblings:
            forked = time.perf_counter() - fork_started
            print(
                f"forked {len(siblings)} siblings in {forked:.2f} s (template paused {siblings.source_pause_ms:.0f} ms)"
            )
            answers = await siblings.map(lambda vm, index: ask(vm, PROMPTS[index]))
        fan_out = time.perf_counter() - fork_started

    for index, (prompt, (answer, took)) in enumerate(zip(PROMPTS, answers)):
        print(f"\n[sibling {index}] answered in {took:.2f} s")
        print(f"  Q: {prompt}\n  A: {answer}")
    print(f"\n{len(PROMPTS)} siblings forked and answered in {fan_out:.1f} s wall")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    arguments = parser.parse_args()
    anyio.run(main, arguments.backend, backend=arguments.backend)
