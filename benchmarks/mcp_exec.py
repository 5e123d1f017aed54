"""What MCP adds to an exec round trip: `true` through `machinen mcp` (stdio, the mcp SDK's
ClientSession) against `true` through the SDK, on the same VM in the same run, interleaved.

    python benchmarks/mcp_exec.py [--execs 50] [--backend asyncio|trio]

Prints one JSON object: exec_true_ms for each path (p50/p95/mean), and mcp_over_sdk (p50 over p50).
The VM is booted by the MCP server (its session owns it); the SDK reaches it with `connect(name)`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import anyio
from mcp import ClientSession, StdioServerParameters, stdio_client

from machinen_async import connect


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"p50": round(percentile(ms, 0.5), 2), "p95": round(percentile(ms, 0.95), 2),
            "mean": round(statistics.mean(ms), 2), "n": len(ms)}  # fmt: skip


async def main(execs: int) -> dict[str, object]:
    server = StdioServerParameters(command=sys.executable, args=["-m", "machinen_async", "mcp"], env=dict(os.environ))
    name = f"bench-mcp-{os.getpid()}"
    through_mcp: list[float] = []
    through_sdk: list[float] = []
    async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        booted = await session.call_tool("boot", {"name": name})
        assert not booted.is_error, booted.content
        async with connect(name) as vm:
            for _ in range(5):  # warm up both paths
                await session.call_tool("exec", {"vm": name, "cmd": ["true"]})
                await vm.exec(["true"])
            for _ in range(execs):
                started = time.perf_counter()
                result = await session.call_tool("exec", {"vm": name, "cmd": ["true"]})
                through_mcp.append(time.perf_counter() - started)
                assert not result.is_error and result.structured_content["exit_code"] == 0
                started = time.perf_counter()
                await vm.exec(["true"], check=True)
                through_sdk.append(time.perf_counter() - started)
    mcp_ms, sdk_ms = summary_ms(through_mcp), summary_ms(through_sdk)
    return {
        "machine": platform.machine(),
        "exec_true_ms": {"mcp_stdio": mcp_ms, "sdk": sdk_ms},
        "mcp_over_sdk": round(mcp_ms["p50"] / sdk_ms["p50"], 2),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--execs", type=int, default=50)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    options = parser.parse_args()
    print(json.dumps(anyio.run(main, options.execs, backend=options.backend), indent=2))
