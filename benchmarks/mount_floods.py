"""What a live mount's host side costs: one request's round trip, and a hostile guest's floods.

    python benchmarks/mount_floods.py [--tree DIR] [--backend asyncio|trio]

A real supervisor relay, ``serve_mount`` and ``HostDirectory`` facing a fake guest (no VM,
so only the host side is measured): the mean round trip of 3,000 ``lstat`` requests sent one
after another, and the supervisor's RSS growth and most frames queued toward the agent over
3 s of each flood of tests/vm/test_mount_hostile.py (2,700 read requests then 200,000 CREDIT
frames granting the guest room it was never given; 30,000 read requests with honest credit).
``--tree`` runs another checkout's package (say an older commit, ``git worktree add``) with
this one's test helpers, so both are measured in one run.  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def _imports(tree: Path) -> None:
    sys.path[:0] = [str(HERE / "tests"), str(tree)]


async def round_trip_us(requests: int) -> float:
    import anyio
    from fake_agent import FakeAgent

    from machinen_async.protocol import mounts as protocol
    from machinen_async.protocol import wire
    from machinen_async.supervisor.mounts import HostDirectory, serve_mount
    from machinen_async.supervisor.relay import AgentRelay

    class OneAtATime(FakeAgent):
        def __init__(self, stream) -> None:
            super().__init__(stream)
            self.answered = anyio.Event()
            self.done = anyio.Event()
            self.elapsed = 0.0

        async def _dispatch(self, frame, tg) -> None:
            if frame[0] == wire.OPEN and frame[2] == "mount":
                tg.start_soon(self._ask, frame[1])
            elif frame[0] == wire.DATA and frame[2] == wire.STDIN:
                await self._send([wire.CREDIT, frame[1], wire.STDIN, len(frame[3])])
                self.answered.set()
            elif frame[0] not in (wire.CREDIT, wire.CANCEL):
                await super()._dispatch(frame, tg)

        async def _ask(self, sid: int) -> None:
            request = protocol.encode([1, "lstat", ["data"]])
            started = time.perf_counter()
            for _ in range(requests):
                self.answered = anyio.Event()
                await self._send([wire.DATA, sid, wire.STDOUT, request])
                await self.answered.wait()
            self.elapsed = time.perf_counter() - started
            self.done.set()

    tmp = Path(tempfile.mkdtemp())
    (tmp / "root").mkdir()
    (tmp / "root" / "data").write_text("x")
    guests: list[OneAtATime] = []

    async def serve_guest(stream) -> None:
        guests.append(OneAtATime(stream))
        await guests[-1].serve()

    relay = AgentRelay(tmp / "agent.sock", "bench")
    directory = HostDirectory(str(tmp / "root"), read_only=True)
    async with await anyio.create_unix_listener(tmp / "agent.sock") as listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve_guest)
        await relay.connect()
        tg.start_soon(relay.read_loop)
        tg.start_soon(relay.write_loop)
        tg.start_soon(serve_mount, relay, directory, "/mnt")
        while not guests:
            await anyio.sleep(0.01)
        await guests[0].done.wait()
        tg.cancel_scope.cancel()
    directory.close()
    return round(guests[0].elapsed / requests * 1e6, 1)


async def flood(requests: int, credits: int) -> dict:
    import anyio
    from test_mount_hostile import _queued_toward_agent, _rss_mib, flooded_relay

    before = _rss_mib()
    peak, most_queued = before, 0
    async with flooded_relay(Path(tempfile.mkdtemp()), requests=requests, credits=credits) as (relay, _guests):
        for _ in range(300):
            peak = max(peak, _rss_mib())
            most_queued = max(most_queued, _queued_toward_agent(relay))
            await anyio.sleep(0.01)
    return {"rss_growth_mib": round(peak - before, 1), "most_frames_toward_agent": most_queued}


async def main(args: argparse.Namespace) -> dict:
    import structlog

    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # the floods' warnings are expected
    return {
        "benchmark": "mount_floods",
        "tree": str(args.tree),
        "backend": args.backend,
        "lstat_round_trip_us": await round_trip_us(3000),
        "credit_flood": await flood(2_700, 200_000),  # first: RSS, once grown, is not given back
        "read_flood": await flood(30_000, 0),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", type=Path, default=HERE)
    parser.add_argument("--backend", default="asyncio")
    arguments = parser.parse_args()
    _imports(arguments.tree.resolve())
    import anyio

    print(json.dumps(anyio.run(main, arguments, backend=arguments.backend)))
