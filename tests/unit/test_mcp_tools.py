"""`machinen mcp` without a VM: tool schemas, argument and limit refusals (through an in-process MCP
client), the bearer token, and the bounded output an exec keeps."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import machinen
from hypothesis import given
from hypothesis import strategies as st
from mcp.client.client import Client

from machinen_async import Secret, connect, stop_vm
from machinen_async.mcp_server import TOOLS, BearerToken, CappedOutput, Limits, make_server, vm_table
from machinen_async.store import registry

pytestmark = pytest.mark.anyio


def test_every_tool_has_a_closed_object_schema_and_a_description() -> None:
    assert [spec.name for spec in TOOLS] == ["boot", "exec", "read_file", "write_file", "list_files", "fork",
                                             "snapshot", "restore", "stop", "list"]  # fmt: skip
    for spec in TOOLS:
        tool = spec.tool({})
        schema = tool.input_schema
        assert tool.description and len(tool.description) > 40
        assert schema["type"] == "object" and schema["additionalProperties"] is False
        for name, prop in schema["properties"].items():
            assert prop.get("description") or name in ("cpus", "encoding", "append"), (spec.name, name)
    assert TOOLS[0].tool({}).input_schema["properties"]["ttl"]["anyOf"][0]["exclusiveMinimum"] == 0


async def test_secrets_are_the_servers_named_by_tools_and_never_shown(anyio_backend) -> None:
    """``machinen mcp --secret``: boot and restore list the names (and hosts) the server holds and
    take them by name; an unknown name is refused before anything starts; no value in any listing."""
    held = {"API_KEY": Secret("sk-never-shown-0123", hosts=["api.example.com"])}
    async with vm_table(Limits()) as table, Client(make_server(table, held), mode="legacy") as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        for name in ("boot", "restore"):
            assert "Secrets this server holds: API_KEY (for api.example.com)." in tools[name].description
            assert tools[name].input_schema["properties"]["secrets"]["type"] == "array"
        assert "inherit_secrets" in tools["fork"].input_schema["properties"]
        assert "sk-never-shown" not in repr(tools)
        result = await client.call_tool("boot", {"secrets": ["OTHER_KEY"]})
        assert result.is_error and result.content[0].text.startswith("[BOOT_SECRET_INVALID] this server holds no "
                                                                     "secret OTHER_KEY (it holds: API_KEY")  # fmt: skip
        assert table.tracked == {}


async def test_bad_arguments_unknown_vms_and_limits_are_tool_errors_with_their_code(anyio_backend) -> None:
    limits = Limits(max_vms=2, max_memory_mib=300)
    async with vm_table(limits) as table, Client(make_server(table), mode="legacy") as client:
        tools = await client.list_tools()
        assert len(tools.tools) == 10

        async def error_of(tool: str, arguments: dict) -> str:
            result = await client.call_tool(tool, arguments)
            assert result.is_error
            return result.content[0].text

        assert (await error_of("exec", {"vm": "x"})).startswith("[PARSE_ARGS] exec: cmd: Field required")
        assert (await error_of("exec", {"vm": "x", "cmd": "true", "bogus": 1})).startswith("[PARSE_ARGS]")
        assert (await error_of("nope", {})).startswith("[PARSE_ARGS] no tool 'nope'")
        assert (await error_of("exec", {"vm": "none-such", "cmd": "true"})).startswith("[REGISTRY_VM_NOT_FOUND]")
        assert (await error_of("boot", {"memory_mib": 512})).startswith("[MCP_LIMIT_MEMORY]")
        # Refused before anything starts: no VM is tracked, none listed.
        listed = await client.call_tool("list", {})
        assert json.loads(listed.content[0].text) == {"vms": []} and table.tracked == {}


@pytest.mark.usefixtures("fake_vmm")
async def test_a_ttl_is_the_supervisors_deadline_and_outlives_the_server(anyio_backend) -> None:
    """A ``ttl`` given to ``boot`` is the VM's own (its supervisor's deadline, which nothing in the
    server keeps); ``list`` shows it, the time it leaves, and the VM's lineage."""
    name = f"mcp-ttl-{anyio_backend}"
    before = time.time()
    async with vm_table(Limits()) as table, Client(make_server(table), mode="legacy") as client:
        booted = (await client.call_tool("boot", {"name": name, "ttl": 600, "detached": True})).structured_content
        async with connect(name) as vm:
            deadline = (await vm.describe())["deadline"]
        assert before + 600 <= deadline <= time.time() + 600
        assert booted["deadline"] == deadline and 0 < booted["ttl_left_s"] <= 600
        (row,) = (await client.call_tool("list", {})).structured_content["vms"]
        assert (row["name"], row["deadline"], row["lineage"], row["restored_from"]) == (name, deadline, [], None)
        assert 0 < row["ttl_left_s"] <= 600 and row["owned_by_this_session"] is False  # detached
    # The server is gone; the detached VM keeps the deadline its supervisor holds.
    assert [row["deadline"] for row in registry.list_rows() if row["name"] == name] == [deadline]
    await stop_vm(name)


async def test_limits_count_what_is_reserved_while_vms_start(anyio_backend) -> None:
    async with vm_table(Limits(max_vms=2)) as table:
        async with table.reserving(2, 256):
            with pytest.raises(Exception, match=r"\[MCP_LIMIT_VMS\]"):
                async with table.reserving(1, 256):
                    pass
        async with table.reserving(2, 256):  # released again
            pass


async def asgi_status(app: BearerToken, headers: list[tuple[bytes, bytes]]) -> int:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/mcp", "headers": headers}
    await app(scope, receive, send)
    return sent[0]["status"]


async def test_the_bearer_token_is_required(anyio_backend) -> None:
    async def inner(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    app = BearerToken(inner, "s3cret-token-of-length")
    assert await asgi_status(app, []) == 401
    assert await asgi_status(app, [(b"authorization", b"Bearer wrong")]) == 401
    assert await asgi_status(app, [(b"authorization", b"s3cret-token-of-length")]) == 401
    assert await asgi_status(app, [(b"authorization", b"Bearer s3cret-token-of-length")]) == 200


def test_a_token_file_too_short_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("short")
    result = machinen("mcp", "--http", "127.0.0.1:0", "--token-file", str(token_file), check=False)
    assert result.returncode == 1 and b"error [MCP_TOKEN_INVALID]" in result.stderr


@given(chunks=st.lists(st.binary(max_size=300), max_size=20), cap=st.integers(2, 600))
def test_capped_output_keeps_the_head_and_tail_and_counts_the_cut(chunks: list[bytes], cap: int) -> None:
    kept = CappedOutput(cap)
    for chunk in chunks:
        kept.add(chunk)
    whole = b"".join(chunks)
    assert len(kept.head) + len(kept.tail) <= cap
    assert kept.cut == max(0, len(whole) - cap)
    assert bytes(kept.head) == whole[: len(kept.head)]
    assert bytes(kept.tail) == whole[len(whole) - len(kept.tail) :]
    if kept.cut:
        assert f"[... {kept.cut} bytes cut ...]" in kept.text()
    else:
        assert kept.text() == whole.decode(errors="replace")
