"""The byte stream over Ray actor calls (hosts/ray_node.py ``_ActorStream``) against an
in-memory actor whose calls take random time: no cluster, so hypothesis can try many
interleavings.  The real cluster tests are in test_ray.py.

``_ActorStream`` lives in the remote driver's asyncio portal loop only, so these run
under asyncio.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray.exceptions import RayError

from machinen_async.hosts import ray_node

HANG_S = 10
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class _Call:
    """What ``.remote()`` gives, as far as ``_ActorStream`` uses it: ``future()``."""

    def __init__(self, coroutine) -> None:
        self._coroutine = coroutine

    def future(self):
        return asyncio.run_coroutine_threadsafe(self._coroutine, asyncio.get_running_loop())


class _Method:
    def __init__(self, function) -> None:
        self._function = function

    def remote(self, *args):
        return _Call(self._function(*args))


class FakeActor:
    """Takes sends after a random delay; fails every call from the ``fail_at``-th send on."""

    def __init__(self, seed: int, fail_at: int | None = None) -> None:
        self.rng = random.Random(seed)
        self.fail_at = fail_at
        self.received = bytearray()
        self.sends = 0
        self.sends_in_flight = 0
        self.most_sends_in_flight = 0
        self.eof_at: int | None = None
        self.closed = False
        self.send = _Method(self._send)
        self.send_eof = _Method(self._send_eof)
        self.close = _Method(self._close)

    async def _pause(self) -> None:
        await asyncio.sleep(self.rng.choice([0, 0, 0.0005, 0.002]))

    async def _send(self, stream_id: int, data: bytes) -> None:
        self.sends += 1
        if self.fail_at is not None and self.sends >= self.fail_at:
            raise RayError("the actor died")
        self.sends_in_flight += 1
        self.most_sends_in_flight = max(self.most_sends_in_flight, self.sends_in_flight)
        try:
            await self._pause()
            self.received += data
        finally:
            self.sends_in_flight -= 1

    async def _send_eof(self, stream_id: int) -> None:
        await self._pause()
        self.eof_at = len(self.received)

    async def _close(self, stream_id: int) -> None:
        self.closed = True


pieces = st.lists(st.integers(1, 3 * ray_node.RELAY_CHUNK), min_size=1, max_size=12)


async def _write(sizes: list[int], seed: int, fail_at: int | None) -> None:
    actor = FakeActor(seed, fail_at)
    stream = ray_node._ActorStream(actor, 1, "node-1")
    expected = bytearray()
    with anyio.fail_after(HANG_S):
        try:
            for index, size in enumerate(sizes):
                piece = bytes([index % 256]) * size
                await stream.send(piece)
                expected += piece
            await stream.send_eof()
        except anyio.BrokenResourceError:
            assert fail_at is not None
            # What reached the actor is a prefix of what was written, and nothing after it.
            assert expected.startswith(actor.received)
            assert actor.eof_at is None
        else:
            assert actor.received == expected
            assert actor.eof_at == len(expected)
        finally:
            await stream.aclose()
    # One call at a time keeps the bytes in order (Ray reorders an async actor's calls);
    # queued pieces go together.
    assert actor.most_sends_in_flight <= 1
    assert actor.sends <= len(sizes)
    assert actor.closed


@SETTINGS
@given(sizes=pieces, seed=st.integers(0, 2**16))
def test_writes_arrive_whole_in_order_then_the_end(sizes, seed):
    anyio.run(_write, sizes, seed, None, backend="asyncio")


@SETTINGS
@given(sizes=pieces, seed=st.integers(0, 2**16), fail_at=st.integers(1, 6))
def test_a_failed_call_breaks_the_stream_and_hangs_nobody(sizes, seed, fail_at):
    anyio.run(_write, sizes, seed, fail_at, backend="asyncio")


def test_queued_writes_wait_for_room():
    """A sender is held once SEND_WINDOW bytes are queued, until the actor takes them."""

    async def main() -> None:
        taken = asyncio.Event()
        actor = FakeActor(0)

        async def slow_send(stream_id: int, data: bytes) -> None:
            await taken.wait()
            actor.received += data

        actor.send = _Method(slow_send)
        stream = ray_node._ActorStream(actor, 1, "node-1")
        await stream.send(b"a")  # the flusher takes it and blocks in the call
        await asyncio.sleep(0)
        await stream.send(b"b" * ray_node.SEND_WINDOW)  # queued while the call is in flight
        third = asyncio.ensure_future(stream.send(b"c"))
        await asyncio.sleep(0.05)
        assert not third.done()
        taken.set()
        with anyio.fail_after(HANG_S):
            await third
            await stream.send_eof()
        assert actor.received == b"a" + b"b" * ray_node.SEND_WINDOW + b"c"
        await stream.aclose()

    anyio.run(main, backend="asyncio")


def test_a_cancelled_wait_leaves_the_call_to_finish():
    """Ray Client sets a call's future when the answer comes, even one cancelled meanwhile (and
    logs a traceback for it): a caller that stops waiting must not cancel it."""

    async def main() -> None:
        answered = concurrent.futures.Future()

        class Call:
            def future(self):
                return answered

        waiting = asyncio.ensure_future(ray_node._result(Call()))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not answered.cancelled()
        answered.set_result(b"late")  # what Ray does later; nobody is waiting, nothing breaks
        await asyncio.sleep(0.01)

    anyio.run(main, backend="asyncio")
