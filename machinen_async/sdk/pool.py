"""``warm_pool()``: VMs resumed ahead of time, so handing one over costs nothing but the hand-over.

``size`` fillers each keep one VM resumed (``boot()``, warm: from the image's boot template) and
idle until a caller takes it with ``acquire()``, then resume the next.  Each VM is a fresh one with
its own identity (hostname, machine-id, entropy, clock: taken on when it was resumed); a VM given
back with ``aclose()`` is destroyed, never reused.  A filler waits while the host lacks the memory
for one more VM (the fork back-pressure rule), so the pool never pushes the host into the OOM
killer.  Leaving the pool stops every VM it started, handed over or not: it owns them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Unpack

import anyio
import anyio.abc

from ..errors import MachinenError
from ..hosts.local import check_fork_memory
from ..vmm import backend
from .boot import boot
from .host import PoolBootOptions
from .vm import VM

BACKPRESSURE_WAIT_S = 1.0
RETRY_AFTER_FAILURE_S = (0.5, 30.0)  # first and longest wait before a failed boot is tried again


class WarmPool:
    """Idle VMs to ``acquire()``; made by ``warm_pool()``."""

    def __init__(self, start: Callable[[], Awaitable[VM]], memory_mib: int) -> None:
        self._start = start
        self._memory_mib = memory_mib
        self._handover_send, self._handover = anyio.create_memory_object_stream[VM | MachinenError](0)
        self._started: list[VM] = []

    async def acquire(self) -> VM:
        """A resumed, idle VM of the pool's image and options, now the caller's (``await
        vm.aclose()`` destroys it); waits while none is ready.  A boot that failed raises its
        error here (the pool keeps trying)."""
        try:
            handed = await self._handover.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise MachinenError("the warm pool is closed", code="POOL_CLOSED") from None
        if isinstance(handed, MachinenError):
            raise handed
        return handed

    async def _fill(self) -> None:
        """Keep one VM ready to hand over, again and again."""
        failures = 0
        while True:
            if not self._memory_for_one_more():
                await anyio.sleep(BACKPRESSURE_WAIT_S)
                continue
            try:
                vm = await self._start()
            except MachinenError as error:
                failures += 1
                await self._handover_send.send(error)
                first, longest = RETRY_AFTER_FAILURE_S
                await anyio.sleep(min(longest, first * 2 ** (failures - 1)))
                continue
            failures = 0
            self._started.append(vm)
            await self._handover_send.send(vm)

    def _memory_for_one_more(self) -> bool:
        try:
            check_fork_memory(1, backend.default().choose_accelerator(None), self._memory_mib)
        except MachinenError:
            return False
        return True

    async def _close_all(self) -> None:
        self._handover_send.close()
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for vm in self._started:
                    tg.start_soon(vm.aclose)


@asynccontextmanager
async def warm_pool(
    image: str | os.PathLike[str] | None = None,
    *,
    size: int = 4,
    memory_mib: int = 256,
    **boot_options: Unpack[PoolBootOptions],
) -> AsyncIterator[WarmPool]:
    """``async with warm_pool(image, size=4, **boot_options) as pool: vm = await pool.acquire()``.

    ``boot_options`` are ``boot()``'s (not ``name``: each VM gets its own; not ``host``: a pool
    fills on this machine); every VM of the pool is booted with them.  See the module docstring."""
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 256:
        raise MachinenError(f"size must be an integer in 1..256, not {size!r:.40}", code="POOL_SIZE_INVALID")
    if boot_options.keys() & {"name", "warm", "host"}:
        raise MachinenError(
            "a pool names its VMs, boots them warm, and on this machine (its memory is what it budgets)",
            code="POOL_OPTION_INVALID",
        )
    pool = WarmPool(lambda: boot(image, memory_mib=memory_mib, **boot_options), memory_mib)
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(size):
                tg.start_soon(pool._fill)
            try:
                yield pool
            finally:
                tg.cancel_scope.cancel()
    finally:
        await pool._close_all()
