"""Port forwards: host TCP ports whose connections are relayed to guest ports through agent tunnels."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.abc

from ..errors import BootError, MachinenError
from ..store import registry
from .agent_call import AgentCall
from .relay import CHANNEL_DOWN, AgentRelay

Forward = anyio.abc.Listener[anyio.abc.SocketStream]  # a bound host port


async def bind_forwards(ports: list[list[Any]]) -> list[Forward]:
    """Bind every host port now, before QEMU starts, so a conflict fails fast."""
    listeners: list[Forward] = []
    try:
        for address, host_port, _ in ports:
            try:
                listeners.append(await anyio.create_tcp_listener(local_host=address, local_port=host_port))
            except OSError as exc:
                raise BootError(
                    f"host port {address}:{host_port} is in use by {_port_holder(host_port)} ({exc.strerror})",
                    code="BOOT_PORT_FORWARD_IN_USE",
                    port=host_port,
                ) from None
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    return listeners


def _port_holder(host_port: int) -> str:
    """The VM forwarding ``host_port``, for the error message, else "another process"."""
    for entry in registry.live_vms():
        meta = entry.read_meta() or {}
        if any(port == host_port for _, port, _ in meta.get("ports", [])):
            return f"VM {entry.name!r}"
    return "another process"


async def serve_forward(relay: AgentRelay, guest_port: int, connection: anyio.abc.SocketStream) -> None:
    """Relay one host TCP connection to ``guest_port`` through an agent tunnel.

    The directions are independent, as on a direct connection: guest bytes
    wait for the TCP client in a task of their own, so a client that is not
    reading (yet) never holds up the CREDIT that lets its upload go on.
    """
    async with connection:
        tunnel = AgentCall.open(relay, "tunnel", {"port": guest_port})
        if tunnel is None:
            return
        delivered = anyio.Event()  # everything the guest sent reached the TCP client
        try:
            async with anyio.create_task_group() as tg:

                async def host_to_guest() -> None:
                    """TCP bytes to the guest, read only as far as the agent's credit reaches."""
                    try:
                        while True:
                            try:
                                data = await connection.receive(await tunnel.room())
                            except (anyio.EndOfStream, *CHANNEL_DOWN):
                                break
                            await tunnel.send(data)  # within the room: never waits
                        tunnel.send_eof()
                    except MachinenError:
                        pass  # the tunnel ended: it takes nothing more

                async def guest_to_host() -> None:
                    try:
                        while data := await tunnel.receive():
                            await connection.send(data)
                            tunnel.acknowledge(len(data))
                        await connection.send_eof()
                    except CHANNEL_DOWN:
                        tg.cancel_scope.cancel()  # the TCP client went away: abandon the tunnel
                    finally:
                        delivered.set()

                tg.start_soon(host_to_guest)
                tg.start_soon(guest_to_host)
                await tunnel.run()
                await delivered.wait()
                tg.cancel_scope.cancel()
        finally:
            if not tunnel.ended:
                tunnel.cancel()
