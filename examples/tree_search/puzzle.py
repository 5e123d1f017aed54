"""The 8-puzzle inside the guest: the board lives in /root/board (so a fork inherits it), each
command is one step of a search the host drives.

    python3 puzzle.py set 1,2,3,4,5,6,7,8,0   the board, 0 the blank
    python3 puzzle.py moves                   the blank's legal moves: ["up", ...]
    python3 puzzle.py apply MOVE [MOVE...]    move the blank, move after move
    python3 puzzle.py undo MOVE               move it back
    python3 puzzle.py probe DEPTH             a depth-limited search from here (real work): the
                                              best Manhattan distance it reaches, and the moves
Every command prints one JSON line.
"""

from __future__ import annotations

import json
import sys

BOARD = "/root/board"
GOAL = (1, 2, 3, 4, 5, 6, 7, 8, 0)
STEP = {"up": -3, "down": 3, "left": -1, "right": 1}
REVERSE = {"up": "down", "down": "up", "left": "right", "right": "left"}


def legal(board: tuple[int, ...]) -> list[str]:
    row, col = divmod(board.index(0), 3)
    return [move for move, ok in (("up", row > 0), ("down", row < 2), ("left", col > 0), ("right", col < 2)) if ok]


def moved(board: tuple[int, ...], move: str) -> tuple[int, ...]:
    blank = board.index(0)
    target = blank + STEP[move]
    cells = list(board)
    cells[blank], cells[target] = cells[target], 0
    return tuple(cells)


def distance(board: tuple[int, ...]) -> int:
    """Manhattan distance of every tile from its goal cell."""
    return sum(abs(i // 3 - (t - 1) // 3) + abs(i % 3 - (t - 1) % 3) for i, t in enumerate(board) if t)


def probe(board: tuple[int, ...], depth: int) -> tuple[int, list[str]]:
    """The lowest distance reachable within ``depth`` moves (no immediate back-steps), and the
    moves to it: an exhaustive depth-first search, the work a sibling does on its own."""
    best: tuple[int, list[str]] = (distance(board), [])
    path: list[str] = []

    def visit(state: tuple[int, ...], left: int, previous: str | None) -> bool:
        nonlocal best
        h = distance(state)
        if h < best[0]:
            best = (h, list(path))
        if h == 0 or left == 0:
            return h == 0
        for move in legal(state):
            if previous is not None and move == REVERSE[previous]:
                continue
            path.append(move)
            solved = visit(moved(state, move), left - 1, move)
            path.pop()
            if solved:
                return True
        return False

    visit(board, depth, None)
    return best


def main(command: str, *args: str) -> object:
    if command == "set":
        board = tuple(int(tile) for tile in args[0].split(","))
    else:
        with open(BOARD) as f:
            board = tuple(json.load(f))
    if command == "moves":
        return legal(board)
    if command == "probe":
        h, moves = probe(board, int(args[0]))
        return {"distance": h, "moves": moves, "board": board}
    if command == "apply":
        for move in args:
            board = moved(board, move)
    if command == "undo":
        board = moved(board, REVERSE[args[0]])
    with open(BOARD, "w") as f:
        json.dump(board, f)
    return {"board": board, "distance": distance(board)}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])))
