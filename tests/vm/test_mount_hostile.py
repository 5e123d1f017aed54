"""A hostile guest against live mounts and the supervisor's queues (issue 24): each attack as it was
proved against the old code, now refused.  The host side is driven directly (HostDirectory), through
a real supervisor relay facing a fake guest that floods (fast), and from inside a real VM."""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import msgpack
import pytest
from fake_agent import FakeAgent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from machinen_async import boot
from machinen_async.protocol import mounts as protocol
from machinen_async.protocol import wire
from machinen_async.sdk.mounts import Mount
from machinen_async.supervisor import mounts as host_mounts
from machinen_async.supervisor.mounts import HostDirectory, serve_mount
from machinen_async.supervisor import relay as supervisor_relay
from machinen_async.supervisor.relay import AgentRelay, ClientConnection

HANG_S = 10.0


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@pytest.fixture
def mount(tmp_path):
    """A mounted directory beside a secret outside it."""
    (tmp_path / "root").mkdir()
    (tmp_path / "secret.txt").write_text("host secret\n")
    directory = HostDirectory(str(tmp_path / "root"), read_only=False)
    yield directory, tmp_path / "root"
    directory.close()


def ok(directory: HostDirectory, op: str, *args) -> object:
    error, result = directory.serve(op, list(args))
    assert error == 0, (op, args, errno.errorcode.get(error))
    return result


def refused(directory: HostDirectory, op: str, *args) -> int:
    error, _ = directory.serve(op, list(args))
    assert error != 0, (op, args)
    return error


def escaping_links(root: Path) -> list[str]:
    """Links under ``root`` that the host (which follows links) resolves outside it."""
    found = []
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            if path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(root):
                found.append(f"{path.relative_to(root)} -> {os.readlink(path)}")
    return found


# --- escapes: symlinks, hard links, set-uid, FIFOs -----------------------------------------------


def test_a_link_moved_shallower_or_chained_through_a_link_cannot_lead_out(mount):
    directory, root = mount
    ok(directory, "mkdir", "a", 0o755)
    ok(directory, "mkdir", "a/b", 0o755)
    ok(directory, "symlink", "../../secret.txt", "a/b/s")  # inside where it is: the mount's own secret.txt
    assert refused(directory, "rename", "a/b/s", "s", False) == errno.EPERM  # mv a/b/s s
    assert refused(directory, "rename", "a/b", "b", False) == errno.EPERM  # the directory holding it, moved up
    ok(directory, "rename", "a/b", "a/c", False)  # the same depth: still inside
    ok(directory, "mkdir", "deeper", 0o755)
    ok(directory, "rename", "a", "deeper/a", False)  # deeper: still inside
    ok(directory, "mkdir", "c", 0o755)
    ok(directory, "symlink", "..", "c/up")
    assert refused(directory, "symlink", "c/up/c/up/../../secret.txt", "esc") == errno.EPERM
    assert refused(directory, "symlink", "c/../../secret.txt", "esc") == errno.EPERM
    assert refused(directory, "rename", "c/up", "up", False) == errno.EPERM
    ok(directory, "symlink", "./c/./up", "fine")  # dots that do not climb are fine
    assert escaping_links(root) == []


def test_moving_a_large_directory_up_asks_for_a_copy(mount, monkeypatch):
    directory, _root = mount
    monkeypatch.setattr(host_mounts, "RENAME_CHECK_ENTRIES", 20)
    ok(directory, "mkdir", "a", 0o755)
    ok(directory, "mkdir", "a/big", 0o755)
    for index in range(30):
        ok(directory, "create", f"a/big/f{index}", 0o644, True)
    assert refused(directory, "rename", "a/big", "big", False) == errno.EXDEV  # mv copies, making links anew
    ok(directory, "rename", "a/big", "a/same-depth", False)


def test_a_hard_linked_file_is_never_changed(mount, tmp_path):
    directory, root = mount
    victim = tmp_path / "victim"  # e.g. a pnpm store entry, or a `cp -al` tree
    victim.write_text("precious\n")
    victim.chmod(0o644)
    os.link(victim, root / "linked")
    before = victim.stat()
    assert refused(directory, "open", "linked", True, True) == errno.EPERM  # `: > linked`
    assert refused(directory, "truncate", "linked", 0) == errno.EPERM
    assert refused(directory, "chmod", "linked", 0o777) == errno.EPERM
    assert refused(directory, "utimens", "linked", 0, 0) == errno.EPERM
    assert refused(directory, "write", "linked", 0, b"owned") == errno.EPERM
    assert refused(directory, "create", "linked", 0o644, False) == errno.EPERM
    after = victim.stat()
    assert victim.read_text() == "precious\n"
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)


def test_truncating_open_still_truncates_a_file_of_the_mounts_own(mount):
    directory, root = mount
    (root / "own").write_text("12345")
    ok(directory, "open", "own", True, True)
    assert (root / "own").read_text() == ""


def test_set_uid_and_set_gid_bits_are_dropped(mount):
    directory, root = mount
    ok(directory, "create", "tool", 0o4755, True)
    assert stat.S_IMODE((root / "tool").stat().st_mode) == 0o755
    ok(directory, "chmod", "tool", 0o6755)
    assert stat.S_IMODE((root / "tool").stat().st_mode) == 0o755
    ok(directory, "mkdir", "dir", 0o2775)
    assert stat.S_IMODE((root / "dir").stat().st_mode) == 0o775


def test_a_fifo_in_the_mount_wedges_no_worker(mount):
    directory, root = mount
    os.mkfifo(root / "fifo")
    outcomes = {}

    def try_all() -> None:
        for op, args in [("read", ["fifo", 0, 10]), ("open", ["fifo", False, False]),
                         ("write", ["fifo", 0, b"x"]), ("fsync", ["fifo"]), ("list", ["fifo"]),
                         ("truncate", ["fifo", 0]), ("chmod", ["fifo", 0o600])]:  # fmt: skip
            outcomes[op] = directory.serve(op, args)[0]

    worker = threading.Thread(target=try_all, daemon=True)
    worker.start()
    worker.join(HANG_S)  # no reader or writer ever opens the other end: a blocking open would hang here
    assert not worker.is_alive(), "a mount worker hangs on a FIFO"
    assert all(error != 0 for error in outcomes.values()), outcomes


CLIMBING_TARGETS = ["..", "../..", "../../..", "../secret.txt", "../../secret.txt", "a", "a/up/..", "up/up/../..",
                    "a/b", "./..", "b/../..", "/etc/passwd", "."]  # fmt: skip
operations = st.lists(
    st.tuples(
        st.sampled_from(["mkdir", "symlink", "rename", "create", "open", "chmod", "unlink"]),
        st.sampled_from(["a", "b", "a/b", "a/b/c", "b/c", "c", "a/up", "up", "a/b/s", "s"]),
        st.sampled_from(["a", "b", "a/b", "c", "up", "s", "a/b/s", "b/s"]),
        st.sampled_from(CLIMBING_TARGETS),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=operations)
def test_no_sequence_of_mount_operations_leaves_a_link_leading_out(tmp_path_factory, steps):
    base = tmp_path_factory.mktemp("mount")
    (base / "root").mkdir()
    (base / "secret.txt").write_text("host secret\n")
    directory = HostDirectory(str(base / "root"), read_only=False)
    try:
        for op, path, other, target in steps:
            args = {
                "mkdir": [path, 0o755],
                "symlink": [target, path],
                "rename": [path, other, False],
                "create": [path, 0o4755, False],
                "open": [path, True, True],
                "chmod": [path, 0o6777],
                "unlink": [path],
            }[op]
            directory.serve(op, args)
            assert escaping_links(base / "root") == [], steps
        for entry in (base / "root").rglob("*"):
            if not entry.is_symlink():
                assert not entry.lstat().st_mode & (stat.S_ISUID | stat.S_ISGID)
    finally:
        directory.close()


@pytest.mark.anyio
async def test_a_guest_cannot_plant_an_escape_in_a_live_mount(tmp_path, anyio_backend):
    """The same attacks from inside a real VM, by the tools a guest has; the host then checks what
    its own tools (which follow links) would see."""
    root, victim = tmp_path / "root", tmp_path / "victim"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("host secret\n")
    victim.write_text("precious\n")
    os.link(victim, root / "linked")
    os.mkfifo(root / "fifo")
    (root / "plain").write_text("still served\n")

    async def guest(script: str) -> tuple[int, str]:
        result = await vm.exec(["sh", "-c", f"cd /work && {script}"], timeout=60)
        return result.exit_code, (result.stdout + result.stderr).decode(errors="replace")

    async with boot(mounts=[Mount(str(root), "/work", live=True)], network=False) as vm:
        assert (await guest("mkdir -p a/b && ln -s ../../secret.txt a/b/s"))[0] == 0
        code, said = await guest("mv a/b/s s")
        assert code != 0 and "not permitted" in said, said
        assert (await guest("mv a/b b"))[0] != 0
        assert (await guest("mkdir c && ln -s .. c/up"))[0] == 0
        assert (await guest("ln -s c/up/c/up/../../secret.txt esc"))[0] != 0
        assert (await guest(": > linked"))[0] != 0
        assert (await guest("chmod 644 linked; touch linked; truncate -s 0 linked"))[0] != 0
        assert (await guest("echo '#!/bin/sh' > tool && chmod 4755 tool && mkdir -m 2775 shared"))[0] == 0
        # The guest's kernel opens a FIFO as a pipe of its own (only a guest speaking the protocol
        # itself makes the host open it: test_a_fifo_in_the_mount_wedges_no_worker); readers
        # block in the guest, and the mount keeps being served.
        await guest("for i in 1 2 3 4 5 6 7 8 9; do timeout 5 cat fifo & done; wait")
        assert (await guest("cat plain"))[1] == "still served\n"
        assert (await guest("mkdir -p x/node_modules/.bin && ln -s ../pkg/cli.js x/node_modules/.bin/pkg"))[0] == 0
    assert escaping_links(root) == []
    assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert stat.S_IMODE((root / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "shared").stat().st_mode) == 0o775
    assert os.readlink(root / "x/node_modules/.bin/pkg") == "../pkg/cli.js"  # relative links a package manager makes


# --- floods: a fake guest against a real supervisor relay ---------------------------------------


def _raw_frames(frame: list, count: int) -> bytes:
    body = msgpack.packb(frame, use_bin_type=True)
    return (wire.HEADER.pack(wire.MAGIC, len(body)) + body) * count


class FloodingGuest(FakeAgent):
    """An agent that floods.  Its ``mount`` call sends ``requests`` read requests packed into
    as few frames as its window allows, then ``credits`` CREDIT frames granting itself room
    it was never given; an ``exec`` of ``credit-flood`` sends ``credits`` stdin CREDIT
    frames, one of ``drip`` a window of output a byte per frame."""

    def __init__(self, stream: anyio.abc.ByteStream, requests: int, credits: int) -> None:
        super().__init__(stream)
        self.requests, self.credits = requests, credits
        self.answers = 0  # DATA frames of mount answers received (and dropped: no memory of its own)
        self.mount_calls: list[int] = []
        self.mount_cancels = 0

    async def _dispatch(self, frame: list, tg: anyio.abc.TaskGroup) -> None:
        kind = frame[0]
        if kind == wire.OPEN and frame[2] == "mount":
            self.mount_calls.append(frame[1])
            tg.start_soon(self._flood_mount, frame[1])
        elif kind == wire.OPEN and frame[2] == "exec" and frame[3]["argv"][0] in ("credit-flood", "drip"):
            tg.start_soon(self._flood_call, frame[1], frame[3]["argv"][0])
        elif kind == wire.DATA and frame[1] in self.mount_calls:
            self.answers += 1
            await self._send([wire.CREDIT, frame[1], wire.STDIN, len(frame[3])])
        elif kind == wire.CANCEL and frame[1] in self.mount_calls:
            self.mount_cancels += 1
        else:
            await super()._dispatch(frame, tg)

    async def _blast(self, data: bytes) -> None:
        async with self._send_lock:
            await self.frames._stream.send(data)

    async def _flood_mount(self, sid: int) -> None:
        request = protocol.encode([1, "read", ["data", 0, protocol.MAX_IO]])
        per_frame = wire.CHUNK // len(request)
        sent = 0
        while sent < self.requests and (sent + per_frame) * len(request) <= wire.INITIAL_WINDOW:
            count = min(per_frame, self.requests - sent)
            await self._send([wire.DATA, sid, wire.STDOUT, request * count])
            sent += count
        for _ in range(0, self.credits, 10_000):
            await self._blast(_raw_frames([wire.CREDIT, sid, wire.STDIN, wire.INITIAL_WINDOW], 10_000))

    async def _flood_call(self, sid: int, how: str) -> None:
        if how == "credit-flood":
            for _ in range(0, self.credits, 10_000):
                await self._blast(_raw_frames([wire.CREDIT, sid, wire.STDIN, 1], 10_000))
        else:
            for start in range(0, wire.INITIAL_WINDOW, 10_000):
                count = min(10_000, wire.INITIAL_WINDOW - start)
                await self._blast(_raw_frames([wire.DATA, sid, wire.STDOUT, b"x"], count))


@asynccontextmanager
async def flooded_relay(
    tmp_path: Path, *, requests: int = 0, credits: int = 0, mount: bool = True
) -> AsyncIterator[tuple[AgentRelay, list[FloodingGuest]]]:
    """A real supervisor relay (serving a read-only live mount of ``tmp_path/root``) to flooding guests."""
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "data").write_bytes(os.urandom(protocol.MAX_IO))
    agent_socket = tmp_path / "agent.sock"
    guests: list[FloodingGuest] = []

    async def serve_guest(stream: anyio.abc.ByteStream) -> None:
        guests.append(FloodingGuest(stream, requests, credits))
        await guests[-1].serve()

    relay = AgentRelay(agent_socket, "flooded")
    directory = HostDirectory(str(tmp_path / "root"), read_only=True)  # read-only is enough for the flood
    try:
        async with await anyio.create_unix_listener(agent_socket) as listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, serve_guest)
            await relay.connect()
            tg.start_soon(relay.read_loop)
            tg.start_soon(relay.write_loop)
            if mount:
                tg.start_soon(serve_mount, relay, directory, "/mnt")
            yield relay, guests
            tg.cancel_scope.cancel()
    finally:
        directory.close()


def _count_serving(monkeypatch) -> dict[str, int]:
    """How many mount requests are being answered at once, at most; each takes a while (a
    slow disk), so requests pile up if anything lets them."""
    counts = {"now": 0, "most": 0}
    lock = threading.Lock()
    serve = HostDirectory.serve

    def counted(self, op, args):
        with lock:
            counts["now"] += 1
            counts["most"] = max(counts["most"], counts["now"])
        try:
            time.sleep(0.001)
            return serve(self, op, args)
        finally:
            with lock:
                counts["now"] -= 1

    monkeypatch.setattr(HostDirectory, "serve", counted)
    return counts


def _queued_toward_agent(relay: AgentRelay) -> int:
    return relay.to_agent_send.statistics().current_buffer_used


@pytest.mark.anyio
async def test_a_read_request_flood_costs_bounded_memory(tmp_path, monkeypatch, anyio_backend):
    """Was: one 64 KiB frame held ~2,700 reads that all started at once, their 128 KiB answers
    waiting in memory (1.1 MiB of requests: +622 MiB).  Now 64 are decoded at a time and 8
    answers exist at once; what waits for the guest stays within its window."""
    counts = _count_serving(monkeypatch)
    rss_before = _rss_mib()
    most_queued = 0
    async with flooded_relay(tmp_path, requests=30_000) as (relay, guests):
        with anyio.fail_after(60):
            while not guests or guests[0].answers < 100:
                await anyio.sleep(0.01)
        for _ in range(150):
            most_queued = max(most_queued, _queued_toward_agent(relay))
            await anyio.sleep(0.01)
        assert guests[0].mount_cancels == 0  # an honest flood is served, slowly
    assert counts["most"] <= host_mounts.REQUESTS_IN_FLIGHT
    assert most_queued <= 2 * wire.INITIAL_WINDOW // wire.CHUNK + 2 * host_mounts.REQUESTS_WAITING
    assert _rss_mib() - rss_before < 48


@pytest.mark.anyio
async def test_a_guest_granting_itself_credit_breaks_its_mount_call(tmp_path, anyio_backend):
    """Was: CREDIT frames without end opened the host's output window as far as the guest
    liked, and answers queued toward it without end.  Now credit beyond what was sent is a
    protocol error: the call is cancelled and opened again, and memory stays flat."""
    rss_before = _rss_mib()
    async with flooded_relay(tmp_path, requests=2_700, credits=200_000) as (relay, guests):
        with anyio.fail_after(60):
            while not guests or len(guests[0].mount_calls) < 3:
                await anyio.sleep(0.01)
        assert guests[0].mount_cancels >= 2
        assert _queued_toward_agent(relay) <= 2 * wire.INITIAL_WINDOW // wire.CHUNK + 2 * host_mounts.REQUESTS_WAITING
    assert _rss_mib() - rss_before < 48


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["credit-flood", "drip"])
async def test_a_call_flooding_frames_toward_a_client_that_is_not_reading_queues_little(tmp_path, how, anyio_backend):
    """Was: 2,000,000 stdin CREDIT frames queued for the client (+200 MiB).  Now the first credit
    for stdin never sent fails the call; a window of output sent a byte per frame waits as
    a few frames of up to a CHUNK each."""
    rss_before = _rss_mib()
    async with flooded_relay(tmp_path, credits=2_000_000, mount=False) as (relay, _guests):
        client = ClientConnection(None)  # a client that reads nothing until the flood is over
        relay.open_call(client, 7, "exec", {"argv": [how]})
        with anyio.fail_after(60):
            if how == "credit-flood":
                while not any(frame[0] == wire.ERROR for frame in client.outbox._frames):
                    await anyio.sleep(0.01)
            else:
                while sum(len(frame[3]) for frame in client.outbox._frames) < wire.INITIAL_WINDOW:
                    await anyio.sleep(0.01)
        await anyio.sleep(0.5)  # whatever else the guest sent has arrived
        frames = [await client.outbox.get() for _ in range(len(client.outbox))]
    if how == "credit-flood":
        assert [frame[:3] for frame in frames] == [[wire.ERROR, 7, "EXEC_PROTOCOL"]]
    else:
        assert b"".join(frame[3] for frame in frames) == b"x" * wire.INITIAL_WINDOW
        assert len(frames) <= wire.INITIAL_WINDOW // wire.CHUNK + 1
    assert _rss_mib() - rss_before < 48


@pytest.mark.anyio
async def test_the_outbox_grows_waiting_frames_and_keeps_each_fds_order(anyio_backend):
    outbox = supervisor_relay.Outbox()
    for index in range(1000):
        outbox.put([wire.DATA, 1, wire.STDOUT, b"o%d," % index])
        outbox.put([wire.DATA, 1, wire.STDERR, b"e%d," % index])
        outbox.put([wire.DATA, 2, wire.STDOUT, b"x"])
    outbox.put([wire.EOF, 1, wire.STDOUT])
    outbox.put([wire.DATA, 1, wire.STDERR, b"after-eof-of-stdout"])
    outbox.put([wire.RESULT, 1, {"exit_code": 0}])
    outbox.put([wire.DATA, 2, wire.STDOUT, b"y"])
    frames = [await outbox.get() for _ in range(len(outbox))]
    assert len(frames) == 6  # 3,000 output frames became 3; another call's output still joins its own
    for sid, fd, expected in [(1, wire.STDOUT, b"".join(b"o%d," % index for index in range(1000))),
                              (1, wire.STDERR, b"".join(b"e%d," % index for index in range(1000))
                               + b"after-eof-of-stdout"), (2, wire.STDOUT, b"x" * 1000 + b"y")]:  # fmt: skip
        assert b"".join(frame[3] for frame in frames if frame[:3] == [wire.DATA, sid, fd]) == expected
    # Nothing joins output queued before an EOF or an outcome of its call.
    assert [frame[:2] for frame in frames] == [[wire.DATA, 1], [wire.DATA, 1], [wire.DATA, 2], [wire.EOF, 1],
                                               [wire.DATA, 1], [wire.RESULT, 1]]  # fmt: skip
    assert frames[-2] == [wire.DATA, 1, wire.STDERR, b"after-eof-of-stdout"]
    assert all(type(frame[3]) is bytes for frame in frames if frame[0] == wire.DATA)
