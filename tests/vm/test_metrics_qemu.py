"""Metrics of real VMs: fork siblings share their template's RAM, and their figures say so."""

from __future__ import annotations

import pytest

from machinen_async import boot

pytestmark = pytest.mark.anyio

SIBLINGS = 8


async def test_idle_siblings_hold_little_of_their_own() -> None:
    async with boot(name="metrics-source") as source:
        await source.exec(["sh", "-c", "head -c 32M /dev/urandom > /tmp/ballast"], check=True)  # touched RAM
        own = await source.metrics()
        touched = own["guest_private_bytes"] + own["guest_shared_bytes"]  # (a warm start shares its boot template's)
        assert touched >= 32 << 20
        async with source.fork(n=SIBLINGS, name="metrics-sib") as siblings:
            measured = await siblings.map(lambda vm, i: vm.metrics())
    private = sum(m["guest_private_bytes"] for m in measured)
    assert len({m["shared_with"] for m in measured}) == 1  # one fork template ...
    assert measured[0]["shared_with"] not in (None, own["shared_with"])  # ... of this fork's instant
    assert all(m["guest_shared_bytes"] > 0 and m["cpu_s"] > 0 and m["disk_bytes"] > 0 for m in measured)
    # The figure, not a timing: idle siblings copy a few pages each, not the source's memory.
    assert private < SIBLINGS * touched / 4, f"{private >> 20} MiB private vs {touched >> 20} MiB touched"
