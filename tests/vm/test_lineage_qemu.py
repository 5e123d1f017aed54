"""Fork trees in real VMs: every fork and restore records its ancestors and the instants it came
from; a bundle keeps them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from machinen_async import boot, restore
from machinen_async.cli import tree_lines
from machinen_async.store import registry

pytestmark = pytest.mark.anyio


async def test_a_fork_of_a_fork_and_its_restores_know_their_ancestors(tmp_path: Path) -> None:
    bundle_dir = tmp_path / "grandchild.snap"
    async with boot(name="lin-root") as root:
        assert root.lineage == ()
        async with root.fork(name="lin-child") as child, child.fork(name="lin-grand") as grand:
            assert [ancestor["name"] for ancestor in child.lineage] == ["lin-root"]
            assert [ancestor["name"] for ancestor in grand.lineage] == ["lin-root", "lin-child"]
            forked_root, forked_child = (ancestor["taken_at"] for ancestor in grand.lineage)
            assert root.info["started_at"] < forked_root < forked_child <= time.time()
            assert grand.lineage[0] == child.lineage[0]  # one fork instant of the root
            assert (await grand.describe())["lineage"] == list(grand.lineage)
            assert (await grand.describe())["restored_from"] is None
            assert tree_lines([row for row in registry.list_rows() if row["name"].startswith("lin-")]) == [
                "lin-root  gen 0",
                "  └─ lin-child  gen 1",
                "    └─ lin-grand  gen 2",
            ]
            await grand.snapshot(bundle_dir)
            snapshot_taken = time.time()
    async with restore(bundle_dir, name="lin-again") as again:
        assert [ancestor["name"] for ancestor in again.lineage] == ["lin-root", "lin-child", "lin-grand"]
        assert forked_child < again.lineage[-1]["taken_at"] <= snapshot_taken
        assert again.info["restored_from"] == str(bundle_dir.resolve())
        assert again.info["start"] == "restore"
    async with restore(bundle_dir, names=["lin-s0", "lin-s1"]) as siblings:
        for sibling in siblings:
            assert sibling.lineage == again.lineage
            assert sibling.info["restored_from"] == str(bundle_dir.resolve())
