"""Flow control of the supervisor's own agent calls (``AgentCall``: port-forward tunnels, live
mounts), against a scripted agent behind a real ``AgentRelay``, over a socketpair: no VM.

What is checked, by construction rather than timing: input never exceeds the agent's credit
(and goes in whole pieces), a stalled agent leaves the sender blocked with nothing queued beyond
the window, bogus credit fails the call with a typed error that wakes a blocked sender, output is
held until acknowledged, and a cancellation anywhere leaves no route, no task and no call behind.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from machinen_async import ExecError
from machinen_async.protocol import wire
from machinen_async.protocol.framing import FrameStream
from machinen_async.supervisor.agent_call import AgentCall
from machinen_async.supervisor.relay import AgentRelay

BACKENDS = ["asyncio", "trio"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HANG_S = 20.0  # far beyond any honest wait here: reaching it means something was stuck


@asynccontextmanager
async def relay_with_agent() -> AsyncIterator[tuple[AgentRelay, FrameStream]]:
    """A running relay whose agent end is the returned frame stream (the test plays the agent)."""
    host_end, agent_end = socket.socketpair()
    relay = AgentRelay(Path("/nonexistent/agent.sock"), "flow")
    relay.agent = FrameStream(
        await anyio.abc.UNIXSocketStream.from_socket(host_end),
        max_frame=wire.MAX_GUEST_FRAME,
        check=wire.validate,
        send_stall_limit=HANG_S,
    )
    relay.agent_up, relay.agent_session = True, 1
    agent = FrameStream(await anyio.abc.UNIXSocketStream.from_socket(agent_end), check=wire.validate)
    try:
        with anyio.fail_after(HANG_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(relay.read_loop)
                tg.start_soon(relay.write_loop)
                yield relay, agent
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await agent.aclose()
            await relay.agent.aclose()


async def _opened(relay: AgentRelay, agent: FrameStream) -> AgentCall:
    call = AgentCall.open(relay, "tunnel", {"port": 1})
    assert call is not None
    frame = await agent.receive()
    assert wire.kind(frame) == wire.OPEN and wire.stream_id(frame) == call.sid
    return call


# --- input: within the agent's credit, in whole pieces --------------------------------------


async def _input_within_credit(sizes: list[int], grants: list[float]) -> None:
    async with relay_with_agent() as (relay, agent), anyio.create_task_group() as tg:
        call = await _opened(relay, agent)
        tg.start_soon(call.run)
        messages = [bytes([index % 251]) * size for index, size in enumerate(sizes)]

        async def sender() -> None:
            for message in messages:
                await call.send(message)

        tg.start_soon(sender)
        expected = b"".join(messages)
        received = bytearray()
        outstanding = 0  # received, not credited back: the sender's spent window
        ends = {sum(sizes[: index + 1]) for index in range(len(sizes))}
        plan = iter(grants)
        while len(received) < len(expected):
            frame = await agent.receive()
            fd, payload = wire.data(frame)
            assert fd == wire.STDIN
            start = len(received)
            received += payload
            outstanding += len(payload)
            assert outstanding <= wire.INITIAL_WINDOW  # never more in flight than the credit
            # Whole pieces: a CHUNK, or whatever is left of one message.
            next_end = min(end for end in ends if end > start)
            assert len(payload) == min(wire.CHUNK, next_end - start)
            next_end = min((end for end in ends if end > len(received)), default=len(received))
            stuck = wire.INITIAL_WINDOW - outstanding < min(wire.CHUNK, next_end - len(received))
            amount = outstanding if stuck else int(outstanding * next(plan, 1.0))
            if amount:
                outstanding -= amount
                await agent.send([wire.CREDIT, call.sid, wire.STDIN, amount])
        assert received == expected
        await agent.send([wire.RESULT, call.sid, {}])
        while not call.ended:
            await anyio.lowlevel.checkpoint()
        assert call.error is None


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(
    sizes=st.lists(st.integers(1, 3 * wire.CHUNK), min_size=1, max_size=24),
    grants=st.lists(st.sampled_from([0.0, 0.0, 0.3, 1.0]), max_size=60),
)
def test_input_stays_within_the_credit_in_whole_pieces(backend, sizes, grants):
    anyio.run(_input_within_credit, sizes, grants, backend=backend)


@pytest.mark.anyio
async def test_a_stalled_agent_blocks_the_sender_with_nothing_beyond_the_window():
    async with relay_with_agent() as (relay, agent), anyio.create_task_group() as tg:
        call = await _opened(relay, agent)
        tg.start_soon(call.run)
        upload = b"u" * (wire.INITIAL_WINDOW + 3 * wire.CHUNK)
        sent = anyio.Event()

        async def sender() -> None:
            await call.send(upload)
            sent.set()

        tg.start_soon(sender)
        received = bytearray()
        while len(received) < wire.INITIAL_WINDOW:
            received += wire.data(await agent.receive())[1]
        assert len(received) == wire.INITIAL_WINDOW
        # A probe queued now reaches the agent before anything queued after it: had the
        # sender queued more input than the window, it would arrive first.
        relay.send([wire.CONTROL, call.sid, {"probe": True}])
        probe = await agent.receive()
        assert wire.kind(probe) == wire.CONTROL
        assert not sent.is_set()
        await agent.send([wire.CREDIT, call.sid, wire.STDIN, wire.INITIAL_WINDOW])
        while len(received) < len(upload):
            received += wire.data(await agent.receive())[1]
        await sent.wait()
        assert received == upload
        call.cancel()
        tg.cancel_scope.cancel()


# --- bogus credit: a typed error that wakes a blocked sender --------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("bogus", ["before_any_input", "more_than_sent", "for_stdout"])
async def test_bogus_credit_fails_the_call_and_wakes_its_sender(bogus):
    async with relay_with_agent() as (relay, agent), anyio.create_task_group() as tg:
        call = await _opened(relay, agent)
        tg.start_soon(call.run)
        failures: list[BaseException] = []

        async def sender() -> None:
            try:
                await call.send(b"x" * (wire.INITIAL_WINDOW + 2 * wire.CHUNK))  # blocks once the window is spent
            except ExecError as exc:
                failures.append(exc)

        if bogus != "before_any_input":
            tg.start_soon(sender)
            received = 0
            while received < wire.INITIAL_WINDOW:
                received += len(wire.data(await agent.receive())[1])
        if bogus == "more_than_sent":
            await agent.send([wire.CREDIT, call.sid, wire.STDIN, 5])  # honest (too little for a piece)
        fd, amount = {"before_any_input": (wire.STDIN, 1), "more_than_sent": (wire.STDIN, wire.INITIAL_WINDOW),
                      "for_stdout": (wire.STDOUT, 10)}[bogus]  # fmt: skip
        await agent.send([wire.CREDIT, call.sid, fd, amount])
        cancel = await agent.receive()
        assert wire.kind(cancel) == wire.CANCEL and wire.stream_id(cancel) == call.sid
        while not call.ended:
            await anyio.lowlevel.checkpoint()
        assert call.error is not None and call.error[0] == "EXEC_PROTOCOL"
        assert isinstance(call.failure(), ExecError) and call.failure().code == "EXEC_PROTOCOL"
        with pytest.raises(ExecError) as raised:
            await call.room()
        assert raised.value.code == "EXEC_PROTOCOL"
        if bogus != "before_any_input":
            while not failures:
                await anyio.lowlevel.checkpoint()
            assert failures[0].code == "EXEC_PROTOCOL"
        assert call.sid not in relay.routes
        tg.cancel_scope.cancel()


# --- output: held until acknowledged ---------------------------------------------------------


@pytest.mark.anyio
async def test_output_beyond_what_was_acknowledged_fails_the_call():
    async with relay_with_agent() as (relay, agent), anyio.create_task_group() as tg:
        call = await _opened(relay, agent)
        tg.start_soon(call.run)
        for _ in range(wire.INITIAL_WINDOW // wire.CHUNK):
            await agent.send([wire.DATA, call.sid, wire.STDOUT, b"o" * wire.CHUNK])
        taken = 0
        while taken < wire.INITIAL_WINDOW:
            taken += len(await call.receive())
        call.acknowledge(wire.CHUNK)  # room for one more chunk, and no more
        assert wire.kind(await agent.receive()) == wire.CREDIT
        await agent.send([wire.DATA, call.sid, wire.STDOUT, b"o" * wire.CHUNK])
        assert len(await call.receive()) == wire.CHUNK
        await agent.send([wire.DATA, call.sid, wire.STDOUT, b"!"])
        assert await call.receive() == b""  # the call ended: EXEC_PROTOCOL, not a byte more
        assert call.ended and call.error is not None and call.error[0] == "EXEC_PROTOCOL"
        tg.cancel_scope.cancel()


# --- cancellation anywhere leaves nothing pending --------------------------------------------


async def _cancelled_at(turns: int, upload: int, download: int) -> None:
    async with relay_with_agent() as (relay, agent):
        call = await _opened(relay, agent)
        agent_done = anyio.Event()

        async def play_agent() -> None:
            """Echo credit for input, send ``download`` bytes of output; until CANCEL or RESULT."""
            left = download
            while True:
                frame = await agent.receive()
                kind = wire.kind(frame)
                if kind == wire.CANCEL:
                    break
                if kind == wire.DATA:
                    await agent.send([wire.CREDIT, call.sid, wire.STDIN, len(wire.data(frame)[1])])
                if kind == wire.EOF:
                    while left:
                        piece = min(left, wire.CHUNK)
                        left -= piece
                        await agent.send([wire.DATA, call.sid, wire.STDOUT, b"d" * piece])
                    await agent.send([wire.RESULT, call.sid, {}])
                    break
            agent_done.set()

        async with anyio.create_task_group() as outer:
            outer.start_soon(play_agent)
            with anyio.CancelScope() as scope:
                try:
                    async with anyio.create_task_group() as tg:

                        async def cancel_after() -> None:
                            for _ in range(turns):
                                await anyio.lowlevel.checkpoint()
                            scope.cancel()

                        async def upload_then_eof() -> None:
                            await call.send(b"u" * upload)
                            call.send_eof()

                        async def take_output() -> None:
                            while data := await call.receive():
                                call.acknowledge(len(data))

                        tg.start_soon(cancel_after)
                        tg.start_soon(upload_then_eof)
                        tg.start_soon(take_output)
                        await call.run()
                        tg.cancel_scope.cancel()
                finally:
                    if not call.ended:
                        call.cancel()
            await agent_done.wait()  # the agent got CANCEL, or finished the call
        assert call.sid not in relay.routes
        assert relay.routes == {}


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(turns=st.integers(0, 400), upload=st.integers(1, 3 * wire.INITIAL_WINDOW), download=st.integers(0, 300_000))
def test_cancellation_anywhere_leaves_nothing_pending(backend, turns, upload, download):
    anyio.run(_cancelled_at, turns, upload, download, backend=backend)
