"""Tree search over forks: the 8-puzzle solved by siblings that each try one move and search on
from there, level after level, each level forked from the best sibling of the one before.

    python examples/tree_search/run.py [--depth 15] [--backend asyncio|trio]

The board lives in the guest (/root/board, puzzle.py); the host only decides.  At each level the
current best VM forks one sibling per legal move; every sibling applies its move and runs a
depth-limited search from there (real work, in parallel); results come in finishing order
(``forks.as_completed``), a sibling that solves the puzzle ends the level at once (the others'
searches are cancelled), and the best sibling lives on: it plays its search's moves and is forked
for the next level (fork of a fork), the others are stopped.  At the end the winner's ``lineage``
is the path of VMs from the root, and the same search run one move at a time in one VM gives the
wall time to compare (printed as JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import anyio

from machinen_async import VM, boot

HERE = Path(__file__).resolve().parent
PUZZLE = "/opt/search/puzzle.py"
START = "8,6,7,2,5,4,3,0,1"  # 31 moves from the goal at best
REVERSE = {"up": "down", "down": "up", "left": "right", "right": "left"}


@dataclass(frozen=True)
class Probe:
    """What one sibling found: its move, then the moves of its search to the best board it saw."""

    move: str
    distance: int
    moves: list[str]

    def rank(self) -> tuple[int, int]:
        return self.distance, len(self.moves)


async def puzzle(vm: VM, *args: str) -> object:
    result = await vm.exec(["python3", PUZZLE, *args], check=True, timeout=900)
    return json.loads(result.stdout)


async def prepare(vm: VM) -> None:
    await vm.write_file(PUZZLE, (HERE / "puzzle.py").read_bytes(), parents=True)
    await puzzle(vm, "set", START)


async def legal_moves(vm: VM, last: str | None) -> list[str]:
    moves = await puzzle(vm, "moves")
    assert isinstance(moves, list)
    return [str(move) for move in moves if last is None or move != REVERSE[last]]


async def probe(vm: VM, move: str, depth: int) -> Probe:
    await puzzle(vm, "apply", move)
    found = await puzzle(vm, "probe", str(depth))
    assert isinstance(found, dict)
    return Probe(move, int(found["distance"]), [str(m) for m in found["moves"]])


def prober(moves: list[str], depth: int) -> Callable[[VM, int], Awaitable[Probe]]:
    """Sibling ``index`` tries ``moves[index]``."""
    return lambda vm, index: probe(vm, moves[index], depth)


async def forked_search(root: VM, depth: int) -> tuple[VM, list[list[str]]]:
    """Level after level of siblings; the VM that solved it, and the moves it played at each level."""
    frontier, level = root, 0
    levels: list[list[str]] = []
    while True:
        moves = await legal_moves(frontier, levels[-1][-1] if levels else None)
        forks = await frontier.fork(n=len(moves), name=f"tree-l{level}")
        found: dict[int, Probe] = {}
        async with aclosing(forks.as_completed(prober(moves, depth))) as results:
            async for index, result in results:
                found[index] = result
                print(f"  level {level}: {forks[index].name} tried {result.move}: distance {result.distance}")
                if result.distance == 0:
                    break  # solved: the other searches are cancelled as the loop is left
        best = min(found, key=lambda index: (*found[index].rank(), index))
        for index, sibling in enumerate(forks):
            if index != best:
                await sibling.aclose()  # pruned
        if frontier is not root:
            await frontier.aclose()  # its best child carries on
        frontier, winner = forks[best], found[best]
        if winner.moves:
            await puzzle(frontier, "apply", *winner.moves)
        levels.append([winner.move, *winner.moves])
        if winner.distance == 0:
            return frontier, levels
        level += 1


async def sequential_search(vm: VM, depth: int) -> list[list[str]]:
    """The same decisions, one move at a time in one VM: apply, search, undo."""
    levels: list[list[str]] = []
    while True:
        found = []
        for move in await legal_moves(vm, levels[-1][-1] if levels else None):
            found.append(await probe(vm, move, depth))
            await puzzle(vm, "undo", move)
            if found[-1].distance == 0:
                break
        winner = min(found, key=lambda p: (*p.rank(), found.index(p)))
        await puzzle(vm, "apply", winner.move, *winner.moves)
        levels.append([winner.move, *winner.moves])
        if winner.distance == 0:
            return levels


async def main(depth: int) -> None:
    async with boot(name="tree-root") as root:
        await prepare(root)
        started = time.perf_counter()
        solver, forked = await forked_search(root, depth)
        forked_s = time.perf_counter() - started
        print("\nthe tree, root first (each VM forked from the one above at the instant shown):")
        first = solver.lineage[0]["taken_at"] if solver.lineage else 0.0
        for generation, ancestor in enumerate(solver.lineage):
            print(f"  {'  ' * generation}{ancestor['name']}  (forked at +{ancestor['taken_at'] - first:.2f} s)")
        print(f"  {'  ' * len(solver.lineage)}{solver.name}  solved it")
        solved = await puzzle(solver, "probe", "0")  # the winner's own board
        assert isinstance(solved, dict) and solved["distance"] == 0
        await solver.aclose()
    async with boot(name="tree-seq") as alone:
        await prepare(alone)
        started = time.perf_counter()
        sequential = await sequential_search(alone, depth)
        sequential_s = time.perf_counter() - started
        solved = await puzzle(alone, "probe", "0")
        assert isinstance(solved, dict) and solved["distance"] == 0
    # Every level but the last is decided by all its siblings' results, in both searches alike; the
    # last ends with the first solver to report, which in the forked search is the first to finish.
    assert sequential[:-1] == forked[:-1], "the same decisions in both searches"
    print(json.dumps({
        "moves": sum(map(len, forked)), "levels": len(solver.lineage), "depth": depth,
        "forked_wall_s": round(forked_s, 2), "sequential_wall_s": round(sequential_s, 2),
        "sequential_over_forked": round(sequential_s / forked_s, 2),
    }))  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=15, help="moves each sibling searches ahead")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    anyio.run(main, args.depth, backend=args.backend)
