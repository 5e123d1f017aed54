"""``machinen mcp``: the SDK's VM calls as MCP tools, for agents that reach a sandbox through MCP.

Built on the official ``mcp`` SDK's low-level ``Server`` (anyio, so it runs on our stack as is):
stdio by default, streamable HTTP with ``--http ADDR:PORT`` behind a bearer token.  Each tool's
arguments are a pydantic model: its JSON schema is what ``tools/list`` shows, and the same model
checks what a call sends.  A ``MachinenError`` comes back as a tool error ``[CODE] message``.

Ownership: a VM a tool starts belongs to the MCP session that started it and stops when that
session ends (stdio: the process's input closes; HTTP: the client deletes its session or it idles
out), unless it was started ``detached``.  A client of the per-request protocol era (2026-07-28,
no session) gets VMs that belong to the server, stopped when it exits.  ``ttl`` is the SDK's: the
VM's own supervisor stops it at its deadline, whether or not this server still runs.  ``--max-vms``
and ``--max-memory`` count the VMs this server started that still run.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import hmac
import json
import secrets as random_tokens
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Literal, TypeVar

import anyio
import anyio.abc

from .errors import (
    ArgumentError,
    BootError,
    ExecTimeoutError,
    GuestFileError,
    MachinenError,
    McpServerError,
    plain_errors,
)
from .protocol.messages import seconds_left
from .sdk.boot import boot, connect, restore, stop_vm
from .sdk.forks import close_all
from .sdk.host import Host
from .sdk.mounts import Mount
from .sdk.network import NetworkPolicy, Secret
from .sdk.process import ExecResult
from .sdk.vm import AGENT_TIMEOUT_SLACK_S, VM
from .store import bundle
from .version import __version__

try:
    import mcp_types as types
    import uvicorn
    from mcp.server.context import ServerRequestContext
    from mcp.server.lowlevel import Server
    from mcp.server.stdio import stdio_server
    from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.types import ASGIApp, Receive, Scope, Send
except ModuleNotFoundError as _missing:  # the CLI imports this module only for `machinen mcp`
    raise McpServerError(
        f"`machinen mcp` needs the mcp extra ({_missing.name} is not installed): pip install 'machinen_async[mcp]'",
        code="MCP_MISSING",
    ) from None

DEFAULT_OUTPUT_CAP = 64 * 1024  # per stream: what an LLM's context can take, not what the guest may print
MAX_OUTPUT_CAP = 4 * 1024 * 1024
DEFAULT_READ_CAP = 1024 * 1024
MAX_READ_CAP = 16 * 1024 * 1024
MIN_TOKEN_LENGTH = 16
LIST_FILES_TIMEOUT_S = 60.0
# Run by the guest's Python (the base image's, or the one machinen adds to an OCI image at
# /.machinen): one JSON line, entries of one directory, never more than the limit.
LIST_FILES_SCRIPT = r"""
import json, os, stat, sys
path, limit = sys.argv[1], int(sys.argv[2])
entries, truncated = [], False
try:
    with os.scandir(path) as found:
        for entry in found:
            if len(entries) == limit:
                truncated = True
                break
            info = entry.stat(follow_symlinks=False)
            kind = ("directory" if stat.S_ISDIR(info.st_mode) else "file" if stat.S_ISREG(info.st_mode)
                    else "symlink" if stat.S_ISLNK(info.st_mode) else "other")
            entries.append({"name": entry.name, "type": kind, "size": info.st_size,
                            "mode": oct(stat.S_IMODE(info.st_mode))})
except OSError as error:
    print(json.dumps({"errno": error.errno, "message": f"{path}: {error.strerror}"}))
    sys.exit(2)
entries.sort(key=lambda entry: entry["name"])
print(json.dumps({"entries": entries, "truncated": truncated}))
"""
GUEST_PYTHONS = ("python3", "/.machinen/bin/python3")  # the image's own, else the agent's


# ---------------------------------------------------------------------------------------------
# Tool arguments: each model is a tool's input schema and what checks a call's arguments.


class ToolArguments(BaseModel):
    model_config: ClassVar[ConfigDict] = ConfigDict(extra="forbid")


VMName = Annotated[str, Field(description="The VM's name, as `boot`, `fork`, `restore` or `list` gave it.")]
Seconds = Annotated[float, Field(gt=0, le=7 * 24 * 3600)]
Ttl = Annotated[
    Seconds | None,
    Field(
        description="Stop the VM this many seconds after it starts: its own supervisor does, even if this "
        "server is gone by then."
    ),
]
Detached = Annotated[
    bool,
    Field(description="Keep the VM running after this MCP session ends (default: it stops with the session)."),
]
Ports = Annotated[
    list[str],
    Field(description='Host TCP port -> guest port forwards, "[ADDR:]HOST:GUEST" (loopback unless ADDR).'),
]
Allow = Annotated[
    list[str],
    Field(
        description='What the guest may reach: names ("api.example.com", "*.example.com", either with ":PORT"; '
        "any name makes the policy an allow list: DNS answers only allowed names, connections go only to what "
        'they resolved to, TLS SNI / HTTP Host checked) or addresses the policy closes ("ADDR[/PREFIX][:PORT]"; '
        "the host's own loopback is 10.0.2.2 from the guest)."
    ),
]
Deny = Annotated[
    list[str],
    Field(description='Names or addresses the guest may not reach (its DNS answers NXDOMAIN); wins over "allow".'),
]
SecretNames = Annotated[
    list[str],
    Field(
        description="Names of secrets this server holds (`machinen mcp --secret`; the tool's description lists "
        "them) to give the VM: the guest's environment variable NAME holds a placeholder, and HTTPS requests to "
        "the secret's hosts carry the value in its place. The value never enters the VM or this conversation."
    ),
]


class BootArguments(ToolArguments):
    image: str | None = Field(
        None,
        description="A rootfs tarball path, or an OCI / Docker image reference (python:3.12-slim, "
        "registry:5000/team/agent:tag, oci:DIR[:TAG], docker-archive:FILE). Default: the Debian base "
        "(python3, coreutils).",
    )
    name: str | None = Field(None, description="The VM's name (default: generated).")
    memory_mib: int = Field(256, ge=64, le=1 << 20, description="Guest RAM in MiB.")
    cpus: int = Field(1, ge=1, le=64)
    mounts: list[str] = Field([], description='Host directories copied into the guest at boot: "HOST:GUEST[:ro|rw]".')
    live_mounts: list[str] = Field(
        [],
        description='Host directories live in the guest, both ways (kept by forks): "HOST:GUEST[:ro|rw]". '
        "A read-write one lets the guest change those host files.",
    )
    ports: Ports = []
    network: bool = Field(
        True, description="Outbound network (NAT, DNS) with the host closed; false: no network device at all."
    )
    allow: Allow = []
    deny: Deny = []
    secrets: SecretNames = []
    ttl: Ttl = None
    detached: Detached = False


class ExecArguments(ToolArguments):
    vm: VMName
    cmd: str | list[str] = Field(
        description='The command: an argv list (["ls", "-l", "/"]) run as is, or a string run by /bin/sh -c.'
    )
    timeout: Seconds = Field(300.0, description="Kill the command (its whole process group) after this many seconds.")
    stdin: str | None = Field(None, description="Text sent to the command's standard input, then closed.")
    env: dict[str, str] = Field({}, description="Environment variables added to the image's.")
    cwd: str | None = Field(None, description="Working directory (default: the image's, else /).")
    user: str | None = Field(None, description='"USER[:GROUP]" (names or ids); default the image\'s user, else root.')
    max_output_bytes: int = Field(
        DEFAULT_OUTPUT_CAP,
        ge=1024,
        le=MAX_OUTPUT_CAP,
        description="Per stream, what the result keeps: the first and last halves of this many bytes, with a "
        "note of how many bytes in between were cut (the whole output still streams as progress "
        "notifications when the call asks for progress).",
    )


class ReadFileArguments(ToolArguments):
    vm: VMName
    path: str = Field(description="Absolute path in the guest.")
    max_bytes: int = Field(
        DEFAULT_READ_CAP, ge=1, le=MAX_READ_CAP, description="A larger file is refused (FILE_TOO_LARGE)."
    )


class WriteFileArguments(ToolArguments):
    vm: VMName
    path: str = Field(description="Absolute path in the guest; replaced atomically unless append.")
    content: str = Field(description="The file's content, as text or base64 (see encoding).")
    encoding: Literal["utf-8", "base64"] = "utf-8"
    mode: int = Field(0o644, ge=0, le=0o7777, description="Permission bits, as a decimal number (420 is 0o644).")
    append: bool = False
    parents: bool = Field(False, description="Create missing parent directories.")


class ListFilesArguments(ToolArguments):
    vm: VMName
    path: str = Field("/", description="A directory in the guest.")
    max_entries: int = Field(1000, ge=1, le=10_000, description="More entries than this: `truncated` is true.")


class ForkArguments(ToolArguments):
    vm: VMName
    n: int = Field(1, ge=1, le=64, description="How many siblings.")
    name: str | None = Field(None, description="Name prefix: NAME-0, NAME-1, ... (default: generated).")
    inherit_secrets: bool = Field(
        False, description="Give the siblings the VM's secrets (default: their placeholders go out as they are)."
    )
    ttl: Ttl = None
    detached: Detached = False


class SnapshotArguments(ToolArguments):
    vm: VMName
    directory: str = Field(description="A host directory, new or empty, for the bundle.")


class RestoreArguments(ToolArguments):
    directory: str = Field(description="A bundle directory `snapshot` wrote (by this user: others are refused).")
    name: str | None = Field(None, description="The restored VM's name (default: generated).")
    ports: Ports = []
    allow: Allow = []
    deny: Deny = []
    secrets: SecretNames = []
    ttl: Ttl = None
    detached: Detached = False


class StopArguments(ToolArguments):
    vm: VMName


class ListArguments(ToolArguments):
    pass


@dataclass(frozen=True)
class ToolSpec:
    name: str
    arguments: type[ToolArguments]
    description: str
    read_only: bool = False
    destructive: bool = False

    def tool(self, secrets: Mapping[str, Secret]) -> types.Tool:
        """The tool as listed; one that takes ``secrets`` names those this server holds (no value)."""
        held = ", ".join(f"{name} (for {', '.join(secret.hosts)})" for name, secret in secrets.items()) or "none"
        takes = "secrets" in self.arguments.model_fields
        return types.Tool(
            name=self.name,
            description=f"{self.description} Secrets this server holds: {held}." if takes else self.description,
            input_schema=self.arguments.model_json_schema(),
            annotations=types.ToolAnnotations(read_only_hint=self.read_only, destructive_hint=self.destructive),
        )


TOOLS = (
    ToolSpec("boot", BootArguments,
             "Boot a Linux microVM (a full kernel, its own root filesystem) and return its name. It runs commands "
             "(`exec`), holds files, and can be forked (`fork`) and snapshotted (`snapshot`). It stops when this "
             "session ends unless `detached`."),
    ToolSpec("exec", ExecArguments,
             "Run a command in a VM to completion and return its exit code, stdout and stderr (capped: the "
             "first and last halves of max_output_bytes, and how many bytes were cut). A non-zero exit is a "
             "normal result; a timeout is an error (EXEC_AGENT_TIMEOUT) with the partial output."),
    ToolSpec("read_file", ReadFileArguments,
             "Read a file of a VM: text when it is UTF-8, else base64 (`encoding` says which).", read_only=True),
    ToolSpec("write_file", WriteFileArguments, "Write a file in a VM from text or base64: replaced atomically, or appended to; `parents` creates "
             "missing directories."),
    ToolSpec("list_files", ListFilesArguments,
             "List one directory of a VM: name, type (file, directory, symlink, other), size, mode; sorted by "
             "name. Needs a Python in the guest (every image machinen boots has one).", read_only=True),
    ToolSpec("fork", ForkArguments,
             "Start `n` copies of a running VM from this instant (memory shared copy-on-write, each with its "
             "own disk layer); the VM itself pauses briefly and runs on. Returns the siblings' names: each is "
             "a VM of its own (exec, files, fork, stop)."),
    ToolSpec("snapshot", SnapshotArguments,
             "Write a restorable bundle of a running VM (memory, devices, disk) to a host directory; the VM "
             "pauses briefly and runs on. `restore` starts a VM from it, any number of times."),
    ToolSpec("restore", RestoreArguments,
             "Start a VM from a bundle `snapshot` wrote: it continues exactly where the snapshot was taken "
             "(processes, files, memory). Returns its name."),
    ToolSpec("stop", StopArguments, "Stop a VM and remove its files (any VM of this host, by name).",
             destructive=True),
    ToolSpec("list", ListArguments,
             "List the running VMs of this host: name, memory, uptime, how it started (cold, warm, fork, "
             "restore), ports, `forked_from` (its parent), `lineage` (its ancestors, root first and its parent "
             "last: {name, taken_at}, the epoch seconds of the fork or snapshot it came from), `restored_from` "
             "(the bundle of a restore), `deadline` (epoch seconds, or null: no ttl) and `ttl_left_s`, and, for "
             "VMs this server started, whether this session owns it.", read_only=True),
)  # fmt: skip
SPECS = {spec.name: spec for spec in TOOLS}


# ---------------------------------------------------------------------------------------------
# Output a tool keeps: bounded however much the guest prints.


@dataclass
class CappedOutput:
    """The first and last ``cap // 2`` bytes of a stream, and how many bytes between them were cut."""

    cap: int
    head: bytearray = field(default_factory=bytearray)
    tail: bytearray = field(default_factory=bytearray)
    cut: int = 0

    def add(self, data: bytes) -> None:
        room = self.cap // 2 - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        self.tail += data
        excess = len(self.tail) - (self.cap - self.cap // 2)
        if excess > 0:
            del self.tail[:excess]
            self.cut += excess

    def text(self) -> str:
        if not self.cut:
            return (self.head + self.tail).decode(errors="replace")
        note = f"\n[... {self.cut} bytes cut ...]\n"
        return self.head.decode(errors="replace") + note + self.tail.decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# The VMs this server started.


Owner = object  # a session's key: its MCP connection, or SERVER_OWNED


SERVER_OWNED: Owner = object()


@dataclass
class Tracked:
    vm: VM
    memory_mib: int
    owner: Owner
    detached: bool


@dataclass(frozen=True)
class Limits:
    max_vms: int | None = None
    max_memory_mib: int | None = None


Started = TypeVar("Started")


class VMTable:
    """The VMs this server started and still tracks, by name; limits are checked against them."""

    def __init__(self, limits: Limits, tasks: anyio.abc.TaskGroup) -> None:
        self.limits = limits
        self.tasks = tasks
        self.tracked: dict[str, Tracked] = {}
        self._reserved_vms = 0
        self._reserved_mib = 0

    async def _forget_gone(self) -> None:
        """VMs stopped elsewhere (`machinen stop`, the CLI) no longer count."""
        running = {row.get("name") for row in await Host.local().list()}
        for name in [name for name in self.tracked if name not in running]:
            self.forget(name)

    @contextlib.asynccontextmanager
    async def reserving(self, count: int, memory_mib: int) -> AsyncIterator[None]:
        """Room for ``count`` VMs of ``memory_mib`` each, held while they start; refused when the
        server's limits would be passed."""
        if self.limits.max_vms is not None or self.limits.max_memory_mib is not None:
            await self._forget_gone()
        vms = len(self.tracked) + self._reserved_vms + count
        mib = sum(t.memory_mib for t in self.tracked.values()) + self._reserved_mib + count * memory_mib
        if self.limits.max_vms is not None and vms > self.limits.max_vms:
            raise McpServerError(
                f"{count} more VM(s) would make {vms}, over this server's --max-vms {self.limits.max_vms}: "
                "stop one first",
                code="MCP_LIMIT_VMS",
                retryable=True,
            )
        if self.limits.max_memory_mib is not None and mib > self.limits.max_memory_mib:
            raise McpServerError(
                f"{count} more VM(s) of {memory_mib} MiB would make {mib} MiB of guest memory, over this server's "
                f"--max-memory {self.limits.max_memory_mib} MiB: stop one first",
                code="MCP_LIMIT_MEMORY",
                retryable=True,
            )
        self._reserved_vms += count
        self._reserved_mib += count * memory_mib
        try:
            yield
        finally:
            self._reserved_vms -= count
            self._reserved_mib -= count * memory_mib

    def track(self, vm: VM, owner: Owner, *, detached: bool) -> None:
        self.tracked[vm.name] = Tracked(vm, vm.info["memory_mib"], owner, detached)

    def forget(self, name: str) -> Tracked | None:
        return self.tracked.pop(name, None)

    @contextlib.asynccontextmanager
    async def handle(self, name: str) -> AsyncIterator[VM]:
        """The VM ``name``: the handle this server holds, else a connection for this call."""
        tracked = self.tracked.get(name)
        if tracked is not None:
            yield tracked.vm
            return
        async with connect(name) as vm:
            yield vm

    def end_session(self, owner: Owner) -> None:
        """The session ``owner`` ended: its VMs stop (in the background: a session's teardown is
        bounded), detached ones are only disconnected."""
        ended = [name for name, tracked in self.tracked.items() if tracked.owner is owner]
        self.tasks.start_soon(close_all, [t.vm for t in (self.forget(name) for name in ended) if t is not None])

    async def aclose(self) -> None:
        await close_all([t.vm for t in (self.forget(name) for name in list(self.tracked)) if t is not None])


# ---------------------------------------------------------------------------------------------
# The tools.


Payload = dict[str, object]
Progress = Callable[[float, str], Awaitable[None]]


class Tools:
    """What each tool does, on the SDK; ``owner`` is the calling session.  ``secrets``: those this
    server holds (``--secret``), which a boot or restore names to give them to its VM."""

    def __init__(self, table: VMTable, secrets: Mapping[str, Secret]) -> None:
        self.table = table
        self.secrets = secrets

    def _secrets_named(self, names: Sequence[str]) -> dict[str, Secret] | None:
        unknown = [name for name in names if name not in self.secrets]
        if unknown:
            raise BootError(f"this server holds no secret {', '.join(unknown)} (it holds: "
                            f"{', '.join(self.secrets) or 'none'}; `machinen mcp --secret` gives it some)",
                            code="BOOT_SECRET_INVALID")  # fmt: skip
        return {name: self.secrets[name] for name in names} or None

    async def boot(self, args: BootArguments, owner: Owner, progress: Progress) -> Payload:
        mounts = [
            *(Mount.parse(spec) for spec in args.mounts),
            *(Mount.parse(spec, live=True) for spec in args.live_mounts),
        ]
        network: bool | NetworkPolicy = (
            NetworkPolicy(allow=args.allow, deny=args.deny)
            if args.network and (args.allow or args.deny)
            else args.network
        )
        async with self.table.reserving(1, args.memory_mib):
            vm = await boot(
                args.image, name=args.name, memory_mib=args.memory_mib, cpus=args.cpus, mounts=mounts,
                ports=args.ports, network=network, detached=args.detached, ttl=args.ttl,
                secrets=self._secrets_named(args.secrets),
            )  # fmt: skip
            self.table.track(vm, owner, detached=args.detached)
        return _described(vm)

    async def exec(self, args: ExecArguments, owner: Owner, progress: Progress) -> Payload:
        stdout, stderr = CappedOutput(args.max_output_bytes), CappedOutput(args.max_output_bytes)
        streamed = 0

        async def pump(chunks: AsyncIterator[bytes], into: CappedOutput, label: str) -> None:
            nonlocal streamed
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            async for chunk in chunks:
                into.add(chunk)
                streamed += len(chunk)
                await progress(streamed, f"{label}: {decoder.decode(chunk)}")

        async with self.table.handle(args.vm) as vm:
            with anyio.move_on_after(args.timeout + AGENT_TIMEOUT_SLACK_S) as backstop, plain_errors():
                async with vm.process(args.cmd, env=args.env, cwd=args.cwd, stdin=args.stdin is not None,
                                      timeout=args.timeout, user=args.user) as proc:  # fmt: skip
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(pump, proc.stdout, stdout, "stdout")
                        tg.start_soon(pump, proc.stderr, stderr, "stderr")
                        if args.stdin is not None:
                            await proc.stdin.send(args.stdin.encode())
                            await proc.stdin.aclose()
                    exit_code = await proc.wait()
        outcome: Payload = {"stdout": stdout.text(), "stderr": stderr.text(),
                            "stdout_cut_bytes": stdout.cut, "stderr_cut_bytes": stderr.cut}  # fmt: skip
        if backstop.cancelled_caught or proc.timed_out:
            raise ExecTimeoutError(
                f"{args.cmd!r} timed out after {args.timeout:g} s and was killed; partial output: {json.dumps(outcome)}"
            )
        return {"exit_code": exit_code, "signal": proc.signal, **outcome}

    async def read_file(self, args: ReadFileArguments, owner: Owner, progress: Progress) -> Payload:
        async with self.table.handle(args.vm) as vm:
            data = await vm.read_file(args.path, max_output=args.max_bytes)
        try:
            return {"path": args.path, "size": len(data), "encoding": "utf-8", "content": data.decode()}
        except UnicodeDecodeError:
            return {
                "path": args.path,
                "size": len(data),
                "encoding": "base64",
                "content": base64.b64encode(data).decode(),
            }

    async def write_file(self, args: WriteFileArguments, owner: Owner, progress: Progress) -> Payload:
        try:
            data = base64.b64decode(args.content, validate=True) if args.encoding == "base64" else args.content.encode()
        except ValueError as error:
            raise ArgumentError(f"content is not base64: {error}", code="PARSE_ARGS") from None
        async with self.table.handle(args.vm) as vm:
            await vm.write_file(args.path, data, mode=args.mode, append=args.append, parents=args.parents)
        return {"path": args.path, "bytes": len(data)}

    async def list_files(self, args: ListFilesArguments, owner: Owner, progress: Progress) -> Payload:
        async with self.table.handle(args.vm) as vm:
            result = await _run_guest_python(vm, [LIST_FILES_SCRIPT, args.path, str(args.max_entries)])
        listing: Payload = json.loads(result.stdout)
        if result.exit_code == 2:  # the script's own report of an OSError
            raise GuestFileError(
                str(listing["message"]), code=_FILE_CODE_OF_ERRNO.get(listing["errno"], "FILE_IO_ERROR")
            )
        return {"path": args.path, **listing}

    async def fork(self, args: ForkArguments, owner: Owner, progress: Progress) -> Payload:
        async with self.table.handle(args.vm) as vm, self.table.reserving(args.n, vm.info["memory_mib"]):
            forks = await vm.fork(n=args.n, name=args.name, detached=args.detached, ttl=args.ttl,
                                  secrets="inherit" if args.inherit_secrets else None)  # fmt: skip
            for sibling in forks:
                self.table.track(sibling, owner, detached=args.detached)
        return {"names": [sibling.name for sibling in forks]}

    async def snapshot(self, args: SnapshotArguments, owner: Owner, progress: Progress) -> Payload:
        async with self.table.handle(args.vm) as vm:
            info = await vm.snapshot(args.directory)
        return {"bundle": str(info.path), "pause_ms": info.pause_ms, "size_bytes": info.size_bytes}

    async def restore(self, args: RestoreArguments, owner: Owner, progress: Progress) -> Payload:
        checked = await anyio.to_thread.run_sync(bundle.inspect, Path(args.directory))
        async with self.table.reserving(1, checked.manifest.machine.memory_mib):
            vm = await restore(args.directory, name=args.name, ports=args.ports, detached=args.detached,
                               network=NetworkPolicy(allow=args.allow, deny=args.deny), ttl=args.ttl,
                               secrets=self._secrets_named(args.secrets))  # fmt: skip
            self.table.track(vm, owner, detached=args.detached)
        return _described(vm)

    async def stop(self, args: StopArguments, owner: Owner, progress: Progress) -> Payload:
        tracked = self.table.forget(args.vm)
        how = await (tracked.vm.stop() if tracked is not None else stop_vm(args.vm))
        return {"name": args.vm, "how": how}

    async def list(self, args: ListArguments, owner: Owner, progress: Progress) -> Payload:
        now = time.time()
        rows: list[Payload] = []
        for row in await Host.local().list():  # lineage, restored_from and deadline included
            tracked = self.table.tracked.get(row.get("name", ""))
            extra: Payload = {"ttl_left_s": seconds_left(row.get("deadline"), now)}
            if tracked is not None:
                extra["owned_by_this_session"] = tracked.owner is owner and not tracked.detached
            rows.append({**row, **extra})
        return {"vms": rows}


_FILE_CODE_OF_ERRNO = {2: "FILE_NOT_FOUND", 13: "FILE_PERMISSION_DENIED", 1: "FILE_PERMISSION_DENIED"}


async def _run_guest_python(vm: VM, arguments: Sequence[str]) -> ExecResult:
    """``python -c`` in the guest: the image's python3, else the one machinen put in an OCI image."""
    for python in GUEST_PYTHONS:
        try:
            return await vm.exec([python, "-c", *arguments], timeout=LIST_FILES_TIMEOUT_S, max_output=MAX_OUTPUT_CAP)
        except MachinenError as error:
            if error.code != "EXEC_COMMAND_NOT_FOUND" or python == GUEST_PYTHONS[-1]:
                raise
    raise AssertionError("unreachable: the last interpreter's error is raised")


def _described(vm: VM) -> Payload:
    info = vm.info
    return {"name": vm.name, "memory_mib": info["memory_mib"], "cpus": info["cpus"], "start": info["start"],
            "boot_s": info["boot_s"], "detached": info["detached"], "ports": info["ports"],
            "deadline": info["deadline"], "ttl_left_s": seconds_left(info["deadline"], time.time())}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The MCP server: tools/list, tools/call, sessions.


def _owner_of(ctx: ServerRequestContext[VMTable]) -> Owner:
    """The calling session: its MCP connection, which lasts as long as the session in the handshake
    era (stdio, stateful HTTP).  The SDK does not expose it on a request's context (mcp 2.3), so it is
    read from the session object; without it, or in the per-request era, VMs belong to the server."""
    connection = getattr(ctx.session, "_connection", None)
    if connection is None or ctx.protocol_version not in HANDSHAKE_PROTOCOL_VERSIONS:
        return SERVER_OWNED
    if "machinen" not in connection.state:
        connection.state["machinen"] = True
        table = ctx.lifespan_context
        connection.exit_stack.callback(table.end_session, connection)
    owner: Owner = connection
    return owner


def _tool_result(payload: Payload) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=json.dumps(payload))], structured_content=payload
    )


def _tool_error(error: MachinenError) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=str(error))], is_error=True)


def make_server(table: VMTable, secrets: Mapping[str, Secret] | None = None) -> Server[VMTable]:
    tools = Tools(table, secrets or {})
    listed = types.ListToolsResult(tools=[spec.tool(tools.secrets) for spec in TOOLS])

    async def list_tools(
        ctx: ServerRequestContext[VMTable], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return listed

    async def call_tool(
        ctx: ServerRequestContext[VMTable], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        spec = SPECS.get(params.name)
        try:
            if spec is None:
                raise ArgumentError(f"no tool {params.name!r}: the tools are {', '.join(SPECS)}", code="PARSE_ARGS")
            try:
                args = spec.arguments.model_validate(params.arguments or {})
            except ValidationError as invalid:
                problems = "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in invalid.errors()
                )
                raise ArgumentError(f"{params.name}: {problems}", code="PARSE_ARGS") from None

            async def progress(done: float, message: str) -> None:
                await ctx.session.report_progress(done, None, message)

            with plain_errors():
                payload = await getattr(tools, spec.name)(args, _owner_of(ctx), progress)
        except MachinenError as error:
            return _tool_error(error)
        return _tool_result(payload)

    @contextlib.asynccontextmanager
    async def lifespan(_: Server[VMTable]) -> AsyncIterator[VMTable]:
        yield table

    return Server(
        "machinen",
        version=__version__,
        instructions="Linux microVMs: boot one, exec commands and move files in it, fork it into copies that "
        "start from the same instant, snapshot and restore it. VMs this session boots stop when it ends "
        "unless booted detached.",
        lifespan=lifespan,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


@contextlib.asynccontextmanager
async def vm_table(limits: Limits) -> AsyncIterator[VMTable]:
    """The server's VMs; leaving stops those it owns (the sessions' that are left, the server's)."""
    async with anyio.create_task_group() as tasks:
        table = VMTable(limits, tasks)
        try:
            yield table
        finally:
            await table.aclose()
            tasks.cancel_scope.cancel()  # session teardowns already started finish (shielded)


async def serve_stdio(limits: Limits, secrets: Mapping[str, Secret]) -> None:
    async with vm_table(limits) as table:
        server = make_server(table, secrets)
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())


# ---------------------------------------------------------------------------------------------
# Streamable HTTP behind a bearer token.


class BearerToken:
    """ASGI middleware: every HTTP request needs ``Authorization: Bearer TOKEN`` (compared in
    constant time); anything else is a 401 before it reaches the MCP app."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected: bytes = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = next((value for key, value in scope["headers"] if key == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"www-authenticate", b'Bearer realm="machinen"'),
                                        (b"content-type", b"text/plain")]})  # fmt: skip
                await send({"type": "http.response.body", "body": b"a bearer token is required\n"})
                return
        await self.app(scope, receive, send)


def read_token(token_file: str | None) -> tuple[str, bool]:
    """(token, whether it was generated): read from ``token_file``, else a new random one."""
    if token_file is None:
        return random_tokens.token_urlsafe(32), True
    try:
        token = Path(token_file).read_text().strip()
    except OSError as error:
        raise McpServerError(f"--token-file {token_file}: {error.strerror}", code="MCP_TOKEN_INVALID") from None
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() or not c.isprintable() for c in token):
        raise McpServerError(
            f"--token-file {token_file}: the token must be at least {MIN_TOKEN_LENGTH} printable characters "
            "without spaces",
            code="MCP_TOKEN_INVALID",
        )
    return token, False


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise McpServerError(f"--http takes ADDR:PORT (127.0.0.1:8765), got {address!r}", code="MCP_ADDRESS_INVALID")
    return host.strip("[]"), int(port)


async def serve_http(
    limits: Limits, secrets: Mapping[str, Secret], address: str, token_file: str | None, say: Callable[[str], None]
) -> None:
    host, port = parse_address(address)
    token, generated = read_token(token_file)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
    except OSError as error:
        listener.close()
        raise McpServerError(f"--http {address}: {error.strerror}", code="MCP_ADDRESS_INVALID") from None
    bound = listener.getsockname()[1]
    async with vm_table(limits) as table:
        app = make_server(table, secrets).streamable_http_app(host=host)
        config = uvicorn.Config(BearerToken(app, token), log_level="warning", lifespan="on")
        say(f"serving MCP on http://{address.rpartition(':')[0]}:{bound}/mcp")
        if generated:
            say(f"bearer token: {token}")
        await uvicorn.Server(config).serve(sockets=[listener])


def serve(
    *, http: str | None, token_file: str | None, limits: Limits, say: Callable[[str], None],
    secrets: Mapping[str, Secret] | None = None,
) -> Awaitable[None]:  # fmt: skip
    """What ``machinen mcp`` runs: stdio, or streamable HTTP on ``http`` (ADDR:PORT); ``secrets``
    (``--secret``) are the server's to give VMs, by name."""
    if http is None:
        if token_file is not None:
            raise ArgumentError("--token-file goes with --http (stdio needs no token)", code="PARSE_ARGS")
        return serve_stdio(limits, secrets or {})
    return serve_http(limits, secrets or {}, http, token_file, say)


__all__ = ["TOOLS", "CappedOutput", "Limits", "VMTable", "make_server", "serve"]
