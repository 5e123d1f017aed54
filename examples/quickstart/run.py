"""machinen's quickstart, in Python: bake, boot, snapshot, restore, fork.

    python examples/quickstart/run.py [--port 3000] [--rebake]

1. Bake: provision an image from the Debian base with curl installed (outbound
   network in the install hook) and counter.py as its default cmd.
2. Boot it with a port forward; the counter counts in memory.
3. Snapshot, stop, restore: the same process continues counting.
4. Fork the restored VM: both continue from the same count, independently.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import anyio

from machinen_async import VM, boot, provision, restore

HERE = Path(__file__).resolve().parent
IMAGE = HERE / "counter.tar.gz"


async def install(vm: VM) -> None:
    await vm.exec("apt-get update -q && apt-get install -y -q --no-install-recommends curl", check=True, timeout=600)
    await vm.write_file("/opt/counter.py", (HERE / "counter.py").read_bytes(), parents=True)


async def http_count(port: int) -> int:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(b"GET / HTTP/1.0\r\n\r\n")
        response = b"".join([chunk async for chunk in stream])
    count: int = json.loads(response.split(b"\r\n\r\n", 1)[1])["count"]
    return count


async def curl_inside(vm: VM) -> int:
    count: int = json.loads((await vm.exec(["curl", "-s", "localhost:3000"], check=True)).stdout)["count"]
    return count


async def wait_for_server(vm: VM) -> None:
    await vm.exec(
        [
            "sh",
            "-c",
            "for i in $(seq 100); do curl -s localhost:3000 >/dev/null 2>&1 && exit 0; sleep 0.1; done; exit 1",
        ]
    )


async def main(port: int, rebake: bool) -> None:
    if rebake or not IMAGE.exists():
        started = time.perf_counter()
        await provision(
            install=install, cmd=["python3", "/opt/counter.py"], out=IMAGE, progress=lambda m: print(f"  {m}")
        )
        print(f"1. baked {IMAGE.name} in {time.perf_counter() - started:.0f} s")
    else:
        print(f"1. using {IMAGE.name} (--rebake to bake again)")
    # wait_for_server's own curl is hit 1 (or more): the counts below continue from it.
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        async with boot(IMAGE, name="counter", ports=[f"{port}:3000"]) as vm:
            await wait_for_server(vm)
            print(f"2. booted; curl localhost:{port} -> count {await http_count(port)}, then {await http_count(port)}")
            snap = await vm.snapshot(Path(tmp) / "counter.snap")
        print(f"3. snapshot taken (VM paused {snap.pause_ms:.0f} ms), VM stopped")
        async with restore(snap.path, name="counter", ports=[f"{port}:3000"]) as vm:
            print(f"   restored; curl localhost:{port} -> count {await http_count(port)}  <- same process")
            async with vm.fork(name="counter-b") as fork:
                a, b = await curl_inside(vm), await curl_inside(fork)
                b2, a2 = await curl_inside(fork), await curl_inside(vm)
                print(f"4. forked: counter -> {a}, counter-b -> {b}, counter-b -> {b2}, counter -> {a2}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--rebake", action="store_true")
    arguments = parser.parse_args()
    anyio.run(main, arguments.port, arguments.rebake)
