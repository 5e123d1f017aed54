"""`machinen mcp` driven by a real MCP client (the mcp SDK's ClientSession), over stdio and over
streamable HTTP, against real VMs; both anyio backends (the client runs on trio too)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx2
import pytest
from conftest import machinen, qemu_of
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from machinen_async import connect

pytestmark = pytest.mark.anyio

SERVER = [sys.executable, "-m", "machinen_async", "mcp"]
TOKEN = "a-test-token-of-enough-length"


async def call(session: ClientSession, tool: str, **arguments: object) -> dict:
    """A tool's structured result; a tool error fails the test with its text."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content[0].text
    assert json.loads(result.content[0].text) == result.structured_content
    return result.structured_content


async def refused(session: ClientSession, tool: str, **arguments: object) -> str:
    """The text of a tool error ("[CODE] message")."""
    result = await session.call_tool(tool, arguments)
    assert result.is_error, result.content
    return result.content[0].text


async def gone(*names: str) -> None:
    """Wait until no QEMU of these VMs runs (their owner's teardown stops them)."""
    with anyio.fail_after(60):
        while any(qemu_of(name) for name in names):
            await anyio.sleep(0.2)


async def test_stdio_session_boots_execs_forks_snapshots_restores_and_stops_its_vms(anyio_backend, tmp_path):
    source = f"mcp-{anyio_backend}"
    server = StdioServerParameters(command=SERVER[0], args=SERVER[1:], env=dict(os.environ))
    progress: list[str] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        assert set(tools) == {"boot", "exec", "read_file", "write_file", "list_files", "fork", "snapshot",
                              "restore", "stop", "list"}  # fmt: skip
        for tool in tools.values():
            assert tool.description and tool.input_schema["type"] == "object"
            assert tool.input_schema["additionalProperties"] is False
        assert tools["exec"].input_schema["required"] == ["vm", "cmd"]
        assert {"image", "memory_mib", "mounts", "ports", "network", "ttl", "detached"} <= set(
            tools["boot"].input_schema["properties"]
        )

        booted = await call(session, "boot", name=source, memory_mib=256, ttl=3600)
        assert booted["name"] == source and booted["memory_mib"] == 256
        async with connect(source) as vm:  # the ttl is the VM's own: its supervisor holds the deadline
            assert (await vm.describe())["deadline"] == booted["deadline"]
        assert 0 < booted["ttl_left_s"] <= 3600

        # Output past the cap: head and tail kept, the cut counted; all of it streamed as progress.
        result = await session.call_tool(
            "exec", {"vm": source, "cmd": "cat; head -c 100000 /dev/zero | tr '\\0' x; echo oops >&2; exit 3",
                     "stdin": "ping\n", "max_output_bytes": 4096},
            progress_callback=on_progress,
        )  # fmt: skip
        ran = result.structured_content
        assert (ran["exit_code"], ran["stderr"], ran["stderr_cut_bytes"]) == (3, "oops\n", 0)
        assert ran["stdout"].startswith("ping\nxxx") and ran["stdout"].endswith("xxx")
        assert ran["stdout_cut_bytes"] == 5 + 100_000 - 4096
        assert f"[... {ran['stdout_cut_bytes']} bytes cut ...]" in ran["stdout"]
        streamed = "".join(m.removeprefix("stdout: ") for m in progress if m.startswith("stdout: "))
        assert streamed == "ping\n" + "x" * 100_000

        await call(session, "write_file", vm=source, path="/root/state", content="before the fork\n")
        assert (await call(session, "read_file", vm=source, path="/root/state"))["content"] == "before the fork\n"
        listing = await call(session, "list_files", vm=source, path="/root")
        assert {"name": "state", "type": "file", "size": 16, "mode": "0o644"} in listing["entries"]
        assert "[FILE_NOT_FOUND]" in await refused(session, "list_files", vm=source, path="/nowhere")
        assert "[EXEC_COMMAND_NOT_FOUND]" in await refused(session, "exec", vm=source, cmd=["no-such-command"])

        siblings = (await call(session, "fork", vm=source, n=2, name=f"{source}-f"))["names"]
        assert siblings == [f"{source}-f-0", f"{source}-f-1"]
        in_fork = await call(session, "exec", vm=siblings[1], cmd="hostname; cat /root/state")
        assert in_fork["stdout"] == f"{siblings[1]}\nbefore the fork\n"
        rows = {row["name"]: row for row in (await call(session, "list"))["vms"]}
        assert rows[siblings[0]]["forked_from"] == source and rows[siblings[0]]["owned_by_this_session"]
        assert [ancestor["name"] for ancestor in rows[siblings[0]]["lineage"]] == [source]
        assert rows[source]["lineage"] == [] and rows[source]["deadline"] == booted["deadline"]
        assert 0 < rows[source]["ttl_left_s"] <= 3600
        assert rows[siblings[0]]["deadline"] is None and rows[siblings[0]]["ttl_left_s"] is None  # no ttl of its own

        bundle = tmp_path / "bundle"
        assert (await call(session, "snapshot", vm=source, directory=str(bundle)))["size_bytes"] > 0
        restored = (await call(session, "restore", directory=str(bundle), name=f"{source}-r", detached=True))["name"]
        again = await call(session, "exec", vm=restored, cmd=["cat", "/root/state"])
        assert again["stdout"] == "before the fork\n"
        row = next(row for row in (await call(session, "list"))["vms"] if row["name"] == restored)
        assert row["restored_from"] == str(bundle.resolve()) and [a["name"] for a in row["lineage"]] == [source]

        assert (await call(session, "stop", vm=siblings[0]))["how"] == "stopped"
        await gone(siblings[0])
    # The session ended: the VMs it started stop with it, the detached one runs on.
    await gone(source, siblings[1])
    assert qemu_of(restored)
    machinen("stop", restored)


@asynccontextmanager
async def http_server(*options: str) -> AsyncIterator[str]:
    """`machinen mcp --http 127.0.0.1:0 ...` in a process of its own; yields its URL."""
    async with await anyio.open_process([*SERVER, "--http", "127.0.0.1:0", *options], stdin=-1) as process:
        lines = b""
        with anyio.fail_after(60):
            while b"/mcp\n" not in lines:
                lines += await process.stderr.receive()
        url = lines.decode().split("serving MCP on ")[1].split()[0]
        try:
            yield url
        finally:
            process.terminate()
            with anyio.fail_after(60):
                await process.wait()


async def test_http_needs_the_token_limits_refuse_and_the_session_end_stops_its_vm(anyio_backend, tmp_path):
    name = f"mcp-http-{anyio_backend}"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    async with http_server("--token-file", str(token_file), "--max-vms", "1") as url:
        hello = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        async with httpx2.AsyncClient() as plain:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                answer = await plain.post(url, json=hello, headers=headers)
                assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Bearer")

        authorized = create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"})
        async with (
            authorized,
            streamable_http_client(url, http_client=authorized) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            assert len((await session.list_tools()).tools) == 10
            await call(session, "boot", name=name)
            assert (await call(session, "exec", vm=name, cmd=["uname", "-s"]))["stdout"] == "Linux\n"
            assert "[MCP_LIMIT_VMS]" in await refused(session, "boot", name=f"{name}-2")
            assert "[MCP_LIMIT_VMS]" in await refused(session, "fork", vm=name, n=1)
            assert not qemu_of(f"{name}-2")
        # Leaving deleted the session (the server runs on): its VM stops.
        await gone(name)
