"""No call on a channel waits for another: property-based interleavings against a fake agent.

No VM here (see fake_agent.py): these run in milliseconds, so hypothesis can
try many interleavings of long streaming calls, short calls, stdin uploads,
output nobody reads, cancellation at random points and a peer that dies.
The real-VM versions of the same promises are in test_concurrency.py.

Liveness is checked by construction, not by timing: ``long`` calls cannot
finish before the test opens their gate, and the test opens it only after
every short call returned; with head-of-line blocking a short call would
wait for a long one and the example would hit its (generous) bound.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass

import anyio
import anyio.lowlevel
import pytest
from fake_agent import chunk, fake_vm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from machinen_async import AgentUnavailableError, ExecError

HANG_S = 10.0  # far beyond any honest wait here: reaching it means a call was stuck

BACKENDS = ["asyncio", "trio"]


@dataclass(frozen=True)
class Long:
    chunks: int
    reads: str  # "all": consume the output as it comes; "none": leave it unread; "some": read a few chunks


@dataclass(frozen=True)
class Short:
    kind: str  # "short", "ping", "echo", "chatty"
    size: int  # echo payload bytes / chatty chunk count
    delay: float
    concurrent: bool  # start without waiting for the previous short op
    cancel_after: int | None  # cancel after this many scheduler turns (None: run to the end)


longs = st.lists(st.builds(Long, st.integers(0, 40), st.sampled_from(["all", "none", "some"])), min_size=1, max_size=3)
shorts = st.lists(
    st.builds(
        Short,
        st.sampled_from(["short", "ping", "echo", "chatty"]),
        st.integers(0, 2_500_000),
        st.sampled_from([0.0, 0.0005, 0.003]),
        st.booleans(),
        st.one_of(st.none(), st.integers(0, 30)),
    ),
    min_size=1,
    max_size=10,
)
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    return [
        leaf for exc in group.exceptions for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]


async def _cancel_after(scope: anyio.CancelScope, turns: int) -> None:
    for _ in range(turns):
        await anyio.lowlevel.checkpoint()
    scope.cancel()


async def _short_op(vm, index: int, op: Short) -> None:
    """Run one short op; check it got exactly its own answer (or was cancelled)."""
    await anyio.sleep(op.delay)
    tag = f"s{index}"
    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            if op.cancel_after is not None:
                tg.start_soon(_cancel_after, scope, op.cancel_after)
            with anyio.fail_after(HANG_S):
                if op.kind == "ping":
                    assert (await vm.ping())["pong"] is True
                elif op.kind == "short":
                    assert (await vm.exec(["short", tag])).stdout == tag.encode()
                elif op.kind == "chatty":
                    count = op.size % 50
                    result = await vm.exec(["chatty", tag, str(count)])
                    assert result.stdout == b"".join(chunk(tag, i) for i in range(0, count, 2))
                    assert result.stderr == b"".join(chunk(tag, i) for i in range(1, count, 2))
                else:
                    payload = (tag.encode() + b"|") * (op.size // (len(tag) + 1) + 1)
                    result = await vm.exec(["echo", tag], input=payload)
                    assert result.stdout == payload
        tg.cancel_scope.cancel()


async def _long_call(vm, index: int, spec: Long, started: anyio.Event) -> None:
    tag = f"L{index}"
    expected = b"".join(chunk(tag, i) for i in range(spec.chunks))
    async with vm.process(["long", tag, str(spec.chunks)], stdin=False) as proc:
        started.set()
        received = bytearray()
        if spec.reads == "none":
            assert await proc.wait() == 0
        else:
            while spec.reads == "all" or len(received) < len(expected) // 2:
                try:
                    received += await proc.stdout.receive()
                except anyio.EndOfStream:
                    break
            assert expected.startswith(bytes(received))
            assert await proc.wait() == 0
            if spec.reads == "all":
                assert bytes(received) == expected


async def _settle(vm, agent) -> None:
    """Wait until both ends agree that nothing is in flight, then check nothing leaked."""
    with anyio.fail_after(HANG_S):
        while agent.live or vm._channel._calls:
            await vm.ping()  # a reader is needed for late frames to be taken in
            await anyio.sleep(0.001)


async def _interleaving(long_calls: list[Long], short_ops: list[Short], flood: bool) -> None:
    async with fake_vm() as (vm, agent):
        async with anyio.create_task_group() as longs_group:
            for index, spec in enumerate(long_calls):
                started = anyio.Event()
                longs_group.start_soon(_long_call, vm, index, spec, started)
                await started.wait()
            async with AsyncExitStack() as stack:
                if flood:  # a process whose output nobody reads, during all the short ops
                    await stack.enter_async_context(vm.process(["flood", "f"], stdin=False))
                async with anyio.create_task_group() as shorts_group:
                    for index, op in enumerate(short_ops):
                        if op.concurrent:
                            shorts_group.start_soon(_short_op, vm, index, op)
                        else:
                            await _short_op(vm, index, op)
            # Every short op returned while the long calls could not finish.
            assert not agent.gate.is_set()
            agent.gate.set()
        opened = agent.finished | agent.cancelled | set(agent.live)
        await _settle(vm, agent)
        # Nothing leaked on either end (_settle), every call ended exactly one way, every
        # long call ran to its end; a short op cancelled early may never have opened.
        assert opened <= agent.finished | agent.cancelled
        assert not (agent.finished & agent.cancelled)
        assert len(agent.finished) >= len(long_calls)
        assert len(opened) <= len(long_calls) + len(short_ops) + flood


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(long_calls=longs, short_ops=shorts, flood=st.booleans())
def test_short_calls_never_wait_for_long_ones(backend, long_calls, short_ops, flood):
    anyio.run(_interleaving, long_calls, short_ops, flood, backend=backend)


async def _peer_dies(long_calls: list[Long], short_ops: list[Short], die_after: int) -> None:
    async with fake_vm() as (vm, agent):
        agent.die_after_frames = agent.frames_sent + die_after
        long_failures: list[str] = []

        async def guarded(run, *args) -> None:
            try:
                await run(*args)
            except* (AgentUnavailableError, ExecError) as failures:
                codes = {exc.code for exc in _leaves(failures)}
                assert codes <= {"EXEC_AGENT_UNAVAILABLE"}, codes
                if run is _long_call:
                    long_failures.append("EXEC_AGENT_UNAVAILABLE")

        with anyio.fail_after(HANG_S):
            async with anyio.create_task_group() as tg:
                for index, spec in enumerate(long_calls):
                    tg.start_soon(guarded, _long_call, vm, index, spec, anyio.Event())
                async with anyio.create_task_group() as shorts_group:
                    for index, op in enumerate(short_ops):
                        shorts_group.start_soon(guarded, _short_op, vm, index, op)
                if not agent.dead.is_set():  # it sent fewer frames than die_after: it dies now
                    await agent.frames.aclose()
        # The long calls were still gated when the peer died: every one failed, typed.
        assert len(long_failures) == len(long_calls)
        assert vm._channel._calls == {}
        with pytest.raises(AgentUnavailableError):
            await vm.ping()


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(long_calls=longs, short_ops=shorts, die_after=st.integers(0, 60))
def test_a_dying_peer_fails_every_call_and_hangs_none(backend, long_calls, short_ops, die_after):
    anyio.run(_peer_dies, long_calls, short_ops, die_after, backend=backend)


@pytest.mark.anyio
async def test_the_reported_case_ping_during_a_long_exec():
    """Issue 10 as reported: a ping, an exec and describe-like calls during a long exec."""
    async with fake_vm() as (vm, agent):
        async with anyio.create_task_group() as tg:
            tg.start_soon(vm.exec, ["long", "sleep", "0"])
            await anyio.sleep(0.01)
            with anyio.fail_after(HANG_S):
                assert (await vm.ping())["pong"]
                assert (await vm.exec(["short", "true"])).stdout == b"true"
                assert (await vm.ping())["pong"]
            agent.gate.set()
        await _settle(vm, agent)


@pytest.mark.anyio
async def test_a_cancelled_reader_hands_the_read_role_on():
    """The task reading for everyone is cancelled mid-receive: the others still get their answers."""
    async with fake_vm() as (vm, agent):
        async with vm.process(["long", "a", "3"], stdin=False) as proc:
            with anyio.move_on_after(0.05):
                while True:  # holds the read role, then blocks in receive once the 3 chunks are in
                    await proc.stdout.receive()
            with anyio.fail_after(HANG_S):
                assert (await vm.exec(["short", "b"])).stdout == b"b"
        await _settle(vm, agent)
        assert agent.cancelled == {1}  # the long call, abandoned by leaving the block


@pytest.mark.anyio
async def test_cancelling_a_call_wakes_the_task_reading_for_it():
    """Another task cancels a call whose consumer holds the read role: the consumer returns at once."""
    async with fake_vm() as (vm, agent):
        async with vm.process(["long", "a", "0"], stdin=False) as proc, anyio.create_task_group() as tg:

            async def consume() -> None:
                with anyio.fail_after(HANG_S), pytest.raises(ExecError) as cancelled:
                    await proc.stdout.receive()
                assert cancelled.value.code == "EXEC_CANCELLED"

            tg.start_soon(consume)
            await anyio.sleep(0.01)
            await proc._call.cancel()
        await _settle(vm, agent)
