"""``vm.metrics`` read from /proc (of this very process, mapping a file as a VMM maps guest RAM),
through a supervisor of the fake VMM, ``machinen ls --json``'s and ``machinen top``'s.  Siblings sharing a real fork
template: tests/vm/test_metrics_qemu.py."""

from __future__ import annotations

import json
import mmap
import os
import sys
from pathlib import Path

import anyio
import pytest

from machinen_async import boot
from machinen_async.cli import _metrics_of, top_lines
from machinen_async.protocol.messages import VMMetrics, VMRow
from machinen_async.supervisor.metrics import vm_metrics

PAGE = mmap.PAGESIZE
PAGES = 256


def test_a_private_mapping_splits_into_copied_and_shared_pages(tmp_path: Path) -> None:
    ram = tmp_path / "mem"
    ram.write_bytes(b"\1" * PAGE * PAGES)  # in the page cache: what a template's RAM file is
    layer = tmp_path / "disk.qcow2"
    with open(layer, "wb") as f:
        f.truncate(1 << 30)  # sparse: nothing allocated ...
        f.write(b"x" * 8192)  # ... but what is written
    with open(ram, "r+b") as f, mmap.mmap(f.fileno(), PAGE * PAGES, flags=mmap.MAP_PRIVATE) as mapped:
        assert sum(mapped[page * PAGE] for page in range(PAGES)) == PAGES  # every page read: resident
        for page in range(PAGES // 4):
            mapped[page * PAGE] = 2  # a quarter copied on write
        as_sibling = vm_metrics(os.getpid(), ram, False, layer)
        as_owner = vm_metrics(os.getpid(), ram, True, layer)
    assert as_sibling["guest_private_bytes"] == PAGES // 4 * PAGE
    assert as_sibling["guest_shared_bytes"] == PAGES * 3 // 4 * PAGE
    assert as_sibling["shared_with"] == str(ram) and as_owner["shared_with"] is None
    assert as_owner["guest_private_bytes"] == PAGES * PAGE and as_owner["guest_shared_bytes"] == 0
    assert 8192 <= as_sibling["disk_bytes"] < 1 << 20
    assert as_sibling["cpu_s"] > 0
    assert (
        as_sibling["qemu_rss_bytes"] >= PAGES * PAGE
        and 0 < as_sibling["qemu_pss_bytes"] <= as_sibling["qemu_rss_bytes"]
    )


@pytest.mark.anyio
@pytest.mark.usefixtures("fake_vmm")
async def test_a_vm_answers_its_metrics(anyio_backend: str) -> None:
    async with boot(name=f"metrics-{anyio_backend}", warm=False) as vm:
        measured = await vm.metrics()
    assert set(measured) == set(VMMetrics.__annotations__)
    assert measured["cpu_s"] >= 0 and measured["qemu_rss_bytes"] > 0 and measured["shared_with"] is None


@pytest.mark.anyio
@pytest.mark.usefixtures("fake_vmm")
async def test_ls_json_rows_carry_metrics_asked_of_every_vm(anyio_backend: str) -> None:
    async with boot(name=f"ls-metrics-{anyio_backend}", warm=False) as vm:
        listed = await anyio.run_process([sys.executable, "-m", "machinen_async", "ls", "--json"])
        measured = await _metrics_of([{"name": vm.name}, {"name": "no-such-vm"}])
    (row,) = [row for row in json.loads(listed.stdout) if row["name"] == vm.name]
    assert set(row["metrics"]) == set(VMMetrics.__annotations__) and row["metrics"]["qemu_rss_bytes"] > 0
    assert measured["no-such-vm"] is None  # gone meanwhile: no metrics, and the others still come
    assert measured[vm.name] is not None and measured[vm.name]["qemu_rss_bytes"] > 0


def _measured(cpu_s: float, private_mib: int, shared_mib: int, template: str | None) -> VMMetrics:
    return {"cpu_s": cpu_s, "qemu_rss_bytes": 0, "qemu_pss_bytes": 0, "guest_private_bytes": private_mib << 20,
            "guest_shared_bytes": shared_mib << 20, "shared_with": template, "disk_bytes": 0}  # fmt: skip


def test_top_counts_a_templates_shared_pages_once() -> None:
    root: VMRow = {"name": "root", "lineage": [], "deadline": None}
    child: VMRow = {"name": "root-0", "lineage": [{"name": "root", "taken_at": 1.0}], "deadline": 160.0}
    sibling: VMRow = {"name": "root-1", "lineage": [{"name": "root", "taken_at": 1.0}], "deadline": None}
    before = {"root": (root, _measured(1.0, 200, 0, None)), "root-0": (child, _measured(0.5, 3, 100, "/t/mem"))}
    now = {
        "root": (root, _measured(2.0, 200, 0, None)),
        "root-0": (child, _measured(1.0, 3, 100, "/t/mem")),
        "root-1": (sibling, _measured(0.1, 5, 90, "/t/mem")),
    }
    header, *rows, total = top_lines(before, now, 2.0, clock=100.0)
    assert header.split() == ["NAME", "PARENT", "CPU%", "PRIVATE", "SHARED", "TTL"]
    assert [row.split() for row in rows] == [
        ["root", "-", "50", "200Mi", "0Mi", "-"],
        ["root-0", "root", "25", "3Mi", "100Mi", "60s"],
        ["root-1", "root", "-", "5Mi", "90Mi", "-"],  # new since the last measure: no CPU % yet
    ]
    assert total.split() == ["TOTAL", "208Mi", "100Mi"]
