"""Fork-tree lineage as data (no VM): what a bundle keeps of it, what crosses in a fork template,
and `machinen ls --tree`.  Forks and restores of real VMs recording it: tests/vm/test_lineage_qemu.py."""

from __future__ import annotations

import dataclasses
import math

import cbor2
import pytest
from test_manifest import _manifest, manifest_as_written_before

from machinen_async import boot
from machinen_async.cli import tree_lines
from machinen_async.errors import MachinenError, SnapshotError
from machinen_async.protocol.messages import MAX_LINEAGE, Ancestor, IncomingState, VMRow, descend
from machinen_async.store.manifest import Manifest

LINEAGE: tuple[Ancestor, ...] = ({"name": "root", "taken_at": 10.0}, {"name": "child", "taken_at": 20.5})


def test_a_manifest_keeps_the_lineage_and_a_restore_descends_from_its_vm() -> None:
    manifest = dataclasses.replace(_manifest(), lineage=LINEAGE)
    read = Manifest.from_cbor(manifest.to_cbor())
    assert read == manifest and read.lineage == LINEAGE
    assert read.restored_lineage == [*LINEAGE, {"name": "vm", "taken_at": 5.5}]  # source, created


def test_a_manifest_without_lineage_loads_and_writes_none() -> None:
    raw = cbor2.dumps(manifest_as_written_before(), canonical=True)
    manifest = Manifest.from_cbor(raw)
    assert manifest.lineage == ()
    assert manifest.restored_lineage == [{"name": "web-1", "taken_at": 1765000000.25}]
    assert "lineage" not in cbor2.loads(_manifest().to_cbor())  # no key for a VM that was booted


@pytest.mark.parametrize(
    "lineage",
    [
        "root",
        [{"name": "root"}],
        [{"name": "", "taken_at": 1.0}],
        [{"name": 3, "taken_at": 1.0}],
        [{"name": "root", "taken_at": "yesterday"}],
        [{"name": "root", "taken_at": math.inf}],
        [{"name": "root", "taken_at": 1.0, "extra": 1}],
        [{"name": "x" * 256, "taken_at": 1.0}],
        [{"name": "a", "taken_at": 1.0}] * (MAX_LINEAGE + 1),
    ],
)
def test_a_malformed_lineage_is_refused(lineage: object) -> None:
    with pytest.raises(SnapshotError) as corrupt:
        Manifest.from_cbor(cbor2.dumps({**manifest_as_written_before(), "lineage": lineage}))
    assert corrupt.value.code == "SNAPSHOT_CORRUPT"
    incoming = IncomingState(chain=[], disk_size=1, holds=[], ram_in_state=False).to_wire()
    with pytest.raises(MachinenError) as refused:
        IncomingState.from_wire({**incoming, "lineage": lineage})
    assert refused.value.code == "HOST_PROTOCOL"


def test_a_fork_template_carries_the_siblings_lineage() -> None:
    incoming = IncomingState(chain=[], disk_size=1, holds=[], ram_in_state=False,
                             lineage=descend(LINEAGE, "grandchild", 30), restored_from="/b")  # fmt: skip
    assert IncomingState.from_wire(incoming.to_wire()) == incoming
    assert incoming.lineage[-1] == {"name": "grandchild", "taken_at": 30.0}
    assert len(descend([{"name": "a", "taken_at": 1.0}] * MAX_LINEAGE, "b", 2)) == MAX_LINEAGE  # the oldest go


def _row(name: str, *parents: str, restored_from: str | None = None) -> VMRow:
    lineage: list[Ancestor] = [{"name": parent, "taken_at": float(i)} for i, parent in enumerate(parents)]
    return {"name": name, "lineage": lineage, "restored_from": restored_from}


def test_ls_tree_draws_children_under_their_parents() -> None:
    rows = [
        _row("root-1", "root"),
        _row("orphan", "gone"),  # its parent is not running: at the top
        _row("root"),
        _row("root-0-a", "root", "root-0"),
        _row("root-0", "root"),
        _row("other", restored_from="/bundles/b"),
        _row("moved", "moved"),  # a handoff's: its own ancestor
    ]
    assert tree_lines(rows) == [
        "moved  gen 1",
        "orphan  gen 1",
        "other  gen 0  restored from /bundles/b",
        "root  gen 0",
        "  └─ root-0  gen 1",
        "    └─ root-0-a  gen 2",
        "  └─ root-1  gen 1",
    ]


@pytest.mark.anyio
@pytest.mark.usefixtures("fake_vmm")
async def test_a_booted_vm_has_no_ancestors(anyio_backend: str) -> None:
    async with boot(name=f"lineage-boot-{anyio_backend}") as vm:  # warm where it can be
        assert vm.lineage == ()
        described = await vm.describe()
        assert described["lineage"] == [] and described["restored_from"] is None
