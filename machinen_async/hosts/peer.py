"""The far end of an SSH link: ``machinen _peer``, serving one client on stdin/stdout.

Requests are frames ``[id, method, params]``; replies ``[id, True, result]``
or ``[id, False, code, message]`` (hosts/client.py is the caller's side).
Requests are served concurrently, so a client can keep several chunk uploads
in flight.  What it serves is this machine's ``LocalDriver`` plus the
receiving half of chunk transfer.  VMs started for the client without
``detached`` belong to this process: when the SSH connection goes (stdin
reaches EOF) they are stopped, the same lifeline rule as a local ``boot()``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
from anyio.streams.file import FileReadStream, FileWriteStream
from anyio.streams.stapled import StapledByteStream

from ..errors import MachinenError
from ..protocol import wire
from ..protocol.framing import FrameStream
from ..protocol.messages import BootRequest, ForkRequest, RestoreRequest
from ..store import chunks, registry
from . import transfer
from .base import Connection, close_connections
from .local import LocalDriver, host_facts


class Peer:
    def __init__(self, frames: FrameStream) -> None:
        self.frames: FrameStream = frames
        self.driver: LocalDriver = LocalDriver()
        self.owned: dict[str, Connection] = {}
        run = anyio.to_thread.run_sync
        self.methods: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "hello": lambda params: run(host_facts),
            "missing": lambda params: run(chunks.missing, params["digests"]),
            "put": lambda params: run(transfer.store_chunk, params),
            "lacking": lambda params: run(transfer.lacking, params),
            "assemble": lambda params: run(transfer.assemble_bundle, params),
            "remove_bundle": lambda params: run(transfer.remove_bundle, params["bundle"]),
            "boot": self.boot,
            "restore": self.restore,
            "fork": self.fork,
            "locate": self.locate,
            "list": lambda params: self.driver.list(),
            "stop": self.stop,
        }

    async def handle(self, request: wire.Frame) -> None:
        request_id, method, params = request[0], request[1], request[2] if len(request) > 2 else {}
        try:
            serve = self.methods.get(method)
            if serve is None:
                raise MachinenError(f"unknown peer method {method!r}", code="HOST_PROTOCOL")
            result = await serve(params)
        except MachinenError as exc:
            await self.frames.send([request_id, False, exc.code, exc.message])
        except Exception as exc:  # report, don't die: the client decides what to do
            await self.frames.send([request_id, False, "HOST_PEER_FAILED", f"{type(exc).__name__}: {exc}"])
        else:
            await self.frames.send([request_id, True, result])

    async def _keep(self, connections: list[Connection], detached: bool) -> list[dict[str, str]]:
        """Hold the VMs started for the client (or let detached ones go); where to reach them."""
        for connection in connections:
            if detached:
                await connection.channel.aclose()
            else:
                self.owned[connection.name] = connection
        return [{"name": c.name, "socket": str(registry.vm_dir(c.name).supervisor_socket)} for c in connections]

    async def boot(self, params: dict[str, Any]) -> dict[str, Any]:
        """One VM booted here, warm where this host has the template."""
        request = BootRequest.from_wire(params.get("request"))
        started = await self.driver.boot(request)
        return {"vms": await self._keep([started], request.detached)}

    async def restore(self, params: dict[str, Any]) -> dict[str, Any]:
        """One VM, or with ``siblings`` several sharing the bundle's RAM copy-on-write."""
        request = RestoreRequest.from_wire(params.get("request"))
        started = await self.driver.restore(request)
        return {"vms": await self._keep(started, request.detached)}

    async def fork(self, params: dict[str, Any]) -> dict[str, Any]:
        """Siblings of a VM of this host, sharing its fork template copy-on-write."""
        request = ForkRequest.from_wire(params.get("request"))
        source = await self.driver.connect(registry.validate_name(params.get("source")))
        try:
            started, template = await self.driver.fork(source, request)
        finally:
            await source.channel.aclose()
        return {"vms": await self._keep(started, request.detached), "template": template.to_wire()}

    async def locate(self, params: dict[str, Any]) -> dict[str, Any]:
        entry = registry.find(params["name"])
        return {"socket": str(entry.supervisor_socket), "owned": params["name"] in self.owned}

    async def stop(self, params: dict[str, Any]) -> dict[str, Any]:
        owned = self.owned.pop(params["name"], None)
        if owned is not None:
            await close_connections([owned])
            how = "stopped"
        else:
            how = await self.driver.stop(params["name"], force=bool(params.get("force")))
        return {"name": params["name"], "stopped": True, "how": how}

    async def serve(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                while True:
                    try:
                        request = await self.frames.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, wire.ProtocolError):
                        break
                    tg.start_soon(self.handle, request)
                tg.cancel_scope.cancel()
        finally:
            await close_connections(list(self.owned.values()))


async def amain() -> None:
    stdin = FileReadStream(open(os.dup(0), "rb", buffering=0))  # noqa: SIM115 - the stream owns it
    stdout = FileWriteStream(open(os.dup(1), "wb", buffering=0))  # noqa: SIM115
    # Nothing else may write to the protocol stream.
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    await Peer(FrameStream(StapledByteStream(stdout, stdin))).serve()
