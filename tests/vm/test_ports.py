"""Host port forwards, tunnelled through the guest agent (real VMs)."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess

import anyio
import pytest
from net import free_port

from machinen_async import VM, MachinenError, boot, connect, restore
from machinen_async.protocol.ports import parse_port_forwards

pytestmark = pytest.mark.anyio

SERVE = "mkdir -p /srv && cd /srv && nohup python3 -m http.server {port} >/dev/null 2>&1 &"


async def http_get(port: int, path: str) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        response = b""
        async for chunk in stream:
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head[:100]
    return body


async def serve_http(vm: VM, port: int = 8000) -> None:
    """Serve /srv over HTTP in the guest; return once it accepts connections."""
    await vm.exec(["sh", "-c", SERVE.format(port=port) + " echo hello > /srv/index.html"], check=True)
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}))"
    ready = f'for i in $(seq 100); do python3 -c "{probe}" 2>/dev/null && exit 0; sleep 0.1; done; exit 1'
    await vm.exec(["sh", "-c", ready], check=True)


async def test_http_through_forwards_fork_and_conflicts(anyio_backend, tmp_path):
    host_port, fork_port, restore_port = free_port(), free_port(), free_port()
    async with boot(name=f"web-{anyio_backend}", ports=[f"{host_port}:8000"]) as vm:
        await serve_http(vm)
        assert await http_get(host_port, "/index.html") == b"hello\n"

        # large transfer, both directions of the tunnel under flow control
        await vm.exec(["sh", "-c", "head -c 24M /dev/urandom > /srv/big"], check=True)
        guest_sha = (await vm.exec(["sha256sum", "/srv/big"])).stdout.split()[0].decode()
        assert hashlib.sha256(await http_get(host_port, "/big")).hexdigest() == guest_sha

        # many concurrent connections
        bodies: list[bytes] = []

        async def one() -> None:
            bodies.append(await http_get(host_port, "/index.html"))

        async with anyio.create_task_group() as tg:
            for _ in range(32):
                tg.start_soon(one)
        assert bodies == [b"hello\n"] * 32

        # a port held by a VM: the error names it
        with pytest.raises(MachinenError) as in_use:
            async with boot(name=f"web2-{anyio_backend}", ports=[f"{host_port}:8000"]):
                pass
        assert in_use.value.code == "BOOT_PORT_FORWARD_IN_USE"
        assert f"VM 'web-{anyio_backend}'" in in_use.value.message

        # forks never inherit forwards; they take their own
        async with vm.fork(name=f"webkid-{anyio_backend}", ports=[f"{fork_port}:8000"]) as kid:
            assert "ports" in kid.info and kid.info["ports"] == [["127.0.0.1", fork_port, 8000]]
            await kid.write_file("/srv/index.html", b"kid\n")
            assert await http_get(fork_port, "/index.html") == b"kid\n"
            assert await http_get(host_port, "/index.html") == b"hello\n"
        async with vm.fork(name=f"webkid2-{anyio_backend}") as plain_kid:
            assert plain_kid.info["ports"] == []

        snap = await vm.snapshot(tmp_path / "web.snap")
    async with restore(snap.path, ports=[f"{restore_port}:8000"]) as again:
        assert await http_get(restore_port, "/index.html") == b"hello\n"
        assert again.info["ports"] == [["127.0.0.1", restore_port, 8000]]


async def test_port_errors(shared_vm):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MachinenError) as in_use:
            async with boot(ports=[(port, 80)]):
                pass
        assert in_use.value.code == "BOOT_PORT_FORWARD_IN_USE" and "another process" in in_use.value.message
    for bad in (["80"], ["x:80"], ["1.2.3:1:2"], [(0, 80)], ["9:99999"]):
        with pytest.raises(MachinenError) as invalid:
            async with boot(ports=bad):
                pass
        assert invalid.value.code == "PARSE_PORT_INVALID", bad
    async with connect(shared_vm) as vm:
        with pytest.raises(MachinenError) as many:
            await vm.fork(n=2, ports=["1234:80"])
        assert many.value.code == "PARSE_PORT_INVALID"


def test_port_spec_forms():
    assert parse_port_forwards(["3000:3000", "0.0.0.0:8080:80", (1, 2), ("::1", 5, 6), "[::1]:7:8"]) == [
        ["127.0.0.1", 3000, 3000],
        ["0.0.0.0", 8080, 80],
        ["127.0.0.1", 1, 2],
        ["::1", 5, 6],
        ["::1", 7, 8],
    ]


def test_cli_publish_and_ls_ports(cli):
    port = free_port()
    cli("boot", "--name", "cli-web", "-p", f"{port}:8000", "--detach")
    try:
        cli("exec", "cli-web", "--", "sh", "-c", SERVE.format(port=8000) + " echo cli > /srv/index.html",
            stdin=subprocess.DEVNULL)  # fmt: skip
        rows = {row["name"]: row for row in json.loads(cli("ls", "--json").stdout)}
        assert rows["cli-web"]["ports"] == [f"127.0.0.1:{port}->8000"]
        clash = cli("boot", "-p", f"{port}:80", "--detach", check=False)
        assert clash.returncode == 1 and b"BOOT_PORT_FORWARD_IN_USE" in clash.stderr and b"cli-web" in clash.stderr
        bad = cli("boot", "-p", "nope", "--detach", check=False)
        assert bad.returncode == 1 and b"error [PARSE_PORT_INVALID]" in bad.stderr
    finally:
        cli("stop", "cli-web", check=False)


DUPLEX_SERVER = """
import socket, threading
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 9000))
server.listen()
print("listening", flush=True)
conn, _ = server.accept()
writer = threading.Thread(target=conn.sendall, args=(b"x" * {size},))
writer.start()
received = 0
while data := conn.recv(1 << 16):
    received += len(data)
writer.join()
conn.sendall(b"|read %d" % received)
conn.close()
"""


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the relay is the supervisor's (asyncio); one is enough
async def test_forward_directions_are_independent(anyio_backend):
    """A TCP client that uploads everything before reading, to a server that writes while it reads:
    the upload must not wait behind the download the client is not reading yet (as on a direct connection)."""
    size = 32 * 1024 * 1024  # beyond every buffer on the way: the credit windows and both kernels'
    host_port = free_port()
    server_code = DUPLEX_SERVER.format(size=size)
    async with (
        boot(name="duplex", ports=[f"{host_port}:9000"]) as vm,
        vm.process(["python3", "-c", server_code], stdin=False) as server,
    ):
        assert await server.stdout.receive() == b"listening\n"
        with anyio.fail_after(240):
            async with await anyio.connect_tcp("127.0.0.1", host_port) as stream:
                payload = b"y" * (1 << 20)
                for _ in range(size // len(payload)):
                    await stream.send(payload)
                await stream.send_eof()
                response = bytearray()
                async for chunk in stream:
                    response += chunk
        assert await server.wait() == 0
    assert bytes(response) == b"x" * size + b"|read %d" % size
