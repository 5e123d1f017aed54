"""Siblings of one fork event: ``Forks``; and ``Launch``, what starting VMs returns (awaitable, or ``async with``)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, overload

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from ..errors import ForkError, plain_errors
from ..protocol.messages import ForkTemplate

if TYPE_CHECKING:
    from .vm import VM

T = TypeVar("T")


class Forks(Sequence["VM"]):
    """Siblings of one fork event, in order; ``async with`` closes them all."""

    def __init__(
        self,
        vms: list[VM],
        template: ForkTemplate | None = None,
        placement: dict[str, str] | None = None,
        release: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``template``: the fork instant, with the source's pause (siblings restored from a bundle have none);
        ``release``: called once the siblings are closed (a host pool's reservation for them)."""
        self._vms = vms
        self._release = release
        self._template = template  # spread.py builds the Forks of a spread fork from the local one
        self.source_pause_ms: float = template.pause_ms if template else 0.0
        self.source_pause_steps_ms: dict[str, float] = template.pause_steps_ms if template else {}
        self.placement: dict[str, str] = placement or {}  # sibling -> host, with hosts=

    @overload
    def __getitem__(self, index: int) -> VM: ...

    @overload
    def __getitem__(self, index: slice) -> list[VM]: ...

    def __getitem__(self, index: int | slice) -> VM | list[VM]:
        return self._vms[index]

    def __len__(self) -> int:
        return len(self._vms)

    @overload
    async def map(
        self,
        fn: Callable[[VM, int], Awaitable[T]],
        *,
        return_exceptions: Literal[False] = False,
        timeout: float | None = None,
    ) -> list[T]: ...

    @overload
    async def map(
        self,
        fn: Callable[[VM, int], Awaitable[T]],
        *,
        return_exceptions: Literal[True],
        timeout: float | None = None,
    ) -> list[T | Exception]: ...

    async def map(
        self,
        fn: Callable[[VM, int], Awaitable[T]],
        *,
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> list[T] | list[T | Exception]:
        """Run ``fn(sibling, index)`` for every sibling concurrently; results in order.

        The first failure cancels the others and is raised, unless
        ``return_exceptions`` is set: then each failure is returned in its slot.
        ``timeout``: seconds each sibling's call may take (FORK_CALL_TIMEOUT after that).
        """
        results: list[Any] = [None] * len(self._vms)
        with plain_errors():
            async for index, outcome in self._outcomes(fn, timeout, stop_at_failure=not return_exceptions):
                results[index] = outcome
        return results

    @overload
    def as_completed(
        self,
        fn: Callable[[VM, int], Awaitable[T]],
        *,
        return_exceptions: Literal[False] = False,
        timeout: float | None = None,
    ) -> AsyncGenerator[tuple[int, T], None]: ...

    @overload
    def as_completed(
        self,
        fn: Callable[[VM, int], Awaitable[T]],
        *,
        return_exceptions: Literal[True],
        timeout: float | None = None,
    ) -> AsyncGenerator[tuple[int, T | Exception], None]: ...

    def as_completed(
        self,
        fn: Callable[[VM, int], Awaitable[T]],
        *,
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> AsyncGenerator[tuple[int, T], None] | AsyncGenerator[tuple[int, T | Exception], None]:
        """``async for index, result in forks.as_completed(fn)``: ``fn(sibling, index)`` on every
        sibling at once, each result as soon as it is there (finishing order).

        A failure cancels the calls still running and is raised, unless ``return_exceptions``:
        then it comes in its turn.  Leaving the loop early leaves the other calls running until
        the iterator is closed: wrap it in ``contextlib.aclosing`` (or use ``first``) for that."""
        return self._outcomes(fn, timeout, stop_at_failure=not return_exceptions)

    async def first(
        self,
        fn: Callable[[VM, int], Awaitable[T]],
        *,
        accept: Callable[[T], bool] = lambda result: True,
        timeout: float | None = None,
        stop_losers: bool = False,
    ) -> tuple[int, T]:
        """The first result ``accept`` takes, and its sibling's index; the other calls are cancelled
        then (a call that fails, or is not accepted, only drops out of the race).  ``stop_losers``:
        the other siblings are stopped too, so only the winner keeps running.  FORK_NONE_ACCEPTED
        when no call gives an accepted result."""
        failures: list[str] = []
        async with aclosing(self._outcomes(fn, timeout, stop_at_failure=False)) as outcomes:  # closed: losers cancelled
            async for index, outcome in outcomes:
                if isinstance(outcome, Exception):
                    failures.append(f"sibling {index}: {outcome}")
                elif accept(outcome):
                    winner = (index, outcome)
                    break
            else:
                raise ForkError(
                    f"none of {len(self._vms)} siblings gave an accepted result ({'; '.join(failures) or 'all rejected'})",
                    code="FORK_NONE_ACCEPTED",
                )
        if stop_losers:
            async with anyio.create_task_group() as tg:
                for index, vm in enumerate(self._vms):
                    if index != winner[0]:
                        tg.start_soon(vm.stop)
        return winner

    async def _outcomes(
        self, fn: Callable[[VM, int], Awaitable[T]], timeout: float | None, *, stop_at_failure: bool
    ) -> AsyncGenerator[tuple[int, T | Exception], None]:
        """Each sibling's result or failure as it comes.  The calls never raise into the task group
        (their failures travel with the results), so nothing cancels the caller's code between
        two results; closing this generator cancels the calls still running."""
        send, receive = anyio.create_memory_object_stream[tuple[int, T | Exception]](len(self._vms))

        async def run(index: int, vm: VM, send: MemoryObjectSendStream[tuple[int, T | Exception]]) -> None:
            with send:
                try:
                    if timeout is None:
                        outcome: T | Exception = await fn(vm, index)
                    else:
                        with anyio.fail_after(timeout):
                            outcome = await fn(vm, index)
                except TimeoutError:
                    outcome = ForkError(f"sibling {index}'s call took over {timeout} s", code="FORK_CALL_TIMEOUT")
                except Exception as exc:  # noqa: BLE001  # the caller's fn: its failure is its outcome
                    outcome = exc
                send.send_nowait((index, outcome))  # room for every sibling's: never blocks

        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            with send, receive:
                for index, vm in enumerate(self._vms):
                    tg.start_soon(run, index, vm, send.clone())
                send.close()
                try:
                    async for index, outcome in receive:
                        if stop_at_failure and isinstance(outcome, Exception):
                            failure = outcome
                            break
                        try:
                            yield index, outcome
                        except GeneratorExit:  # closed early: the calls still running are cancelled
                            break
                finally:
                    tg.cancel_scope.cancel()
        if failure is not None:
            raise failure  # once the others are cancelled, as it was raised (not in a group)

    async def aclose(self) -> None:
        await close_all(self._vms)
        release, self._release = self._release, None
        if release is not None:
            with anyio.CancelScope(shield=True):
                await release()


async def close_all(vms: Sequence[VM | None]) -> None:
    with anyio.CancelScope(shield=True):
        async with anyio.create_task_group() as tg:
            for vm in vms:
                if vm is not None:
                    tg.start_soon(vm.aclose)


class Closable(Protocol):
    async def aclose(self) -> None: ...


Started = TypeVar("Started", bound=Closable)


class Launch(Generic[Started]):
    """What ``boot()``, ``restore()`` and ``vm.fork()`` return: ``async with boot(...) as vm`` (closed on
    exit: the VMs it started stop) or ``vm = await boot(...)`` (then ``await vm.aclose()``).  What it
    starts is a ``VM``, or ``Forks`` (``restore(..., n=4)``, ``vm.fork(n=4)``)."""

    def __init__(self, start: Callable[[], Awaitable[Started]]) -> None:
        self._start = start
        self._started: Started | None = None

    def __await__(self) -> Generator[object, None, Started]:
        return self._start().__await__()

    async def __aenter__(self) -> Started:
        self._started = await self._start()
        return self._started

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._started is not None
        await self._started.aclose()
