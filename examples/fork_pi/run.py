"""Fan one warmed-up VM out into siblings that each answer a different prompt.

    python examples/fork_pi/run.py [--backend asyncio|trio]

Steps: boot the base image, install the agent into it and warm it up, then
give each sibling its own prompt in parallel and gather the answers with
timings.  With no API key the offline scripted agent (offline_agent.py)
answers, so the demo always runs end to end; the output says which mode ran.

Siblings are fresh VMs booted concurrently and warmed the same way: copy-on-
write `vm.fork(n=...)` siblings replace them when fork lands (issue #3).
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
    print(f"mode: offline scripted agent (no API key); siblings: concurrent cold boots; backend: {backend}")
    started = time.perf_counter()
    async with boot(name="fork-pi-template", progress=lambda m: print(f"  {m}")) as template:
        await install_agent(template)
        print(f"template ready in {time.perf_counter() - started:.1f} s ({template.info['accel']})")

        answers: list[tuple[str, float, float]] = [("", 0.0, 0.0)] * len(PROMPTS)
        fan_out_started = time.perf_counter()

        async def sibling(index: int, prompt: str) -> None:
            sibling_started = time.perf_counter()
            async with boot(name=f"fork-pi-{index}") as vm:
                await install_agent(vm)
                ready = time.perf_counter() - sibling_started
                answer, took = await ask(vm, prompt)
                answers[index] = (answer, ready, took)

        async with anyio.create_task_group() as tg:
            for index, prompt in enumerate(PROMPTS):
                tg.start_soon(sibling, index, prompt)
        fan_out = time.perf_counter() - fan_out_started

    for index, (prompt, (answer, ready, took)) in enumerate(zip(PROMPTS, answers)):
        print(f"\n[sibling {index}] ready after {ready:.1f} s, answered in {took:.2f} s")
        print(f"  Q: {prompt}\n  A: {answer}")
    print(f"\n{len(PROMPTS)} siblings answered in {fan_out:.1f} s wall")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    arguments = parser.parse_args()
    anyio.run(main, arguments.backend, backend=arguments.backend)
