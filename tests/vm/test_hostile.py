"""Attacks from a hostile guest agent and from hostile bundles (issue 11).

Guest (items 2 and 3): malformed frames, credit overruns, allocation bombs.

The guest runs untrusted code and may replace the agent, so every frame from
it is bounded and validated before it costs host memory, and a bad one fails
only its call, or the channel, with a typed error.  The attacker here is the
fake agent's ``raw`` method (fake_agent.py), in front of the SDK channel alone
and in front of a real supervisor relay (its agent side and client side, as
the supervisor process runs them, minus QEMU).

Bundles (items 1 and 7): a disk header naming host files, a rewritten or
unsigned manifest, files that do not match it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import anyio
import anyio.abc
import cbor2
import msgpack
import pytest
import structlog.testing
from conftest import machinen, qemu_processes
from fake_agent import fake_vm, relayed_vm
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from machinen_async import (
    VM,
    AgentUnavailableError,
    ExecError,
    MachinenError,
    NetworkPolicy,
    SnapshotError,
    TransferError,
    boot,
    restore,
)
from machinen_async.cli import terminal_safe
from machinen_async.hosts import transfer
from machinen_async.protocol import netpolicy, wire
from machinen_async.sdk.boot import stop_vm
from machinen_async.sdk.vm import AGENT_TIMEOUT_SLACK_S
from machinen_async.store import bundle as bundle_format
from machinen_async.store import chunks, qcow2, registry
from machinen_async.store.assets import sha256_file
from machinen_async.store.manifest import FileEntry, Manifest
from machinen_async.supervisor import relay
from machinen_async.vmm import capped_log
from machinen_async.vmm.qemu import netguard
from machinen_async.vmm.qemu.egress import Egress

HANG_S = 10.0
CHUNK_OF_X = b"x" * wire.CHUNK
MALFORMED = {
    "unhashable stream id": [wire.DATA, [1], wire.STDOUT, b"x"],
    "stream id not an int": [wire.RESULT, "SID?", {}],
    "fd out of range": [wire.DATA, "SID", 9, b"x"],
    "credit not an int": [wire.CREDIT, "SID", wire.STDIN, "lots"],
    "credit beyond a window": [wire.CREDIT, "SID", wire.STDIN, 2**40],
    "error code not a string": [wire.ERROR, "SID", {"code": 1}, "m"],
    "data not bytes": [wire.DATA, "SID", wire.STDOUT, "text"],
    "unknown kind": [99, "SID"],
    "too short": [wire.DATA, "SID"],
}
# Well-formed frames that an agent may not send on a call.
OUT_OF_PLACE = {
    "output on stdin": [wire.DATA, "SID", wire.STDIN, b"x"],
    "credit for stdout": [wire.CREDIT, "SID", wire.STDOUT, 5],
    "an OPEN": [wire.OPEN, "SID", "exec", {}],
}
OVERRUN = [[wire.DATA, "SID", wire.STDOUT, CHUNK_OF_X]] * (wire.INITIAL_WINDOW // wire.CHUNK + 1)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


async def _outcome(vm: VM, params: dict) -> BaseException | None:
    """Open a ``raw`` call and wait for its outcome, never reading its output."""
    call = await vm._channel.open("raw", params)
    try:
        with anyio.fail_after(HANG_S):
            await call.result()
        return None
    except MachinenError as exc:
        return exc
    finally:
        with anyio.CancelScope(shield=True):
            await call.cancel()


async def _exec_when_reconnected(vm: VM, tag: str, *, argv: list[str] | None = None, within: float = HANG_S):
    """``short TAG`` (or ``argv``), retried while the supervisor re-establishes the agent channel
    (a retryable error)."""
    with anyio.fail_after(within):
        while True:
            try:
                return await vm.exec(argv or ["short", tag])
            except AgentUnavailableError:
                await anyio.sleep(0.02)


# --- the SDK channel, facing a hostile peer directly --------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("attack", [*MALFORMED, *OUT_OF_PLACE, "output after EOF", "overrun", "map bomb", "junk"])
async def test_the_channel_fails_typed_on_a_hostile_frame(attack):
    frames = {**MALFORMED, **OUT_OF_PLACE, "overrun": OVERRUN}.get(attack)
    params = {"frames": [frames] if attack in MALFORMED or attack in OUT_OF_PLACE else frames or []}
    if attack == "output after EOF":
        params["frames"] = [[wire.EOF, "SID", wire.STDOUT], [wire.DATA, "SID", wire.STDOUT, b"x"]]
    params["map_bomb"] = attack == "map bomb"
    if attack == "junk":
        params["bytes"] = [b"\x00" * 100]
    rss_before = _rss_mib()
    async with fake_vm() as (vm, _agent):
        async with anyio.create_task_group() as tg:
            bystander: list[BaseException | None] = []

            async def other_call() -> None:  # waiting when the bad frame comes
                bystander.append(await _outcome(vm, {}))

            tg.start_soon(other_call)
            await anyio.sleep(0.05)
            failure = await _outcome(vm, params)
        assert isinstance(failure, ExecError) and failure.code == "EXEC_PROTOCOL", failure
        assert isinstance(bystander[0], ExecError) and bystander[0].code == "EXEC_PROTOCOL", bystander
        assert vm._channel._calls == {}
    assert _rss_mib() - rss_before < 64


def test_the_decoder_resyncs_iteratively_and_refuses_long_frames():
    decoder = wire.FrameDecoder(resync=True)
    bad_headers = (wire.MAGIC + b"\x00\x00\x00\x03" + b"\xc1\xc1\xc1") * 20_000  # each a frame that does not decode
    assert decoder.feed(bad_headers + wire.encode([wire.RESULT, 1, {}])) == [[wire.RESULT, 1, {}]]
    strict = wire.FrameDecoder(max_frame=1024)
    with pytest.raises(wire.ProtocolError):
        strict.feed(wire.HEADER.pack(wire.MAGIC, 1025))  # refused from its header: nothing is buffered for it


# --- the supervisor relay, facing a hostile agent --------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("attack", ["overrun", *OUT_OF_PLACE])
async def test_the_supervisor_fails_only_the_call_that_broke_the_protocol(attack, tmp_path):
    frames = OVERRUN if attack == "overrun" else [OUT_OF_PLACE[attack]]
    async with relayed_vm(tmp_path) as (vm, agents):
        async with anyio.create_task_group() as tg:
            tg.start_soon(vm.exec, ["long", "bystander", "3"])  # in flight through it all
            await anyio.sleep(0.05)
            failure = await _outcome(vm, {"frames": frames})
            assert isinstance(failure, ExecError) and failure.code == "EXEC_PROTOCOL", failure
            assert "broke the protocol" in failure.message
            agents[0].gate.set()  # the bystander finishes normally
        with anyio.fail_after(HANG_S):
            while agents[0].live:
                await anyio.sleep(0.01)
        assert agents[0].cancelled  # the supervisor cancelled the bad call in the guest
        assert len(agents) == 1  # no channel reset was needed
        assert (await vm.exec(["short", "after"])).stdout == b"after"


@pytest.mark.anyio
@pytest.mark.parametrize("attack", [*MALFORMED, "map bomb", "junk"])
async def test_the_supervisor_survives_a_malformed_frame(attack, tmp_path):
    params = {"frames": [MALFORMED[attack]]} if attack in MALFORMED else {}
    params["map_bomb"] = attack == "map bomb"
    if attack == "junk":
        params["bytes"] = [b"\x00" * 100]
    rss_before = _rss_mib()
    async with relayed_vm(tmp_path) as (vm, agents):
        failure = await _outcome(vm, params)
        # The agent channel cannot be trusted after it: reset, calls fail retryable, reconnected.
        assert isinstance(failure, AgentUnavailableError) and failure.retryable, failure
        assert (await _exec_when_reconnected(vm, "again")).stdout == b"again"
        assert len(agents) == 2
    assert _rss_mib() - rss_before < 64


# --- fuzz: random and mutated frames ----------------------------------------------------

frame_items = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=64) | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
valid_frames = st.sampled_from(
    [
        [wire.DATA, "SID", wire.STDOUT, b"data"],
        [wire.EOF, "SID", wire.STDERR],
        [wire.CREDIT, "SID", wire.STDIN, 100],
        [wire.RESULT, "SID", {"exit_code": 0}],
        [wire.ERROR, "SID", "EXEC_SPAWN_FAILED", "no"],
    ]
)
mutated_frames = st.tuples(valid_frames, st.integers(0, 3), frame_items).map(
    lambda t: [*t[0][: t[1]], t[2], *t[0][t[1] + 1 :]]
)
hostile_frames = st.lists(st.one_of(valid_frames, mutated_frames, st.lists(frame_items, max_size=6)), max_size=6)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# A junk that starts like a frame header would be a frame still arriving: a stalled peer, not a bad one.
junks = st.binary(max_size=64).filter(lambda junk: not junk.startswith(wire.MAGIC[:1]))


async def _fuzz_channel(frames: list, junk: bytes) -> None:
    async with fake_vm() as (vm, _agent):
        failure = await _outcome(vm, {"frames": frames, "bytes": [junk] if junk else [], "then_result": True})
        assert failure is None or isinstance(failure, ExecError), repr(failure)


async def _fuzz_relay(frames: list, junk: bytes, tmp_path: Path) -> None:
    async with relayed_vm(tmp_path) as (vm, _agents):
        failure = await _outcome(vm, {"frames": frames, "bytes": [junk] if junk else [], "then_result": True})
        assert failure is None or isinstance(failure, ExecError), repr(failure)
        assert (await _exec_when_reconnected(vm, "ok")).stdout == b"ok"  # the supervisor still serves


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@FUZZ
@given(frames=hostile_frames, junk=junks)
@example(frames=[[wire.ERROR, "SID", "0", "no"]], junk=b"")  # a code of none of our kinds
def test_fuzz_the_sdk_channel(backend, frames, junk):
    anyio.run(_fuzz_channel, _encodable(frames), junk, backend=backend)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@FUZZ
@given(frames=hostile_frames, junk=junks)
def test_fuzz_the_supervisor_relay(backend, frames, junk, tmp_path_factory):
    anyio.run(_fuzz_relay, _encodable(frames), junk, tmp_path_factory.mktemp("relay"), backend=backend)


def _encodable(frames: list) -> list:
    """Drop what msgpack cannot encode (ints beyond 64 bits), as a real agent could not send it either."""
    kept = []
    for frame in frames:
        try:
            msgpack.packb(frame, use_bin_type=True)
        except (OverflowError, ValueError, TypeError):
            continue
        kept.append(frame)
    return kept


@pytest.mark.anyio
async def test_the_supervisor_drops_output_after_eof(tmp_path):
    """What an older agent's detached pump could send late: dropped, the call goes on."""
    frames = [[wire.EOF, "SID", wire.STDOUT], [wire.DATA, "SID", wire.STDOUT, b"late"], [wire.EOF, "SID", wire.STDOUT]]
    async with relayed_vm(tmp_path) as (vm, agents):
        assert await _outcome(vm, {"frames": frames, "then_result": True}) is None
        assert len(agents) == 1 and (await vm.exec(["short", "after"])).stdout == b"after"


# --- hostile bundles (items 1 and 7) ----------------------------------------------------------------------
# A bundle is data from wherever it was copied from: its manifest can be rewritten by whoever wrote
# the files, and its disk header can name other host files for QEMU to open with our rights.


@pytest.fixture(scope="module")
def shared_bundle(shared_vm, tmp_path_factory) -> Path:
    """A real bundle of the shared VM; tests copy it before changing anything."""
    path = tmp_path_factory.mktemp("bundles") / "shared.snap"
    machinen("snapshot", shared_vm, str(path))
    return path


def _copy_bundle(source: Path, target: Path) -> Path:
    subprocess.run(["cp", "-r", "--sparse=always", str(source), str(target)], check=True)
    return target


def _reseal(bundle_dir: Path) -> None:
    """What an attacker holding a signed bundle cannot do, and what a user does with trust=True: a new
    manifest (and, here, a valid MAC) for files that were swapped."""
    bundle_format.seal(bundle_dir, Manifest.from_cbor((bundle_dir / bundle_format.MANIFEST).read_bytes()))


def _qcow2(path: Path, *options: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), "1M"], check=True)
    return path


def _poke(path: Path, offset: int, data: bytes) -> Path:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return path


def test_qcow2_headers_that_open_other_files_are_refused(tmp_path):
    secret = tmp_path / "secret"
    plain = _qcow2(tmp_path / "plain.qcow2")
    stolen = _qcow2(tmp_path / "stolen.qcow2", "-o", f"data_file={secret},data_file_raw=on")
    secret.write_bytes(b"host secret\n")  # a file that exists on the victim's host
    backed = _qcow2(tmp_path / "backed.qcow2", "-u", "-F", "raw", "-b", str(secret))
    # The attack is real: QEMU reads the file the header names as the guest's disk.
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(stolen), str(tmp_path / "leak")], check=True)
    assert (tmp_path / "leak").read_bytes().startswith(b"host secret")

    qcow2.check_image(plain)
    qcow2.check_image(backed)  # backing names are never used: chain_blockdev spells the chain out
    refused = {
        "uses an external data file": stolen,
        # The data-file name alone, with its feature bit cleared, still names a file.
        "names an external data file": _poke(
            _qcow2(tmp_path / "ext-only.qcow2", "-o", f"data_file={tmp_path / 'other'}"), 79, b"\0"
        ),
        "marked corrupt": _poke(_copy(plain, tmp_path / "corrupt.qcow2"), 79, b"\x02"),
        "incompatible features 0x80": _poke(_copy(plain, tmp_path / "future.qcow2"), 79, b"\x80"),
        "autoclear features 0x2": _poke(_copy(plain, tmp_path / "raw-data.qcow2"), 95, b"\x02"),
        "encrypted": _poke(_copy(plain, tmp_path / "encrypted.qcow2"), 35, b"\x01"),
        "qcow2 version 4": _poke(_copy(plain, tmp_path / "v4.qcow2"), 7, b"\x04"),
        "not a qcow2 image": secret,
        "unknown header extension 0x12345678": _poke(_copy(plain, tmp_path / "ext.qcow2"), 112, b"\x12\x34\x56\x78"),
        "run past the first cluster": _poke(_copy(plain, tmp_path / "long.qcow2"), 116, b"\x00\x01\x00\x00"),
    }
    for why, path in refused.items():
        with pytest.raises(SnapshotError, match=why) as error:
            qcow2.check_image(path)
        assert error.value.code == "SNAPSHOT_DISK_UNSAFE"


def _copy(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes())
    return target


@pytest.mark.anyio
async def test_a_bundle_disk_naming_a_host_file_is_refused_before_qemu(shared_bundle, tmp_path):
    secret = tmp_path / "secret"
    evil = _copy_bundle(shared_bundle, tmp_path / "evil.snap")
    (evil / bundle_format.DISK).unlink()
    _qcow2(evil / bundle_format.DISK, "-o", f"data_file={secret},data_file_raw=on")
    _reseal(evil)  # even a bundle the user vouches for
    before = len(qemu_processes())
    for trust in (False, True):
        with pytest.raises(SnapshotError) as refused:
            async with restore(evil, trust=trust):
                pass
        assert refused.value.code == "SNAPSHOT_DISK_UNSAFE"
    with pytest.raises(SnapshotError) as refused_siblings:
        async with restore(evil, n=2):
            pass
    assert refused_siblings.value.code == "SNAPSHOT_DISK_UNSAFE"
    assert len(qemu_processes()) == before
    # The check also runs on the copy QEMU opens (a disk swapped after the first look).
    with pytest.raises(SnapshotError) as copied:
        bundle_format.copy_verified(
            evil / bundle_format.DISK, tmp_path / "copy.qcow2",
            Manifest.from_cbor((evil / bundle_format.MANIFEST).read_bytes()).files[bundle_format.DISK],
        )  # fmt: skip
    assert copied.value.code == "SNAPSHOT_DISK_UNSAFE" and not (tmp_path / "copy.qcow2").exists()


@pytest.mark.anyio
async def test_a_bundle_this_user_did_not_sign_needs_trust(shared_bundle, tmp_path, anyio_backend):
    before = len(qemu_processes())
    rewritten = _copy_bundle(shared_bundle, tmp_path / "rewritten.snap")
    manifest = cbor2.loads((rewritten / bundle_format.MANIFEST).read_bytes())
    (rewritten / bundle_format.MANIFEST).write_bytes(cbor2.dumps({**manifest, "source": "me"}, canonical=True))
    unsigned = _copy_bundle(shared_bundle, tmp_path / "unsigned.snap")
    (unsigned / bundle_format.MAC).unlink()
    for untrusted in (rewritten, unsigned):
        for launch in (restore(untrusted), restore(untrusted, n=2)):
            with pytest.raises(SnapshotError) as refused:
                async with launch:
                    pass
            assert refused.value.code == "SNAPSHOT_UNTRUSTED"
    assert len(qemu_processes()) == before
    refused_cli = machinen("restore", str(unsigned), check=False)
    assert refused_cli.returncode != 0 and b"SNAPSHOT_UNTRUSTED" in refused_cli.stderr
    # Vouched for explicitly, it is an ordinary bundle (hashes still checked as it is copied).
    async with restore(unsigned, name=f"trusted-{anyio_backend}", trust=True) as vm:
        assert (await vm.exec(["echo", "ok"])).stdout == b"ok\n"


def test_restore_reads_each_bundle_file_once_into_a_checked_private_copy(tmp_path):
    source = tmp_path / "mem"
    with open(source, "wb") as f:  # sparse: 64 MiB with two islands of data
        f.write(b"head")
        f.seek(40 << 20)
        f.write(b"island")
        f.truncate(64 << 20)
    expected = FileEntry(sha256=sha256_file(source), size=source.stat().st_size)
    bundle_format.copy_verified(source, tmp_path / "copy", expected)
    copy = tmp_path / "copy"
    assert copy.read_bytes() == source.read_bytes()
    assert copy.stat().st_mode & 0o777 == 0o600
    assert copy.stat().st_blocks * 512 < 1 << 20  # holes stayed holes
    for wrong in (replace(expected, sha256="0" * 64), replace(expected, size=1)):
        with pytest.raises(SnapshotError) as mismatch:
            bundle_format.copy_verified(source, tmp_path / "wrong", wrong)
        assert mismatch.value.code == "SNAPSHOT_CORRUPT" and not (tmp_path / "wrong").exists()


def test_the_bundle_key_must_be_private(tmp_path, monkeypatch):
    monkeypatch.setenv("MACHINEN_HOME", str(tmp_path / "home"))
    bundle_dir = tmp_path / "b"
    bundle_dir.mkdir()
    bundle_format.sign(bundle_dir, b"manifest")
    key = tmp_path / "home" / "keys" / "bundle"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    assert bundle_format.is_signed(bundle_dir, b"manifest") and not bundle_format.is_signed(bundle_dir, b"other")
    key.chmod(0o644)
    with pytest.raises(MachinenError) as exposed:
        bundle_format.is_signed(bundle_dir, b"manifest")
    assert exposed.value.code == "PATH_NOT_PRIVATE"


# --- disk filling (item 8) ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_guest_flooding_its_console_fills_at_most_two_capped_logs(anyio_backend):
    name = f"flood-{anyio_backend}"
    async with boot(name=name, network=False) as vm:
        entry = registry.vm_dir(name)
        # 2.5 MiB through the emulated UART (the guest's kernel console), then a marker.
        await vm.exec(["sh", "-c", "head -c 2621440 /dev/zero | tr '\\0' x > /dev/ttyS0; echo END-OF-FLOOD > /dev/ttyS0"],
                      check=True, timeout=120)  # fmt: skip
        with anyio.fail_after(HANG_S):
            while b"END-OF-FLOOD" not in entry.console_log.read_bytes():
                await anyio.sleep(0.1)
        sizes = [entry.console_log.stat().st_size, (entry.path / "console.log.1").stat().st_size]
        assert max(sizes) <= capped_log.CONSOLE_LOG_LIMIT and sum(sizes) > 0
        assert (await vm.exec(["echo", "still here"])).stdout == b"still here\n"


@pytest.mark.anyio
async def test_a_guest_resetting_its_channel_in_a_loop_is_slowed_and_not_logged_each_time(tmp_path, monkeypatch):
    monkeypatch.setattr(relay, "RESET_BACKOFF_S", 0.05)
    resets = relay.RESETS_PER_WINDOW + 4
    async with relayed_vm(tmp_path) as (vm, agents):
        with structlog.testing.capture_logs() as logs:
            for attempt in range(resets):
                assert isinstance(await _outcome(vm, {"bytes": [b"\0" * 100]}), AgentUnavailableError)
                await _exec_when_reconnected(vm, f"after-{attempt}")
        assert len(agents) == resets + 1
    events = [entry["event"] for entry in logs]
    assert events.count("agent channel reset") == relay.RESETS_PER_WINDOW
    assert sum("keeps resetting" in event for event in events) == 1


# --- deadlines (item 5) ---------------------------------------------------------------------------

# Run as root in the guest: every thread of the agent's server (PID 1's forked child, same command
# line) stops in a ptrace-stop, so it reads nothing from its port, until this process exits and the
# kernel detaches them.
FREEZE_AGENT = """
import ctypes, os, sys, time
time.sleep(1)  # the exec that started us returns first
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
init = open("/proc/1/cmdline", "rb").read()
servers = [p for p in os.listdir("/proc") if p.isdigit() and p != "1" and open(f"/proc/{p}/cmdline", "rb").read() == init]
for pid in servers:
    for tid in os.listdir(f"/proc/{pid}/task"):
        if libc.ptrace(0x4206, int(tid), None, None) != 0:  # PTRACE_SEIZE
            sys.exit(os.strerror(ctypes.get_errno()))
        libc.ptrace(0x4207, int(tid), None, None)  # PTRACE_INTERRUPT
time.sleep(float(sys.argv[1]))
"""


async def _freeze_agent(vm: VM, seconds: float) -> None:
    await vm.write_file("/tmp/freeze.py", FREEZE_AGENT.encode())
    await vm.exec(["sh", "-c", f"setsid python3 /tmp/freeze.py {seconds} </dev/null >/dev/null 2>&1 &"], check=True)
    await anyio.sleep(2)


@pytest.mark.anyio
async def test_a_guest_that_stops_reading_its_port_stalls_nothing(anyio_backend, tmp_path):
    name = f"frozen-{anyio_backend}"
    async with boot(name=name, network=False) as vm:
        await _freeze_agent(vm, 25)
        started = anyio.current_time()

        async def upload() -> None:
            with pytest.raises(ExecError) as failed:
                await vm.exec(["cat"], input=b"x" * (1 << 20), timeout=2)
            # The agent's own timeout cannot fire: the supervisor's stall limit or the host's backstop does.
            assert failed.value.code in ("EXEC_AGENT_UNAVAILABLE", "EXEC_AGENT_TIMEOUT")

        # 12 MiB of stdin (a credit window per call) nobody reads: more than the guest's virtio
        # buffers and the socket hold, so the supervisor's writer stalls.
        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(upload)
        assert anyio.current_time() - started < 2 + AGENT_TIMEOUT_SLACK_S + 3  # was: blocked past 60 s
        await vm.snapshot(tmp_path / "frozen.snap")  # the supervisor works meanwhile, without the agent
        # Past the stall limit the channel is reset: calls fail at once, retryably, instead of hanging.
        with anyio.fail_after(relay.AGENT_SEND_STALL_S + HANG_S):
            while True:
                try:
                    await vm.exec(["true"], timeout=1)
                except AgentUnavailableError as unavailable:
                    assert unavailable.retryable
                    break
                except ExecError as other:
                    assert other.code == "EXEC_AGENT_TIMEOUT"
        # Once the guest reads again, the supervisor's reconnect attempts get through.
        assert (await _exec_when_reconnected(vm, "unused", argv=["echo", "back"], within=60)).stdout == b"back\n"
        frozen_again = anyio.current_time()
        await _freeze_agent(vm, 60)
        # A stop does not depend on the guest: it finishes, and says how.
        assert await stop_vm(name) == "stopped"
        assert anyio.current_time() - frozen_again < HANG_S + 5
    assert not [line for line in qemu_processes() if name in line]


# --- the low ones ---------------------------------------------------------------------------------


def test_a_pushed_chunk_cannot_decompress_into_a_bomb():
    bomb = zlib.compress(bytes(64 << 20), 9)  # 64 MiB of zeros in ~64 KiB
    with pytest.raises(TransferError) as refused:
        transfer._inflate_chunk(bomb)
    assert refused.value.code == "TRANSFER_CORRUPT"
    with pytest.raises(TransferError):
        transfer._inflate_chunk(b"not zlib")
    assert transfer._inflate_chunk(zlib.compress(b"x" * chunks.CHUNK_SIZE)) == b"x" * chunks.CHUNK_SIZE


def test_manifests_hold_plain_bounded_data_only():
    def manifest(**changes) -> bytes:
        digest = "0" * 64
        data = {"format": 1, "files": {"state": {"sha256": digest, "size": 1}, "disk.qcow2": {"sha256": digest, "size": 1}},
                "kernel": {"sha256": digest}, "initrd": {"sha256": digest}, "image": {"key": "0" * 24},
                "machine": {"type": "microvm", "memory_mib": 256, "cpus": 1, "accel": "tcg", "tsc_khz": None,
                            "network": True, "disk_size": 1 << 30}}  # fmt: skip
        data.update(changes)
        return cbor2.dumps(data)

    Manifest.from_cbor(manifest())
    machine = cbor2.loads(manifest())["machine"]
    hostile = {
        "a date (CBOR tag 1)": manifest(created=cbor2.CBORTag(1, 0)),
        "a set (tag 258)": manifest(extra=cbor2.CBORTag(258, [1, 2])),
        "a shared reference cycle (tags 28/29)": bytes.fromhex("a1") + cbor2.dumps("x") + bytes.fromhex("d81c81d81d00"),
        "memory as text": manifest(machine={**machine, "memory_mib": "256"}),
        "a billion CPUs": manifest(machine={**machine, "cpus": 10**9}),
        "a negative disk": manifest(machine={**machine, "disk_size": -1}),
        "an unknown accelerator": manifest(machine={**machine, "accel": "hvf"}),
        "a file size as a float": manifest(
            files={"state": {"sha256": "0" * 64, "size": 1.5}, "disk.qcow2": {"sha256": "0" * 64, "size": 1}}
        ),
        "an oversized manifest": manifest(padding=b"\0" * (2 << 20)),
    }
    for what, raw in hostile.items():
        with pytest.raises(SnapshotError) as refused:
            Manifest.from_cbor(raw)
        assert refused.value.code == "SNAPSHOT_CORRUPT", what


def test_guest_text_cannot_drive_the_terminal():
    hostile = "done\x1b]0;owned\x07\x1b[2J\r\x9b31m\x00"
    assert terminal_safe(hostile) == "done\\x1b]0;owned\\x07\\x1b[2J\\x0d\\x9b31m\\x00"
    assert terminal_safe("line one\n\tline two") == "line one\n\tline two"


def test_commas_in_machinen_paths_reach_qemu_intact(tmp_path):
    odd = tmp_path / "a,b"
    env = {**os.environ, "MACHINEN_HOME": str(odd / "home"), "MACHINEN_RUNTIME_DIR": str(odd / "run,time")}
    ran = machinen("boot", "--name", "comma", "--", "echo", "ok", env=env, check=False)
    assert ran.returncode == 0 and ran.stdout == b"ok\n", ran.stderr[-2000:]


# --- confinement (item 9) -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_qemu_runs_sandboxed_in_namespaces_of_its_own(anyio_backend, tmp_path):
    """A guest that took over QEMU through a device bug could not spawn programs, gain privileges
    or read the user's files; saving and loading state (fork, snapshot, restore) still work."""
    secret = tmp_path / "secret"
    secret.write_text("the user's own file")
    async with boot(name=f"confined-{anyio_backend}", network=False) as vm:
        qemu_pid = (await vm.describe())["qemu_pid"]
        status = Path(f"/proc/{qemu_pid}/status").read_text()
        assert re.search(r"^Seccomp:\s+2$", status, re.MULTILINE), status  # a filter is installed
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.MULTILINE)
        # Its own namespaces, and a root with only what the VM needs: not the user's files.
        assert os.readlink(f"/proc/{qemu_pid}/ns/user") != os.readlink("/proc/self/ns/user")
        seen_by_qemu = Path(f"/proc/{qemu_pid}/root")
        assert (seen_by_qemu / "usr/bin").is_dir() and not (seen_by_qemu / str(secret).lstrip("/")).exists()
        assert not (seen_by_qemu / str(Path.home()).lstrip("/") / ".ssh").exists()
        await vm.exec(["sh", "-c", "echo kept > /root/mark"], check=True)
        async with vm.fork() as child:
            assert (await child.exec(["cat", "/root/mark"])).stdout == b"kept\n"
            await child.snapshot(tmp_path / "child.snap")  # RAM inside the state: a live migration
    async with restore(tmp_path / "child.snap") as again:
        assert (await again.exec(["cat", "/root/mark"])).stdout == b"kept\n"


# --- the network (item 4) -------------------------------------------------------------------------

PROBE = """
import errno, socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            print(target, "open", s.recv(16).decode())
    except OSError as e:
        print(target, errno.errorcode.get(e.errno, "timeout"))
"""


async def _probe(vm: VM, *targets: str) -> dict[str, str]:
    await vm.write_file("/tmp/probe.py", PROBE.encode())
    out = (await vm.exec(["python3", "/tmp/probe.py", *targets], check=True, timeout=60)).stdout.decode()
    return {line.split()[0]: " ".join(line.split()[1:]) for line in out.splitlines()}


@asynccontextmanager
async def _host_service(address: str) -> AsyncIterator[int]:
    """A TCP service on this host that greets whoever connects; yields its port."""

    async def greet(client: anyio.abc.SocketStream) -> None:
        async with client:
            await client.send(b"hello")

    async with (
        await anyio.create_tcp_listener(local_host=address, local_port=0) as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(listener.serve, greet)
        yield listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.cancel_scope.cancel()


def test_the_network_policy_closes_the_host_and_link_local():
    policy = netguard.Policy(
        host=frozenset({ipaddress.ip_address("192.168.7.2")}),
        dns=frozenset({ipaddress.ip_address("127.0.0.53")}),
        egress=Egress(NetworkPolicy(allow=("127.0.0.1:11434", "10.9.0.0/16")), upstream=[]),
    )
    verdicts = {
        ("127.0.0.1", 5432): False,  # what the guest's 10.0.2.2:5432 becomes
        ("127.0.0.1", 11434): True,  # allowed
        ("127.0.0.53", 53): True,  # the host's resolver, which slirp forwards DNS to
        ("127.0.0.53", 80): False,
        ("::1", 22): False,
        ("::ffff:127.0.0.1", 22): False,  # v4-mapped
        ("169.254.169.254", 80): False,  # cloud metadata
        ("fe80::1", 80): False,
        ("192.168.7.2", 22): False,  # the host's own LAN address
        ("192.168.7.3", 22): True,  # another machine of the LAN
        ("10.9.4.4", 1): True,
        ("151.101.2.132", 443): True,  # the internet
        ("224.0.0.251", 5353): False,
    }
    for (address, port), allowed in verdicts.items():
        assert policy.permits(ipaddress.ip_address(address), port) is allowed, (address, port)
    for rule in ("[::1]:22", "10.0.0.0/8", "127.0.0.1", "2001:db8::/32"):
        netpolicy.parse_rule(rule)
    for bad in ("local host:80", "127.0.0.1:0", "127.0.0.1:99999", "1.2.3.4/40", "", "[::1]:x"):
        with pytest.raises(MachinenError) as refused:
            NetworkPolicy(allow=(bad,))
        assert refused.value.code == "BOOT_NETWORK_RULE_INVALID", bad


@pytest.mark.anyio
async def test_a_guest_cannot_reach_the_hosts_loopback_or_link_local_unless_allowed(anyio_backend):
    host_ip = next((str(a) for a in netguard.host_addresses() if a.version == 4 and not a.is_loopback), None)
    async with _host_service("127.0.0.1") as private, _host_service("0.0.0.0") as everywhere:
        targets = [f"10.0.2.2:{private}", f"10.0.2.2:{everywhere}", "169.254.169.254:80"]
        if host_ip is not None:
            targets.append(f"{host_ip}:{everywhere}")
        async with boot(name=f"closed-{anyio_backend}") as vm:
            seen = await _probe(vm, *targets)
            assert seen == dict.fromkeys(targets, "ECONNREFUSED"), seen  # refused at once, not timed out
            async with vm.fork() as sibling:  # siblings keep the policy
                assert (await _probe(sibling, targets[0]))[targets[0]] == "ECONNREFUSED"
        async with boot(name=f"opened-{anyio_backend}", network=NetworkPolicy.host_ports(private)) as vm:
            seen = await _probe(vm, f"10.0.2.2:{private}", f"10.0.2.2:{everywhere}")
            assert seen == {f"10.0.2.2:{private}": "open hello", f"10.0.2.2:{everywhere}": "ECONNREFUSED"}
            assert (await vm.describe())["network_policy"]["allow"] == [f"127.0.0.1:{private}"]
