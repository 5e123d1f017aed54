"""machinen's live-mount example: a host directory mounted into the guest, both ways, no rebuild on edit.

    python examples/live-mount/run.py [--port 8000] [--site DIR]

1. Boot with DIR (default: a copy of ./site) live at /site and a web server in
   the guest serving it, on host port PORT.
2. Fetch the page; edit the file on the host; fetch again: the guest serves the
   new content without a restart.
3. The guest writes a file into /site: it is on the host at once.
4. Fork: the sibling serves the same directory.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import anyio

from machinen_async import Mount, boot

HERE = Path(__file__).resolve().parent
SERVER = ["python3", "-m", "http.server", "8000", "--directory", "/site", "--bind", "127.0.0.1"]


async def fetch(port: int, path: str = "/") -> bytes:
    """The body of GET ``path``, once the server answers (it starts with the VM)."""
    for _ in range(300):
        try:
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                response = b"".join([chunk async for chunk in stream])
            if response.startswith(b"HTTP/1.0 200"):
                return response.split(b"\r\n\r\n", 1)[1]
        except (OSError, anyio.EndOfStream):
            pass
        await anyio.sleep(0.1)
    raise RuntimeError(f"nothing served on port {port}")


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        site = Path(args.site) if args.site else Path(shutil.copytree(HERE / "site", Path(scratch) / "site"))
        async with boot(mounts=[Mount(str(site), "/site", live=True)], cmd=SERVER, ports=[f"{args.port}:8000"]) as vm:
            print("served:", (await fetch(args.port)).decode().strip())
            (site / "index.html").write_text("<h1>edited on the host</h1>\n")
            print("after the edit:", (await fetch(args.port)).decode().strip())
            await vm.exec(["sh", "-c", "date > /site/written-by-the-guest.txt"], check=True)
            print("the guest wrote:", (site / "written-by-the-guest.txt").read_text().strip() != "")
            async with vm.fork(ports=[f"{args.port + 1}:8000"]) as sibling:
                print("the fork serves:", (await fetch(args.port + 1)).decode().strip(), f"({sibling.name})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--site", help="A directory to serve (default: a copy of examples/live-mount/site).")
    anyio.run(main, parser.parse_args())
