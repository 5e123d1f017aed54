"""Guest processes as the SDK hands them out: ``Process`` (streaming) and ``ExecResult`` (run to completion)."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import anyio.abc

from ..errors import ExecError
from ..protocol import wire
from ..protocol.mux import Call

Command = str | Sequence[str]


def argv_of(cmd: Command) -> list[str]:
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    argv = [str(a) for a in cmd]
    if not argv:
        raise ExecError("empty command", code="EXEC_COMMAND_INVALID")
    return argv


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: int | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class ProcessOutput(anyio.abc.ByteReceiveStream):
    """A guest process's stdout or stderr, chunk by chunk as it is produced."""

    def __init__(self, call: Call, fd: int) -> None:
        self._call = call
        self._fd = fd
        self._leftover = b""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._leftover:
            self._leftover = await self._call.receive(self._fd)
        data, self._leftover = self._leftover[:max_bytes], self._leftover[max_bytes:]
        return data

    async def aclose(self) -> None:
        pass


class ProcessInput(anyio.abc.ByteSendStream):
    """A guest process's stdin; ``aclose()`` sends EOF."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self._closed = False

    async def send(self, item: bytes) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        await self._call.send(item)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._call.send_eof()


class Process:
    """A running guest process (see ``VM.process``)."""

    def __init__(self, call: Call, argv: list[str]) -> None:
        self._call = call
        self.argv: list[str] = argv
        self.stdin: ProcessInput = ProcessInput(call)
        self.stdout: ProcessOutput = ProcessOutput(call, wire.STDOUT)
        self.stderr: ProcessOutput = ProcessOutput(call, wire.STDERR)
        self.returncode: int | None = None
        self.signal: int | None = None
        self.timed_out: bool = False

    async def wait(self) -> int:
        """Exit code (128+N when killed by signal N).

        Like a pipe, unread output eventually blocks the process: read
        stdout/stderr (or use ``VM.exec``) for chatty commands.
        """
        if self.returncode is None:
            outcome = await self._call.result()
            self.signal = outcome["signal"]
            self.timed_out = outcome["timed_out"]
            self.returncode = outcome["exit_code"]
        return self.returncode

    async def send_signal(self, signum: int, *, group: bool = False) -> None:
        await self._call.control({"signal": int(signum), "group": group})

    async def kill(self) -> None:
        await self.send_signal(signal.SIGKILL, group=True)

    async def resize(self, rows: int, cols: int) -> None:
        """New terminal size for a ``tty`` process (it gets SIGWINCH)."""
        await self._call.control({"resize": [int(rows), int(cols)]})
