"""Forks spread over several hosts: ``vm.fork(n=8, hosts=[Host.local(), hostb])``.

All siblings start from one instant: the source pauses once for a fork
template, as for a local fork; local siblings map it copy-on-write, and a
bundle written from the same template (the source running again) is pushed
to every remote host (only the chunks it lacks), whose siblings start from
it sharing its RAM copy-on-write in turn (``restore(bundle, names=...)``).

Placement over a list of hosts (``place``) is greedy and deterministic: each
sibling goes to the host with the fewest VMs per CPU among those whose free
memory can still hold one more (after one template copy of the guest RAM per
host); if none can, the fork is refused (FORK_MEMORY_BACKPRESSURE) rather than
overloading a host.  A ``HostPool`` (hosts/base.py; a Ray cluster: sdk/ray_pool.py) places
siblings itself and holds what it reserved for them until the ``Forks`` close.
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import anyio

from ..errors import BootError, MachinenError, plain_errors
from ..hosts.base import HostPool, Reservation
from ..hosts.local import FORK_MEMORY_HEADROOM, sibling_cost_mib
from ..protocol.messages import ForkRequest, HostFacts
from ..store import chunks
from .forks import Forks, close_all

if TYPE_CHECKING:
    from .host import Host
    from .mounts import Mount
    from .vm import VM


def place(count: int, facts: Sequence[HostFacts], memory_mib: int) -> list[int]:
    """The index of the host each of ``count`` siblings goes to."""
    # Each host holds one template copy of the guest RAM besides its siblings.
    budget = [f["mem_available_mib"] * FORK_MEMORY_HEADROOM - memory_mib for f in facts]
    running = [float(f["vms"]) for f in facts]
    placement: list[int] = []
    for _ in range(count):
        candidates = [i for i, f in enumerate(facts) if budget[i] >= sibling_cost_mib(f["accel"], memory_mib)]
        if not candidates:
            raise MachinenError(
                f"no host has memory for sibling {len(placement) + 1} of {count}",
                code="FORK_MEMORY_BACKPRESSURE",
                retryable=True,
            )
        chosen = min(candidates, key=lambda i: (running[i] / max(facts[i]["cpus"], 1), i))
        placement.append(chosen)
        running[chosen] += 1
        budget[chosen] -= sibling_cost_mib(facts[chosen]["accel"], memory_mib)
    return placement


async def place_on(hosts: Sequence[Host], count: int, memory_mib: int) -> Reservation[Host]:
    """``place`` over what each host says of itself now."""
    facts: dict[int, HostFacts] = {}

    async def learn(index: int) -> None:
        facts[index] = await hosts[index].info()

    with plain_errors():
        async with anyio.create_task_group() as tg:
            for index in range(len(hosts)):
                tg.start_soon(learn, index)
    return Reservation([hosts[i] for i in place(count, [facts[i] for i in range(len(hosts))], memory_mib)])


async def fork_across(
    source: VM, request: ForkRequest, hosts: Sequence[Host] | HostPool[Host], mounts: Sequence[str | Mount] | None
) -> Forks:
    """``mounts`` as the user gave them (for each remote host to check there); ``request.mounts`` as
    checked here."""
    memory_mib = source.info["memory_mib"]
    if isinstance(hosts, Sequence):
        reservation = await place_on(hosts, len(request.names), memory_mib)
    else:
        reservation = await hosts.reserve(len(request.names), memory_mib, source.info["accel"])
    try:
        return await _start_across(source, request, reservation.hosts, mounts, reservation.release)
    except BaseException:
        if reservation.release is not None:
            with anyio.CancelScope(shield=True):
                await reservation.release()
        raise


async def _start_across(
    source: VM,
    request: ForkRequest,
    placement: list[Host],
    mounts: Sequence[str | Mount] | None,
    release: Callable[[], Awaitable[None]] | None,
) -> Forks:
    names = list(request.names)
    # Siblings on the source's host map its fork template; the others start from a bundle of it.
    here = [name for name, host in zip(names, placement, strict=True) if host == source.host]
    elsewhere: dict[Host, list[str]] = {}
    for name, host in zip(names, placement, strict=True):
        if host != source.host:
            elsewhere.setdefault(host, []).append(name)
    unbound = [guest for _, guest, _ in source.info["mounts"] if guest not in {mount.guest for mount in request.mounts}]
    if elsewhere and unbound:  # the source's directory is a path of its own host
        raise BootError(
            f"siblings on other hosts cannot serve the live mount at {unbound[0]} from this host's directory: "
            f"pass mounts=[Mount(DIR, {unbound[0]!r}, live=True)] (DIR an absolute path on every host) "
            f"or Mount.drop({unbound[0]!r})",
            code="MOUNT_SOURCE_NOT_FOUND",
        )

    started: dict[str, VM] = {}
    workdir = chunks.work_path(f"fork-{source.name}")
    try:
        forks_here = await source.host.fork_here(
            source, replace(request, names=tuple(here)), bundle_dir=workdir if elsewhere else None
        )
        started.update(zip(here, forks_here, strict=True))

        async def start_there(host: Host, host_names: list[str]) -> None:
            pushed = await host.push(workdir)
            try:
                siblings = await host.restore(
                    pushed.remote_bundle,
                    names=host_names,
                    detached=request.detached,
                    boot_timeout=request.boot_timeout,
                    mounts=mounts,
                    ttl=request.ttl,
                    idle_timeout=request.idle_timeout,
                    network=request.network_policy or source.network,  # a restore's own default is closed
                    on_idle=request.on_idle,
                )
                started.update(zip(host_names, siblings, strict=True))
            finally:
                with anyio.CancelScope(shield=True):
                    await host.remove_bundle(pushed.remote_bundle)

        with plain_errors():
            async with anyio.create_task_group() as tg:
                for host, host_names in elsewhere.items():
                    tg.start_soon(start_there, host, host_names)
    except BaseException:
        await close_all(list(started.values()))
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(shutil.rmtree, workdir, True)
    return Forks(
        [started[name] for name in names],
        forks_here._template,
        placement={name: host.name for name, host in zip(names, placement, strict=True)},
        release=release,
    )
