"""Siblings of one fork event: ``Forks``; and ``Launch``, what starting VMs returns (awaitable, or ``async with``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, overload

import anyio

from ..errors import plain_errors
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
        self, fn: Callable[[VM, int], Awaitable[T]], *, return_exceptions: Literal[False] = False
    ) -> list[T]: ...

    @overload
    async def map(
        self, fn: Callable[[VM, int], Awaitable[T]], *, return_exceptions: Literal[True]
    ) -> list[T | Exception]: ...

    async def map(
        self, fn: Callable[[VM, int], Awaitable[T]], *, return_exceptions: bool = False
    ) -> list[T] | list[T | Exception]:
        """Run ``fn(sibling, index)`` for every sibling concurrently; results in order.

        The first failure cancels the others and is raised, unless
        ``return_exceptions`` is set: then each failure is returned in its slot.
        """
        results: list[Any] = [None] * len(self._vms)  # each slot set before it is returned

        async def run(index: int, vm: VM) -> None:
            try:
                results[index] = await fn(vm, index)
            except Exception as exc:
                if not return_exceptions:
                    raise
                results[index] = exc

        with plain_errors():
            async with anyio.create_task_group() as tg:
                for index, vm in enumerate(self._vms):
                    tg.start_soon(run, index, vm)
        return results

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
