"""Lifetimes (``ttl=``, ``vm.extend``, ``idle_timeout=``, ``on_idle=``) through real supervisors on
the fake VMM: the supervisor stops a VM at its deadline on its own, whoever owns it.  That a
detached VM of a killed owner ends in a real VM is tests/vm/test_lifetimes_qemu.py."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from machinen_async import boot
from machinen_async.errors import MachinenError
from machinen_async.protocol.messages import BootRequest, ForkRequest, RestoreRequest, seconds_left
from machinen_async.sdk.handoff import MIN_TTL_S, ttl_until
from machinen_async.sdk.host import on_idle_argument
from machinen_async.store import registry

pytestmark = [pytest.mark.anyio]

GONE_WITHIN_S = 10.0  # the bound on waiting for a supervisor to notice its deadline and finish


async def _until_gone(name: str) -> None:
    with anyio.fail_after(GONE_WITHIN_S):
        while any(row["name"] == name for row in registry.list_rows()):
            await anyio.sleep(0.05)


@pytest.mark.usefixtures("fake_vmm")
async def test_ttl_stops_a_detached_vm_with_no_handle(anyio_backend: str) -> None:
    name = f"ttl-detached-{anyio_backend}"
    async with boot(name=name, warm=False, detached=True, ttl=1.5) as vm:
        deadline = vm.deadline
        assert deadline is not None and deadline > time.time() - 1.5
    (row,) = [row for row in registry.list_rows() if row["name"] == name]  # closing a detached handle leaves it
    assert row["deadline"] == deadline
    await _until_gone(name)


@pytest.mark.usefixtures("fake_vmm")
async def test_extend_pushes_the_deadline(anyio_backend: str) -> None:
    async with boot(name=f"ttl-extend-{anyio_backend}", warm=False, ttl=3) as vm:
        first = vm.deadline
        assert first is not None
        pushed = await vm.extend(60)
        assert pushed == pytest.approx(first + 60) and vm.deadline == pushed
        assert (await vm.describe())["deadline"] == pushed
        (row,) = [row for row in registry.list_rows() if row["name"] == vm.name]
        assert row["deadline"] == pushed  # meta.json rewritten
        await anyio.sleep(max(0.0, first - time.time()) + 0.5)  # past the first deadline: still there
        assert (await vm.ping())["pong"]


@pytest.mark.usefixtures("fake_vmm")
async def test_extend_sets_a_deadline_where_there_was_none(anyio_backend: str) -> None:
    name = f"ttl-none-{anyio_backend}"
    async with boot(name=name, warm=False, detached=True) as vm:
        assert vm.deadline is None
        before = time.time()
        deadline = await vm.extend(1)
        assert before + 1 <= deadline <= time.time() + 1
        with pytest.raises(MachinenError) as refused:
            await vm.extend(0)
        assert refused.value.code == "BOOT_TTL_INVALID"
        with pytest.raises(MachinenError) as raw:  # the supervisor checks what it gets, too
            await vm.connection.channel.call("vm.extend", {"seconds": "soon"})
        assert raw.value.code == "BOOT_TTL_INVALID"
    await _until_gone(name)


@pytest.mark.usefixtures("fake_vmm")
async def test_idle_timeout_waits_for_calls_in_progress_then_stops_the_vm(anyio_backend: str) -> None:
    name = f"idle-{anyio_backend}"
    async with boot(name=name, warm=False, detached=True, idle_timeout=1) as vm:
        assert vm.info["idle_timeout"] == 1
        ran = await vm.exec(["sh", "-c", "sleep 3; echo done"])  # 3 s with a call in progress: not idle
        assert ran.stdout == b"done\n"
        assert (await vm.ping())["pong"]
    await _until_gone(name)  # no call since: stopped


@pytest.mark.usefixtures("fake_vmm")
async def test_looking_at_an_idle_vm_does_not_keep_it_running(anyio_backend: str) -> None:
    """``vm.metrics`` and ``vm.info`` (what ``machinen ls --json`` and ``top`` ask) are no use of it."""
    name = f"idle-looked-at-{anyio_backend}"
    async with boot(name=name, warm=False, detached=True, idle_timeout=1) as vm:
        with anyio.fail_after(GONE_WITHIN_S), pytest.raises(MachinenError):  # its connection ends with it
            while True:
                await vm.metrics()
                await vm.connection.channel.call("vm.info")
                await anyio.sleep(0.1)
    await _until_gone(name)


@pytest.mark.usefixtures("fake_vmm")
async def test_an_idle_snapshot_that_fails_still_stops_the_vm(anyio_backend: str, tmp_path: Path) -> None:
    """The fake VMM cannot save device state, so the snapshot before the idle stop fails: logged,
    and the VM stops all the same (a real VM's bundle: tests/vm/test_lifetimes_qemu.py)."""
    name = f"idle-snapshot-{anyio_backend}"
    parked = tmp_path / "parked"
    async with boot(name=name, warm=False, detached=True, idle_timeout=1, on_idle=f"snapshot:{parked}") as vm:
        assert vm.info["on_idle"] == f"snapshot:{parked}"
    await _until_gone(name)
    assert not parked.exists()  # the partial bundle removed


@pytest.mark.parametrize(
    "on_idle", ["snapshot:", "snapshot:relative/dir", "stop:now", "snapshot /abs", "", "Snapshot:/abs", 1, ["stop"]]
)
def test_an_on_idle_that_is_no_action_is_refused(on_idle: object) -> None:
    makers: list[Callable[[], object]] = [
        lambda: BootRequest(name="a", idle_timeout=5, on_idle=on_idle),  # type: ignore[arg-type]
        lambda: ForkRequest(("a",), idle_timeout=5, on_idle=on_idle),  # type: ignore[arg-type]
        lambda: RestoreRequest("/b", ("a",), idle_timeout=5, on_idle=on_idle),  # type: ignore[arg-type]
    ]
    if on_idle != "snapshot:relative/dir":  # which boot() makes absolute, from this process's directory
        makers.append(lambda: boot(name="a", idle_timeout=5, on_idle=on_idle))  # type: ignore[arg-type]
    for make in makers:
        with pytest.raises(MachinenError) as refused:
            make()
        assert refused.value.code == "BOOT_ON_IDLE_INVALID"


def test_on_idle_needs_an_idle_timeout_and_a_single_vm() -> None:
    refused: list[Callable[[], object]] = [
        lambda: boot(name="a", on_idle="snapshot:/parked"),
        lambda: boot(name="a", on_idle="stop"),
        lambda: ForkRequest(("a", "b"), idle_timeout=5, on_idle="snapshot:/parked"),  # both would write /parked
        lambda: RestoreRequest("/b", ("a", "b"), siblings=True, idle_timeout=5, on_idle="snapshot:/parked"),
    ]
    for make in refused:
        with pytest.raises(MachinenError) as error:
            make()
        assert error.value.code == "BOOT_ON_IDLE_INVALID"
    assert ForkRequest(("a", "b"), idle_timeout=5, on_idle="stop").on_idle is None  # siblings may all just stop


def test_on_idle_crosses_checked_and_a_relative_directory_is_the_callers() -> None:
    assert BootRequest(name="a", idle_timeout=5, on_idle="stop").on_idle is None  # the default, spelled out
    for request in (
        BootRequest(name="a", idle_timeout=60, on_idle="snapshot:/parked/a"),
        ForkRequest(("a",), idle_timeout=6, on_idle="snapshot:/parked/a"),
        RestoreRequest("/b", ("a",), idle_timeout=8, on_idle="snapshot:/parked/a"),
    ):
        assert type(request).from_wire(request.to_wire()) == request
        assert request.to_wire()["on_idle"] == "snapshot:/parked/a"
    with pytest.raises(MachinenError) as refused:  # checked on arrival too
        BootRequest.from_wire({**BootRequest(name="a").to_wire(), "on_idle": "snapshot:/parked"})
    assert refused.value.code == "BOOT_ON_IDLE_INVALID"
    assert on_idle_argument("snapshot:parked", here=True) == f"snapshot:{Path.cwd().resolve() / 'parked'}"
    assert on_idle_argument("snapshot:parked", here=False) == "snapshot:parked"  # a path of another host: refused
    assert on_idle_argument("stop", here=True) == "stop"


@pytest.mark.parametrize("command", ["boot", "restore /parked"])  # fork connects to its source first
def test_the_cli_refuses_an_on_idle_before_it_starts_anything(command: str) -> None:
    for options in (["--idle-timeout", "5", "--on-idle", "park"], ["--on-idle", "stop"]):
        refused = subprocess.run(
            [sys.executable, "-m", "machinen_async", *command.split(), *options], capture_output=True, check=False
        )
        assert refused.returncode == 1 and b"error [BOOT_ON_IDLE_INVALID]" in refused.stderr, refused.stderr


@pytest.mark.parametrize("ttl", [0, -1, math.inf, math.nan, True, "600"])
def test_a_ttl_that_is_no_lifetime_is_refused(ttl: object) -> None:
    for make in (
        lambda: BootRequest(name="a", ttl=ttl),  # type: ignore[arg-type]
        lambda: ForkRequest(("a",), ttl=ttl),  # type: ignore[arg-type]
        lambda: RestoreRequest("/b", ("a",), ttl=ttl),  # type: ignore[arg-type]
    ):
        with pytest.raises(MachinenError) as refused:
            make()
        assert refused.value.code == "BOOT_TTL_INVALID"
    for options in ({"ttl": ttl}, {"idle_timeout": ttl}):
        with pytest.raises(MachinenError) as refused:
            boot(name="a", **options)  # type: ignore[arg-type]
        assert refused.value.code == "BOOT_TTL_INVALID"


def test_ttl_crosses_in_every_request() -> None:
    for request in (
        BootRequest(name="a", ttl=600, idle_timeout=60),
        ForkRequest(("a",), ttl=5, idle_timeout=6),
        RestoreRequest("/b", ("a",), ttl=7, idle_timeout=8),
    ):
        assert type(request).from_wire(request.to_wire()) == request
        assert request.to_wire()["ttl"] == request.ttl and request.to_wire()["idle_timeout"] == request.idle_timeout
        assert type(request.ttl) is float and type(request.idle_timeout) is float
    assert BootRequest(name="a").ttl is None


def test_ls_shows_time_left(capsys: pytest.CaptureFixture[str]) -> None:
    from machinen_async.cli import _print_rows

    _print_rows([{"name": "a", "deadline": time.time() + 100.4}, {"name": "b", "deadline": None}], as_json=False)
    header, a, b = capsys.readouterr().out.splitlines()
    assert "TTL" in header.split()
    assert a.split()[3] in ("100s", "99s") and b.split()[3] == "-"


def test_seconds_left_and_the_ttl_a_handoff_carries() -> None:
    assert seconds_left(1000.0, 400.0) == 600.0 and seconds_left(1000, 1400.0) == 0.0
    for odd in (None, True, "1000", [1000]):  # no deadline, or a peer's odd value
        assert seconds_left(odd, 400.0) is None
    assert ttl_until(1000.0, 400.0) == 600.0 and ttl_until(None, 400.0) is None
    assert ttl_until(1000.0, 1400.0) == MIN_TTL_S  # past: the moved VM ends at once, as the source would have
    assert BootRequest(name="a", ttl=ttl_until(1000.0, 1400.0)).ttl == MIN_TTL_S  # a lifetime a request takes
