"""The SSH side of a link: one asyncssh connection, ``machinen _peer`` running on it, and unix
socket forwards to supervisors there.  Lives in the asyncio loop of the driver's portal."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import asyncssh

from ..errors import HostError, MachinenError, TransferError
from .remote import forward_path


class _ProcessStream(anyio.abc.ByteStream):
    """An asyncssh process's stdin/stdout as an anyio byte stream."""

    def __init__(self, process: asyncssh.SSHClientProcess[bytes]) -> None:
        self._process = process

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self._process.stdout.read(max_bytes)
        if not data:
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        self._process.stdin.write(item)
        await self._process.stdin.drain()

    async def send_eof(self) -> None:
        self._process.stdin.write_eof()

    async def aclose(self) -> None:
        self._process.close()


class SSHTransport:
    """One SSH connection and the peer process on it."""

    def __init__(self, destination: str, settings: dict[str, Any], command: str) -> None:
        self.destination = destination
        self.settings = settings
        self.command = command
        self.connection: asyncssh.SSHClientConnection | None = None
        self.process: asyncssh.SSHClientProcess[bytes] | None = None
        self.forwards: dict[str, tuple[str, asyncssh.SSHListener]] = {}

    async def open(self) -> anyio.abc.ByteStream:
        """Connect and start the peer; its stdin/stdout as a stream."""
        try:
            self.connection = await asyncssh.connect(self.destination, **self.settings)
        except (TimeoutError, OSError, asyncssh.Error) as exc:
            raise HostError(f"cannot reach {self.destination}: {exc}", code="HOST_UNREACHABLE") from None
        self.process = await self.connection.create_process(f"{self.command} _peer", encoding=None)
        return _ProcessStream(self.process)

    async def why_lost(self) -> MachinenError:
        """The error for calls once the peer's stream ended: its exit status and stderr say why."""
        process = self.process
        stderr = b""
        with contextlib.suppress(Exception):
            with anyio.move_on_after(1):
                stderr = await process.stderr.read()
                await process.wait_closed()
        tail = stderr.decode(errors="replace").strip()[-500:]
        if process.exit_status == 127:
            return HostError(
                f"{self.command!r} is not installed on {self.destination}: {tail}", code="HOST_MACHINEN_NOT_FOUND"
            )
        return TransferError(
            f"the connection to {self.destination} was lost" + (f": {tail}" if tail else ""),
            code="HOST_CONNECTION_LOST",
        )

    async def forward(self, remote_socket: str, local_dir: Path) -> str:
        """A local unix socket that reaches ``remote_socket`` on the host."""
        if remote_socket in self.forwards:
            return self.forwards[remote_socket][0]
        local = str(forward_path(local_dir, remote_socket))
        listener = await self.connection.forward_local_path(local, remote_socket)
        os.chmod(local, 0o600)
        self.forwards[remote_socket] = (local, listener)
        return local

    async def close(self) -> None:
        for _, listener in self.forwards.values():
            listener.close()
        if self.process is not None:
            self.process.stdin.write_eof()
        if self.connection is not None:
            self.connection.close()
            with contextlib.suppress(Exception):
                await self.connection.wait_closed()
