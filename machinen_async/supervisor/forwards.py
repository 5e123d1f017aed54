"""Port forwards: host TCP ports whose connections are relayed to guest ports through agent tunnels."""

from __future__ import annotations

import anyio
import anyio.abc

from ..errors import BootError
from ..protocol import wire
from ..store import registry
from .relay import CHANNEL_DOWN, AgentRelay, ClientConnection


async def bind_forwards(ports: list[list]) -> list[anyio.abc.SocketListener]:
    """Bind every host port now, before QEMU starts, so a conflict fails fast."""
    listeners = []
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
    tunnel = ClientConnection(None)
    upload_credit = wire.INITIAL_WINDOW  # how much more the agent lets us send
    credit_granted = anyio.Event()
    # Guest bytes for the TCP client, within the agent's credit; kept as bytes, not one object
    # per frame (a guest may send a byte per frame).
    to_host = bytearray()
    to_host_changed = anyio.Event()
    guest_done = False  # its EOF, or the call's end: nothing more joins ``to_host``
    delivered = anyio.Event()  # everything the guest sent reached the TCP client
    async with connection:
        agent_sid = relay.open_call(tunnel, 1, "tunnel", {"port": guest_port})
        if agent_sid is None:
            return
        finished = False
        try:
            async with anyio.create_task_group() as tg:

                async def host_to_guest() -> None:
                    nonlocal upload_credit, credit_granted
                    while True:
                        while upload_credit <= 0:
                            await credit_granted.wait()
                            credit_granted = anyio.Event()
                        try:
                            data = await connection.receive(min(upload_credit, wire.CHUNK))
                        except (anyio.EndOfStream, *CHANNEL_DOWN):
                            break
                        upload_credit -= len(data)
                        relay.send([wire.DATA, agent_sid, wire.STDIN, data])
                    relay.send([wire.EOF, agent_sid, wire.STDIN])

                async def guest_to_host() -> None:
                    nonlocal to_host_changed
                    try:
                        while to_host or not guest_done:
                            if not to_host:
                                to_host_changed = anyio.Event()
                                await to_host_changed.wait()
                                continue
                            data = bytes(to_host)
                            to_host.clear()
                            await connection.send(data)
                            relay.send([wire.CREDIT, agent_sid, wire.STDOUT, len(data)])
                        await connection.send_eof()
                    except CHANNEL_DOWN:
                        tg.cancel_scope.cancel()  # the TCP client went away: abandon the tunnel
                    finally:
                        delivered.set()

                tg.start_soon(host_to_guest)
                tg.start_soon(guest_to_host)
                async for frame in tunnel.outbox:
                    kind = frame[0]
                    if kind == wire.DATA:
                        to_host += frame[3]
                    elif kind == wire.EOF:
                        guest_done = True
                    elif kind == wire.CREDIT:
                        upload_credit += frame[3]
                        credit_granted.set()
                    else:
                        finished = True
                        break
                    to_host_changed.set()
                guest_done = True
                to_host_changed.set()
                await delivered.wait()
                tg.cancel_scope.cancel()
        finally:
            if not finished:
                relay.cancel(agent_sid)
