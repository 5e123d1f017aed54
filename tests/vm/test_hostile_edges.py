"""The edges of issue 24 (hostile guest): deadlines on every guest call, a capped supervisor log,
`machinen ls` and the peer protocol facing whatever a peer sends, and Ray clusters reached
without TLS or token authentication.

The guest here is a fake agent (fake_agent.py) behind a real supervisor relay: one that answers
HELLO and ``exec`` but never ``ping``, ``info``, ``read_file`` or ``write_file``, and, when told,
no HELLO either, as a guest that replaced or froze its agent would.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace

import anyio
import anyio.abc
import pytest
from click.testing import CliRunner
from fake_agent import FakeAgent, _Call, chunk, relayed_vm

from machinen_async import VM, MachinenError
from machinen_async.errors import ExecTimeoutError, HostError
from machinen_async.hosts.client import PeerClient
from machinen_async.protocol import wire
from machinen_async.protocol.framing import FrameStream
from machinen_async.sdk import ray_pool
from machinen_async.store import registry
from machinen_async.supervisor import relay
from machinen_async.vmm import capped_log

HANG_S = 10.0  # a guard against hanging, never a measurement
SHORT = 0.3  # the deadlines the tests set
HOSTILE = "vm\x1b]0;owned\x07\x1b[2J\r\n\tfake row\x9b31m"


class Behaviour:
    """What the fake agents of one test do (shared: the supervisor reconnects to new ones)."""

    answer_hello = True
    read_chunks = 0  # read_file sends this many chunks ...
    read_gap = 0.0  # ... this many seconds apart ...
    finish_read = False  # ... then finishes the file, or hangs


class StubbornAgent(FakeAgent):
    def __init__(self, stream: anyio.abc.ByteStream, behaviour: Behaviour) -> None:
        super().__init__(stream)
        self.behaviour = behaviour

    async def _dispatch(self, frame: list, tg: anyio.abc.TaskGroup) -> None:
        if frame[0] == wire.HELLO and not self.behaviour.answer_hello:
            return
        await super()._dispatch(frame, tg)

    async def _run(self, call: _Call, method: str, params: dict) -> None:
        if method not in ("ping", "info", "read_file", "write_file"):
            return await super()._run(call, method, params)
        with call.scope:
            try:
                if method == "read_file":
                    for index in range(self.behaviour.read_chunks):
                        await anyio.sleep(self.behaviour.read_gap)
                        await self._output(call, wire.STDOUT, chunk("file", index))
                    if self.behaviour.finish_read:
                        await self._send([wire.EOF, call.sid, wire.STDOUT])
                        self.live.pop(call.sid, None)
                        self.finished.add(call.sid)
                        await self._send([wire.RESULT, call.sid, {"size": 0}])
                        return
                await anyio.sleep_forever()  # reads no input, grants no credit, never answers
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return


async def _still_serves(vm: VM, agent: StubbornAgent) -> None:
    """The timed-out call was cancelled in the guest, and the VM's other calls go on."""
    with anyio.fail_after(HANG_S):
        while not agent.cancelled:
            await anyio.sleep(0.01)
    assert (await vm.exec(["short", "still-here"])).stdout == b"still-here"


# --- deadlines (item 9) ---------------------------------------------------------------------------

SILENT_CALLS = {
    "ping": lambda vm: vm.ping(timeout=SHORT),
    "describe": lambda vm: vm.describe(timeout=SHORT),
    "read_file": lambda vm: vm.read_file("/etc/hostname", timeout=SHORT),
    "write_file, unanswered": lambda vm: vm.write_file("/tmp/x", b"small", timeout=SHORT),
    "write_file, no credit": lambda vm: vm.write_file("/tmp/x", b"x" * (wire.INITIAL_WINDOW + 1), timeout=SHORT),
}


@pytest.mark.anyio
@pytest.mark.parametrize("what", SILENT_CALLS)
async def test_a_call_the_agent_never_answers_fails_typed(what, anyio_backend, tmp_path):
    async with relayed_vm(tmp_path, lambda stream: StubbornAgent(stream, Behaviour())) as (vm, agents):
        with anyio.fail_after(HANG_S), pytest.raises(ExecTimeoutError) as failed:
            await SILENT_CALLS[what](vm)
        assert failed.value.code == "EXEC_AGENT_TIMEOUT"
        await _still_serves(vm, agents[0])


@pytest.mark.anyio
async def test_a_read_that_stalls_half_way_fails_typed(anyio_backend, tmp_path):
    behaviour = Behaviour()
    behaviour.read_chunks = 3
    async with relayed_vm(tmp_path, lambda stream: StubbornAgent(stream, behaviour)) as (vm, agents):
        with anyio.fail_after(HANG_S), pytest.raises(ExecTimeoutError) as failed:
            await vm.read_file("/big", timeout=SHORT)
        assert failed.value.code == "EXEC_AGENT_TIMEOUT" and "/big" in failed.value.message
        await _still_serves(vm, agents[0])


@pytest.mark.anyio
async def test_the_file_deadline_is_a_stall_limit_not_a_total(anyio_backend, tmp_path):
    behaviour = Behaviour()
    behaviour.read_chunks, behaviour.read_gap, behaviour.finish_read = 20, 0.05, True  # ~1 s in all
    async with relayed_vm(tmp_path, lambda stream: StubbornAgent(stream, behaviour)) as (vm, _):
        with anyio.fail_after(HANG_S):
            data = await vm.read_file("/slow", timeout=0.5)
    assert data == b"".join(chunk("file", index) for index in range(20))


@pytest.mark.anyio
async def test_a_reset_the_agent_never_answers_fails_typed_and_recovers(anyio_backend, tmp_path, monkeypatch):
    monkeypatch.setattr(relay, "AGENT_RECONNECT_TIMEOUT_S", 0.2)  # the supervisor's retries, quicker
    behaviour = Behaviour()
    async with relayed_vm(tmp_path, lambda stream: StubbornAgent(stream, behaviour)) as (vm, agents):
        behaviour.answer_hello = False
        with anyio.fail_after(HANG_S), pytest.raises(ExecTimeoutError) as failed:
            await vm.reset_agent_channel(timeout=SHORT)  # the supervisor's deadline
        assert failed.value.code == "EXEC_AGENT_TIMEOUT"
        # The supervisor keeps reconnecting: once an agent answers again, the VM serves again.
        behaviour.answer_hello = True
        with anyio.fail_after(HANG_S):
            while True:
                try:
                    assert (await vm.exec(["short", "back"])).stdout == b"back"
                    break
                except MachinenError as exc:
                    assert exc.code == "EXEC_AGENT_UNAVAILABLE"
                    await anyio.sleep(0.05)
        assert len(agents) > 1
        assert (await vm.reset_agent_channel(timeout=HANG_S)) == {"agent": {"fake": True}}


# --- supervisor.log is capped (low) ---------------------------------------------------------------


def test_the_supervisor_log_is_capped_and_rotated_once(tmp_path):
    path = tmp_path / "supervisor.log"
    path.write_bytes(b"from before\n")
    limit = 4096
    saved = os.dup(1), os.dup(2)  # ProcessLog makes the files our stdout and stderr
    try:
        log = capped_log.ProcessLog(path, limit)
        line = "guest provoked this line \x1b[2J\n"
        for _ in range(3 * limit // len(line) + 10):  # > 3 caps of text, as structlog prints it
            log.write(line)
            log.flush()
        os.write(2, b"END\n")  # what else writes to stderr lands in the current file
        log.close()
    finally:
        for fd, saved_fd in zip((1, 2), saved, strict=True):
            os.dup2(saved_fd, fd)
            os.close(saved_fd)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["supervisor.log", "supervisor.log.1"]
    assert path.with_name("supervisor.log.1").stat().st_size == limit
    assert path.stat().st_size <= limit + len(b"END\n")
    assert path.read_bytes().endswith(b"END\n")
    assert b"from before" not in path.read_bytes() + path.with_name("supervisor.log.1").read_bytes()


# --- machinen ls (low) ----------------------------------------------------------------------------


def test_ls_shows_what_a_peer_sent_escaped_whatever_its_shape(monkeypatch):
    from machinen_async.cli import _listed, _measure_all, main

    rows = [
        {"name": HOSTILE, "pid": 12, "uptime_s": 3.2, "accel": "tcg", "memory_mib": 256,
         "forked_from": {"source": HOSTILE, "nested": [1, {"x": b"\x1b"}]}, "ports": [HOSTILE]},
        {"name": "sparse"},  # fields missing
        {"name": ["a", 1], "pid": "1\x1b[A", "uptime_s": "long", "accel": None, "memory_mib": 2.5,
         "forked_from": ["x", None], "ports": "8080->80"},
    ]  # fmt: skip
    monkeypatch.setattr(registry, "list_rows", lambda: rows)
    shown = CliRunner().invoke(main, ["ls"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert len(lines) == 1 + len(rows)  # no row forged by a newline
    assert not any(c in shown.output for c in "\x1b\x07\r\t\x9b")
    assert "\\x1b]0;owned\\x07" in lines[1] and "'source'" in lines[1]
    as_json = CliRunner().invoke(main, ["ls", "--json"])
    assert as_json.exit_code == 0 and "\x1b" not in as_json.output
    assert [row["metrics"] for row in json.loads(as_json.output)] == [None, None, None]  # no such VMs to ask
    assert anyio.run(_measure_all) == {}  # machinen top: the same rows, nothing to show

    # Rows from another host: a list of maps or a typed error.
    assert _listed(["bare", {"name": "x"}]) == [{"name": "bare"}, {"name": "x"}]
    with pytest.raises(MachinenError) as refused:
        _listed({"name": "x"})
    assert refused.value.code == "HOST_PROTOCOL"


@pytest.mark.anyio
async def test_a_ray_pool_lists_rows_of_any_shape(anyio_backend):
    async def listing(value):
        return value

    pool = ray_pool.RayHosts()
    pool._hosts = {"n1": SimpleNamespace(name="n1", list=lambda: listing(["bare", {"name": "x", "node": "forged"}]))}
    assert await pool.list() == [{"name": "bare", "node": "n1"}, {"name": "x", "node": "n1"}]
    pool._hosts = {"n1": SimpleNamespace(name="n1", list=lambda: listing({"not": "a list"}))}
    with pytest.raises(HostError) as refused:
        await pool.list()
    assert refused.value.code == "HOST_PROTOCOL"


# --- the peer protocol: short replies (low) -------------------------------------------------------


@asynccontextmanager
async def peer_replying(replies: list) -> AsyncIterator[PeerClient]:
    """A ``PeerClient`` whose peer answers its n-th request with ``replies[n]`` (``"ID"``: the request's id)."""
    client_end, peer_end = socket.socketpair()
    peer = FrameStream(await anyio.abc.UNIXSocketStream.from_socket(peer_end))

    async def serve() -> None:
        for reply in replies:
            request = await peer.receive()
            if isinstance(reply, list):
                reply = [request[0] if item == "ID" else item for item in reply]
            await peer.send(reply)
        await anyio.sleep_forever()

    async def why_lost() -> MachinenError:
        return HostError("peer gone", code="HOST_CONNECTION_LOST")

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        client = PeerClient("peer", FrameStream(await anyio.abc.UNIXSocketStream.from_socket(client_end)), why_lost)
        try:
            yield client
        finally:
            client.close()
            tg.cancel_scope.cancel()
            await client.frames.aclose()
            await peer.aclose()


SHORT_REPLIES = {
    "id only": ["ID"],
    "ok without a result": ["ID", True],
    "error without a message": ["ID", False, "HOST_X"],
    "error code not a string": ["ID", False, 7, "m"],
    "neither ok nor error": ["ID", "yes", 1],
}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the peer client runs in an asyncio portal
@pytest.mark.anyio
@pytest.mark.parametrize("reply", SHORT_REPLIES)
async def test_a_short_peer_reply_is_a_typed_error(reply, anyio_backend):
    async with peer_replying([SHORT_REPLIES[reply], ["ID", True, {"fine": 1}]]) as client:
        with anyio.fail_after(HANG_S), pytest.raises(HostError) as failed:
            await client.call("list")
        assert failed.value.code == "HOST_PROTOCOL"
        assert await client.call("list") == {"fine": 1}  # one bad reply fails only its call


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
@pytest.mark.parametrize("reply", [[], "junk", {"0": 1}, [[1], True, 2]], ids=["empty", "string", "map", "list id"])
async def test_a_reply_for_no_call_fails_the_link_typed(reply, anyio_backend):
    async with peer_replying([reply]) as client:
        with anyio.fail_after(HANG_S), pytest.raises(HostError) as failed:
            await client.call("list")
        assert failed.value.code == "HOST_PROTOCOL"
        with pytest.raises(HostError) as later:
            await client.call("list")
        assert later.value.code == "HOST_PROTOCOL"


# --- Ray clusters without TLS or token authentication (low) -------------------------------------


@pytest.mark.parametrize(
    ("tls", "token", "warned"),
    [("1", True, False), (None, True, True), ("1", False, True), (None, False, True)],
)
def test_a_ray_cluster_without_tls_or_tokens_is_warned_about_once(tls, token, warned, monkeypatch, caplog):
    monkeypatch.setattr(ray_pool, "_warned_insecure", False)
    if tls is None:
        monkeypatch.delenv("RAY_USE_TLS", raising=False)
    else:
        monkeypatch.setenv("RAY_USE_TLS", tls)
    with caplog.at_level(logging.WARNING, logger=ray_pool.__name__):
        ray_pool._warn_if_insecure("ray://head:10001", token_auth=token)
        ray_pool._warn_if_insecure("ray://head:10001", token_auth=token)
    messages = [record.getMessage() for record in caplog.records if record.name == ray_pool.__name__]
    assert len(messages) == (1 if warned else 0)
    if warned:
        assert "ray://head:10001" in messages[0]
        assert ("TLS" in messages[0]) == (tls is None)
        assert ("token" in messages[0]) == (not token)


def test_token_auth_is_seen_in_the_environment_ray_reads(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert ray_pool._ray_token_auth()
