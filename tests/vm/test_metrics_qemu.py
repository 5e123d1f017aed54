"""Metrics of real VMs: fork siblings share their template's RAM, and their figures say so."""

from __future__ import annotations

import pytest

from machinen_async import boot

pytestmark = pytest.mark.anyio

SIBLINGS = 8


async def test_idle_siblings_hold_little_of_their_own() -> None:
    async with boot(name="metrics-source") as source:
        await source.exec(["sh", "-c", "head -c 32M /dev/urandom > /dev/shm/ballast"], check=True)  # touched RAM
        touched = (await source.metrics())["guest_private_bytes"]
        assert (await source.metrics())["shared_with"] is None  # its own RAM file: all private
        async with source.fork(n=SIBLINGS, name="metrics-sib") as siblings:
            measured = await siblings.map(lambda vm, i: vm.metrics())
    private = sum(m["guest_private_bytes"] for m in measured)
    assert len({m["shared_with"] for m in measured}) == 1 and measured[0]["shared_with"] is not None
    assert all(m["guest_shared_bytes"] > 0 and m["cpu_s"] > 0 and m["disk_bytes"] > 0 for m in measured)
    # The figure, not a timing: idle siblings copy a few pages each, not the source's memory.
    assert private < SIBLINGS * touched / 4, f"{private >> 20} MiB private vs {touched >> 20} MiB touched"
