"""Log files fed by what a guest controls (its serial console, QEMU's warnings about it), bounded on disk.

A guest can print to its console forever; ``-serial file:`` would grow the
file until the disk is full.  Instead QEMU writes to a pipe and the supervisor
copies it here: when the file reaches ``limit`` bytes it becomes ``<name>.1``
(replacing the previous one) and a new file starts, so at most twice
``limit`` is ever kept and the newest output is always there.  A log is never
opened through a symlink: a new file is created ``O_EXCL | O_NOFOLLOW`` after
unlinking whatever was at its name (``paths.create_file``).
"""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path

import anyio.abc

from ..errors import MachinenError
from ..store import paths

CONSOLE_LOG_LIMIT = 1 << 20
QEMU_LOG_LIMIT = 256 << 10
SUPERVISOR_LOG_LIMIT = 1 << 20  # a guest can provoke its lines (refused connections, protocol breaks)
BUDGET_WINDOW_S = 60.0
TAIL_BYTES = 3000  # of a log, quoted in an error


def tail(path: Path) -> str:
    """The end of a log file, for an error message ("" if there is none)."""
    try:
        with open(paths.open_regular(path), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL_BYTES))
            return f.read().decode(errors="replace")
    except (OSError, MachinenError):
        return ""


class Budget:
    """At most ``per_window`` events in any ``window_s`` seconds: for log lines (and retries)
    that a guest can trigger at will, so what it costs the host is bounded."""

    per_window: int
    window_s: float

    def __init__(self, per_window: int, window_s: float) -> None:
        self.per_window, self.window_s = per_window, window_s
        self.spent: collections.deque[float] = collections.deque()
        self.just_exhausted: bool = False  # the last spend() was the first one refused

    def spend(self) -> bool:
        now = time.monotonic()
        while self.spent and self.spent[0] < now - self.window_s:
            self.spent.popleft()
        if len(self.spent) > self.per_window:
            self.just_exhausted = False
            return False
        self.spent.append(now)
        self.just_exhausted = len(self.spent) > self.per_window
        return not self.just_exhausted


class CappedLog:
    keep_existing = False  # append to a file already there (counting it) rather than empty it
    path: Path
    limit: int

    def __init__(self, path: Path, limit: int) -> None:
        self.path, self.limit = path, limit
        self.previous: Path = path.with_name(path.name + ".1")
        self.fd: int = self._open()
        self.size: int = os.fstat(self.fd).st_size

    def _open(self) -> int:
        if not self.keep_existing:
            return paths.create_file(self.path, os.O_WRONLY | os.O_APPEND)
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def write(self, data: bytes) -> None:
        while data:
            room = self.limit - self.size
            if room <= 0:
                os.close(self.fd)
                os.replace(self.path, self.previous)
                self.fd, self.size = self._open(), 0
                room = self.limit
            written = os.write(self.fd, data[:room])
            self.size += written
            data = data[written:]

    def close(self) -> None:
        os.close(self.fd)


class ProcessLog(CappedLog):
    """This process's own log as a capped log: its stdout and stderr follow the current file
    (a traceback, a child's message land there too, uncounted), and ``write`` takes the text a
    ``structlog.PrintLogger`` prints (nothing is buffered: ``flush`` has nothing to do)."""

    keep_existing = True

    def _open(self) -> int:
        fd = super()._open()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        return fd

    def write(self, data: str | bytes) -> None:  # type: ignore[override]
        super().write(data.encode(errors="replace") if isinstance(data, str) else data)

    def flush(self) -> None:
        pass


async def copy_into(stream: anyio.abc.ByteReceiveStream, path: Path, limit: int) -> None:
    """Copy ``stream`` into a capped log at ``path`` until it ends."""
    log = CappedLog(path, limit)
    try:
        async for chunk in stream:
            log.write(chunk)
    finally:
        log.close()
