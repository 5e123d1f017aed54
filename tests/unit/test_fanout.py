"""``forks.map``/``as_completed``/``first``: the fan-out over siblings, against stand-in siblings
(no VM: the calls are the test's own), in every order and with cancellation at any point.
tests/vm/test_fork.py runs them on real siblings."""

from __future__ import annotations

from contextlib import aclosing

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from machinen_async import ForkError
from machinen_async.sdk.forks import Forks

BACKENDS = ["asyncio", "trio"]


class Sibling:
    """What the fan-out needs of a VM: something to hand ``fn``, and ``stop``."""

    def __init__(self) -> None:
        self.stopped = False

    async def stop(self) -> str:
        self.stopped = True
        return "stopped"


def forks_of(n: int) -> tuple[Forks, list[Sibling]]:
    siblings = [Sibling() for _ in range(n)]
    return Forks(siblings), siblings  # type: ignore[arg-type]  # stand-ins for VMs


class Gates:
    """Each call waits for its gate, then answers its index (or raises for the failing ones); what
    ran to the end and what was cancelled is recorded."""

    def __init__(self, n: int, failing: set[int] = frozenset()) -> None:
        self.gates = [anyio.Event() for _ in range(n)]
        self.failing = failing
        self.finished: set[int] = set()
        self.cancelled: set[int] = set()

    async def call(self, vm: object, index: int) -> int:
        try:
            await self.gates[index].wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled.add(index)
            raise
        self.finished.add(index)
        if index in self.failing:
            raise ValueError(f"call {index} failed")
        return index * 10


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(order=st.permutations(range(5)))
def test_as_completed_yields_in_finishing_order(backend: str, order: list[int]):
    async def main() -> None:
        forks, _ = forks_of(5)
        gates = Gates(5)
        gates.gates[order[0]].set()
        seen = []
        async for index, result in forks.as_completed(gates.call):
            assert result == index * 10
            seen.append(index)
            if len(seen) < 5:
                gates.gates[order[len(seen)]].set()
        assert seen == list(order)

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failure_is_raised_and_cancels_the_rest_unless_returned(backend: str):
    async def main() -> None:
        forks, _ = forks_of(3)
        gates = Gates(3, failing={1})
        gates.gates[1].set()
        with pytest.raises(ValueError, match="call 1 failed"):
            async for _ in forks.as_completed(gates.call):
                pytest.fail("nothing finished before the failure")
        assert gates.cancelled == {0, 2}

        gates = Gates(3, failing={1})
        for gate in gates.gates:
            gate.set()
        results = await forks.map(gates.call, return_exceptions=True)
        assert results[0] == 0 and results[2] == 20 and isinstance(results[1], ValueError)

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(winner=st.integers(0, 3), rejected=st.sets(st.integers(0, 3)), failing=st.sets(st.integers(0, 3)))
def test_first_returns_the_first_accepted_and_cancels_the_losers(
    backend: str, winner: int, rejected: set[int], failing: set[int]
):
    """Calls finish one by one in index order from ``winner`` on, wrapping around; a failing or
    rejected call drops out; the first accepted one wins and the rest are cancelled."""

    async def main() -> None:
        forks, siblings = forks_of(4)
        gates = Gates(4, failing=failing)
        order = [(winner + k) % 4 for k in range(4)]

        async def release_in_order() -> None:
            for index in order:
                gates.gates[index].set()
                await anyio.sleep(0.01)  # the previous call's outcome is taken first

        accepted = [i for i in order if i not in rejected and i not in failing]
        async with anyio.create_task_group() as tg:
            tg.start_soon(release_in_order)
            if accepted:
                index, result = await forks.first(
                    gates.call, accept=lambda r: r // 10 not in rejected, stop_losers=True
                )
                assert (index, result) == (accepted[0], accepted[0] * 10)
                running = set(order[order.index(index) + 1 :])
                assert gates.cancelled == running - gates.finished
                assert [s.stopped for s in siblings] == [i != index for i in range(4)]
            else:
                with pytest.raises(ForkError) as refused:
                    await forks.first(gates.call, accept=lambda r: r // 10 not in rejected)
                assert refused.value.code == "FORK_NONE_ACCEPTED"
            tg.cancel_scope.cancel()

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_call_over_its_timeout_is_a_fork_error(backend: str):
    async def main() -> None:
        forks, _ = forks_of(2)
        gates = Gates(2)
        gates.gates[0].set()
        results = await forks.map(gates.call, return_exceptions=True, timeout=0.05)
        assert results[0] == 0
        assert isinstance(results[1], ForkError) and results[1].code == "FORK_CALL_TIMEOUT"
        with pytest.raises(ForkError, match="took over"):
            await forks.map(gates.call, timeout=0.05)

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(taken=st.integers(1, 4), how=st.sampled_from(["break", "cancel"]))
def test_leaving_early_cancels_every_call_still_running(backend: str, taken: int, how: str):
    """Breaking out of ``aclosing(as_completed)`` or cancelling the caller at any point: every call
    has ended (finished or cancelled) once the caller is past the loop, and nothing leaks out."""

    async def main() -> None:
        forks, _ = forks_of(5)
        gates = Gates(5)
        for index in range(taken):
            gates.gates[index].set()
        with anyio.CancelScope() as scope:
            async with aclosing(forks.as_completed(gates.call)) as results:
                count = 0
                async for _ in results:
                    count += 1
                    if count == taken:
                        if how == "break":
                            break
                        scope.cancel()
                        await anyio.lowlevel.checkpoint()  # the cancellation arrives here, in the caller
        assert gates.finished | gates.cancelled == set(range(5))
        assert gates.cancelled == set(range(taken, 5))

    anyio.run(main, backend=backend)
