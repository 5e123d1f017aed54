"""Fan one warmed-up VM out into siblings that each answer a different prompt.

    python examples/fork_pi/run.py [--mode auto|pi|offline] [--openai-base-url URL --model ID]
                                   [--backend asyncio|trio]

Steps: bake an image with the agent in it, boot it and warm the agent up,
fork it into one sibling per prompt (copy-on-write memory and disk, all from
the same instant), give each sibling its prompt in parallel and gather the
answers with timings.  The output says which mode ran:

- pi: the `pi` coding agent (npm @mariozechner/pi-coding-agent) on a Debian
  trixie image (it needs node >= 20.6), baked on this host with mmdebstrap
  and `npm install -g` (cached after the first run).  Its model is either a
  hosted provider whose API key is in the environment (ANTHROPIC_API_KEY,
  OPENAI_API_KEY, ...; passed to each sibling's process, never written into
  the image) or any OpenAI-compatible server (Ollama, vLLM, LM Studio) given
  with --openai-base-url; from the guest, this host is 10.0.2.2.
- offline: with neither, a scripted stand-in (offline_agent.py) answers, so
  the demo always runs end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import anyio

from machinen_async import VM, NetworkPolicy, boot, debian_rootfs

HERE = Path(__file__).resolve().parent
OFFLINE_AGENT = "/opt/agent/offline_agent.py"
PI_PACKAGE = "@mariozechner/pi-coding-agent@0.73.1"
PI_PROVIDER = "machinen-local"  # our name for an OpenAI-compatible server given on the command line
PI_ENV = {"PI_OFFLINE": "1", "PI_TELEMETRY": "0", "HOME": "/root"}  # no update checks from siblings
API_KEY_VARS = (
    "ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY", "MISTRAL_API_KEY", "GROQ_API_KEY",
    "DEEPSEEK_API_KEY", "XAI_API_KEY", "OPENROUTER_API_KEY", "CEREBRAS_API_KEY",
)  # fmt: skip
PROMPTS = [
    "what is pi",
    "hash the word fork",
    "summarise why copy-on-write siblings are cheap",
]


class Agent(Protocol):
    """What the demo needs of an agent: its image, how it is installed and asked, what it may reach."""

    title: str
    memory_mib: int
    env: dict[str, str]
    network: NetworkPolicy

    async def image(self, report: Callable[[str], None]) -> Path | None: ...

    async def install(self, vm: VM) -> None: ...

    def argv(self, prompt: str) -> list[str]: ...


class OfflineAgent:
    title = "offline scripted agent (no API key and no --openai-base-url)"
    memory_mib = 256

    async def image(self, report: Callable[[str], None]) -> Path | None:
        return None  # the base image has python3

    async def install(self, vm: VM) -> None:
        await vm.write_file(OFFLINE_AGENT, (HERE / "offline_agent.py").read_bytes(), mode=0o755, parents=True)
        await vm.exec(["python3", OFFLINE_AGENT, "warm", "up"], check=True)  # first run compiles and caches

    def argv(self, prompt: str) -> list[str]:
        return ["python3", OFFLINE_AGENT, *prompt.split()]

    env: dict[str, str] = {}
    network = NetworkPolicy()  # it needs none; the default: outbound only, the host closed


class PiAgent:
    memory_mib = 768  # node and pi want more than the default

    def __init__(self, base_url: str | None, model: str | None) -> None:
        self.base_url, self.model = base_url, model
        # The host's loopback is closed to guests by default; a model server on it (the guest's
        # 10.0.2.2) is opened on its port only.
        url = urllib.parse.urlsplit(base_url or "")
        self.network = (
            NetworkPolicy.host_ports(url.port or (443 if url.scheme == "https" else 80))
            if url.hostname == "10.0.2.2"
            else NetworkPolicy()
        )
        keys = [name for name in API_KEY_VARS if os.environ.get(name)]
        source = f"OpenAI-compatible server {base_url}" if base_url else f"key from {', '.join(keys)}"
        self.title = f"pi coding agent {PI_PACKAGE.rsplit('@', 1)[1]} ({source})"
        self.env = {**PI_ENV, **{name: os.environ[name] for name in keys}}

    async def image(self, report: Callable[[str], None]) -> Path | None:
        return await debian_rootfs(
            suite="trixie",
            packages=["nodejs", "npm", "ca-certificates"],
            run=[f"npm install -g --no-fund --no-audit --loglevel=error {PI_PACKAGE}"],
            progress=report,
        )

    async def install(self, vm: VM) -> None:
        if self.base_url:
            provider = {
                "baseUrl": self.base_url,
                "api": "openai-completions",
                "apiKey": "none",
                "compat": {"supportsDeveloperRole": False, "supportsReasoningEffort": False},
                "models": [{"id": self.model}],
            }
            config = {"providers": {PI_PROVIDER: provider}}
            await vm.write_file("/root/.pi/agent/models.json", json.dumps(config).encode(), parents=True)
        version = await vm.exec(["pi", "--version"], env=PI_ENV, check=True, timeout=120)  # loads node + pi once
        print(f"  pi --version: {(version.stdout or version.stderr).decode().strip()}")  # pi prints it on stderr

    def argv(self, prompt: str) -> list[str]:
        model = ["--provider", PI_PROVIDER, "--model", self.model] if self.base_url and self.model else []
        return ["pi", "-p", "--no-session", *model, prompt]


async def ask(agent: Agent, vm: VM, prompt: str) -> tuple[str, float]:
    started = time.perf_counter()
    result = await vm.exec(agent.argv(prompt), env=agent.env, cwd="/root", check=True, timeout=300)
    return result.stdout.decode().strip(), time.perf_counter() - started


def choose(mode: str, base_url: str | None, model: str | None) -> Agent:
    wants_pi = base_url is not None or any(os.environ.get(name) for name in API_KEY_VARS)
    if mode == "pi" or (mode == "auto" and wants_pi):
        if not wants_pi:
            raise SystemExit(f"--mode pi needs --openai-base-url or one of {', '.join(API_KEY_VARS)}")
        if base_url and not model:
            raise SystemExit("--openai-base-url needs --model (the model id the server serves)")
        return PiAgent(base_url, model)
    return OfflineAgent()


async def main(args: argparse.Namespace) -> None:
    agent = choose(args.mode, args.openai_base_url, args.model)
    print(f"mode: {agent.title}; backend: {args.backend}")
    started = time.perf_counter()
    image = await agent.image(lambda message: print(f"  {message}"))
    async with boot(
        image,
        name="fork-pi-template",
        memory_mib=args.mib or agent.memory_mib,
        network=agent.network,  # the siblings keep it
        progress=lambda m: print(f"  {m}"),
    ) as vm:
        await agent.install(vm)
        print(f"template booted and warmed in {time.perf_counter() - started:.1f} s ({vm.info['accel']})")

        fork_started = time.perf_counter()
        async with vm.fork(n=len(PROMPTS), name="fork-pi") as siblings:
            forked = time.perf_counter() - fork_started
            print(
                f"forked {len(siblings)} siblings in {forked:.2f} s (template paused {siblings.source_pause_ms:.0f} ms)"
            )
            answers = await siblings.map(lambda sibling, index: ask(agent, sibling, PROMPTS[index]))
        fan_out = time.perf_counter() - fork_started

    for index, (prompt, (answer, took)) in enumerate(zip(PROMPTS, answers)):
        print(f"\n[sibling {index}] answered in {took:.2f} s")
        print(f"  Q: {prompt}\n  A: {answer}")
    print(f"\n{len(PROMPTS)} siblings forked and answered in {fan_out:.1f} s wall")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["auto", "pi", "offline"], default="auto")
    parser.add_argument("--openai-base-url", help="An OpenAI-compatible server for pi, e.g. http://10.0.2.2:11434/v1")
    parser.add_argument("--model", help="Model id on that server.")
    parser.add_argument("--mib", type=int, help="Guest RAM (default: 256 MiB offline, 768 MiB for pi).")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    arguments = parser.parse_args()
    anyio.run(main, arguments, backend=arguments.backend)
