"""``VM``: the handle to one running VM -- exec, processes, files, fork, snapshot, handoff, stop.

A ``VM`` talks to its per-VM supervisor over one unix socket, multiplexing
any number of concurrent calls (see ``protocol.mux``).  What depends on
where the VM runs (forking it, moving it, stopping it) goes to its ``Host``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

import anyio

from ..errors import BootError, ExecError, ExecTimeoutError, GuestFileError, MachinenError, plain_errors
from ..hosts.base import DEFAULT_BOOT_TIMEOUT_S, Connection, HostPool, close_connections
from ..protocol import wire
from ..protocol.guest_abi import ExecRequest
from ..protocol.messages import (
    AgentInfo,
    Ancestor,
    Pong,
    PortForward,
    VMDescription,
    VMInfo,
    VMMetrics,
    checked_ttl,
)
from ..protocol.netpolicy import NetworkPolicy
from ..protocol.ports import PortSpec
from ..protocol.secret import SecretRule
from ..store import registry
from .handoff import HandoffReport, handoff
from .process import Command, ExecResult, Process, ProcessOutput, argv_of

if TYPE_CHECKING:
    from .forks import Forks, Launch
    from .host import Host
    from .mounts import Mount

DEFAULT_EXEC_TIMEOUT_S = 300.0
# What exec() keeps of each output stream and read_file() of a file, in host
# memory; beyond it the call fails (the guest decides how much it writes).
DEFAULT_MAX_OUTPUT = 256 * 1024 * 1024
# Host-side backstop beyond the agent's own timeout, for a guest that froze.
AGENT_TIMEOUT_SLACK_S = 10.0
# ping() and describe(): an agent answers them at once; one that does not in this long is stuck.
DEFAULT_CALL_TIMEOUT_S = 10.0
# read_file() and write_file() fail after this long without progress (no chunk moved, no outcome),
# however large the file.
DEFAULT_FILE_STALL_S = 30.0
# reset_agent_channel(): the agent must answer the new session's HELLO within this.
DEFAULT_RESET_TIMEOUT_S = 30.0


@contextmanager
def _deadline(seconds: float | None, what: str) -> Iterator[None]:
    """Fail with ``ExecTimeoutError`` (EXEC_AGENT_TIMEOUT) when the block has not finished within
    ``seconds`` (None: no limit); ``what`` completes "the guest agent did not ..."."""
    with anyio.move_on_after(seconds) as scope:
        yield
    if scope.cancelled_caught:
        raise ExecTimeoutError(f"the guest agent did not {what} within {seconds:g} s")


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    pause_ms: float
    write_ms: float
    size_bytes: int


class VM:
    """A running VM.  Get one from ``boot()`` or ``connect()``."""

    def __init__(self, connection: Connection, host: Host) -> None:
        self.connection: Connection = connection
        self._channel = connection.channel
        self.info: VMInfo = connection.info
        self.name: str = connection.name
        self.host: Host = host
        self.handoff_report: HandoffReport | None = None  # set on the VM a handoff() returned
        self.placeholders: dict[str, str] = {}  # each secret's placeholder in the guest (``boot(secrets=)``)
        # Called once this handle is closed: what a host pool reserved for the VM (``RayHosts.boot``).
        self.release: Callable[[], Awaitable[None]] | None = None

    @property
    def owned(self) -> bool:
        """Whether closing this handle stops the VM (it was started through it)."""
        return self.connection.owner is not None

    def __repr__(self) -> str:
        where = "" if self.host.name == "local" else f" on {self.host.name}"
        return f"<VM {self.name}{where} accel={self.info.get('accel')} memory={self.info.get('memory_mib')}MiB>"

    @asynccontextmanager
    async def process(
        self,
        cmd: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bool = True,
        timeout: float | None = None,
        tty: bool = False,
        size: tuple[int, int] = (24, 80),
        user: str | None = None,
    ) -> AsyncIterator[Process]:
        """Start a guest process and stream its stdin/stdout/stderr.

        With ``tty`` it runs on a pseudo-terminal of ``size`` (rows, cols) as
        its controlling terminal: all output arrives on stdout, and
        ``Process.resize`` changes the size.  Leaving the block while it still
        runs kills it (and its process group).  ``user``: ``"USER[:GROUP]"`` (names or ids, as
        ``docker exec --user``) instead of the image's User (root unless an OCI image names one).
        """
        argv = argv_of(cmd)
        request = ExecRequest(
            argv, env=env, cwd=cwd, stdin=stdin, timeout=timeout, tty=tty, rows=size[0], cols=size[1], user=user
        )
        call = await self._channel.open("exec", request.to_wire())
        try:
            yield Process(call, argv)
        finally:
            with anyio.CancelScope(shield=True):
                await call.cancel()

    async def exec(
        self,
        cmd: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        input: bytes | None = None,
        timeout: float | None = DEFAULT_EXEC_TIMEOUT_S,
        check: bool = False,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        user: str | None = None,
    ) -> ExecResult:
        """Run ``cmd`` (argv list, or a string for ``/bin/sh -c``) to completion.

        ``timeout`` kills the guest process group and raises
        ``ExecTimeoutError`` (EXEC_AGENT_TIMEOUT); ``check`` raises
        ``ExecError`` (EXEC_NONZERO_EXIT) on a non-zero exit.  A stdout or
        stderr longer than ``max_output`` bytes (None: no limit) kills the
        process and raises ``ExecError`` (EXEC_OUTPUT_TOO_LARGE); stream
        bigger outputs with ``process()``.  ``user``: as ``process()``'s.
        """
        stdout, stderr = bytearray(), bytearray()
        backstop = None if timeout is None else timeout + AGENT_TIMEOUT_SLACK_S
        with anyio.move_on_after(backstop) as scope, plain_errors():
            async with self.process(cmd, env=env, cwd=cwd, stdin=input is not None, timeout=timeout, user=user) as proc:

                async def collect(stream: ProcessOutput, into: bytearray) -> None:
                    async for chunk in stream:
                        if max_output is not None and len(into) + len(chunk) > max_output:
                            raise ExecError(
                                f"{cmd!r} wrote more than max_output={max_output} bytes", code="EXEC_OUTPUT_TOO_LARGE"
                            )
                        into += chunk

                async with anyio.create_task_group() as tg:
                    tg.start_soon(collect, proc.stdout, stdout)
                    tg.start_soon(collect, proc.stderr, stderr)
                    if input is not None:
                        await proc.stdin.send(input)
                        await proc.stdin.aclose()
                exit_code = await proc.wait()
        if scope.cancelled_caught:
            raise ExecTimeoutError(f"the guest agent did not finish {cmd!r} within {backstop:g} s")
        result = ExecResult(exit_code, bytes(stdout), bytes(stderr), proc.signal)
        if proc.timed_out:
            raise ExecTimeoutError(f"{cmd!r} timed out after {timeout:g} s and was killed", result=result)
        if check and exit_code != 0:
            raise ExecError(
                f"{cmd!r} exited with {exit_code}: {result.stderr[-500:].decode(errors='replace')}",
                code="EXEC_NONZERO_EXIT",
                result=result,
            )
        return result

    async def read_file(
        self, path: str, *, max_output: int | None = DEFAULT_MAX_OUTPUT, timeout: float | None = DEFAULT_FILE_STALL_S
    ) -> bytes:
        """The file's bytes; one longer than ``max_output`` (None: no limit) raises
        ``GuestFileError`` (FILE_TOO_LARGE).  ``timeout`` is a stall limit, not a total: no
        data (or outcome) for that many seconds raises ``ExecTimeoutError``
        (EXEC_AGENT_TIMEOUT), however large the file (None: wait for ever)."""
        call = await self._channel.open("read_file", {"path": path})
        chunks = []
        size = 0
        try:
            while True:
                with _deadline(timeout, f"send more of {path}"):
                    try:
                        chunks.append(await call.receive(wire.STDOUT))
                    except anyio.EndOfStream:
                        break
                size += len(chunks[-1])
                if max_output is not None and size > max_output:
                    raise GuestFileError(f"{path} is larger than max_output={max_output} bytes", code="FILE_TOO_LARGE")
            with _deadline(timeout, f"finish reading {path}"):
                await call.result()
        finally:
            with anyio.CancelScope(shield=True):
                await call.cancel()
        return b"".join(chunks)

    async def write_file(
        self,
        path: str,
        data: bytes,
        *,
        mode: int = 0o644,
        append: bool = False,
        parents: bool = False,
        timeout: float | None = DEFAULT_FILE_STALL_S,
    ) -> None:
        """Write ``data`` to ``path`` in the guest; replaced atomically unless ``append``.
        ``timeout`` is a stall limit, not a total: the guest taking no data (or not
        finishing) for that many seconds raises ``ExecTimeoutError`` (EXEC_AGENT_TIMEOUT),
        however large the file (None: wait for ever)."""
        view = memoryview(data)
        call = await self._channel.open(
            "write_file", {"path": path, "mode": mode, "append": append, "parents": parents}
        )
        try:
            for start in range(0, len(view), wire.CHUNK):
                with _deadline(timeout, f"take more of {path}"):
                    await call.send(view[start : start + wire.CHUNK])
            with _deadline(timeout, f"finish writing {path}"):
                await call.send_eof()
                await call.result()
        finally:
            with anyio.CancelScope(shield=True):
                await call.cancel()

    async def ping(self, *, timeout: float | None = DEFAULT_CALL_TIMEOUT_S) -> Pong:
        """The agent's answer; none within ``timeout`` s raises ``ExecTimeoutError`` (EXEC_AGENT_TIMEOUT)."""
        with _deadline(timeout, "answer ping"):
            return await self._channel.call("ping")

    async def describe(self, *, timeout: float | None = DEFAULT_CALL_TIMEOUT_S) -> VMDescription:
        """Supervisor metadata, plus the guest agent's live info under ``"agent"``; no answer
        within ``timeout`` s raises ``ExecTimeoutError`` (EXEC_AGENT_TIMEOUT)."""
        with _deadline(timeout, "answer describe"):
            info = await self._supervisor_info()
            description: VMDescription = {**info, "agent": await self._channel.call("info")}
            return description

    @overload
    def fork(
        self, n: None = None, *, name: str | None = None, names: None = None, boot_timeout: float = ...,
        detached: bool = ..., ports: Sequence[PortSpec] | None = ..., hosts: Sequence[Host] | HostPool[Host] | None = ...,
        mounts: Sequence[str | Mount] | None = ..., ttl: float | None = ..., idle_timeout: float | None = ...,
        network: NetworkPolicy | None = ...,
        on_idle: str | None = ..., secrets: Literal["inherit"] | None = ...,
    ) -> Launch[VM]: ...  # fmt: skip

    @overload
    def fork(
        self, n: int, *, name: str | None = None, names: Sequence[str] | None = None, boot_timeout: float = ...,
        detached: bool = ..., ports: Sequence[PortSpec] | None = ..., hosts: Sequence[Host] | HostPool[Host] | None = ...,
        mounts: Sequence[str | Mount] | None = ..., ttl: float | None = ..., idle_timeout: float | None = ...,
        network: NetworkPolicy | None = ...,
        on_idle: str | None = ..., secrets: Literal["inherit"] | None = ...,
    ) -> Launch[Forks]: ...  # fmt: skip

    @overload
    def fork(
        self, n: None = None, *, name: str | None = None, names: Sequence[str], boot_timeout: float = ...,
        detached: bool = ..., ports: Sequence[PortSpec] | None = ..., hosts: Sequence[Host] | HostPool[Host] | None = ...,
        mounts: Sequence[str | Mount] | None = ..., ttl: float | None = ..., idle_timeout: float | None = ...,
        network: NetworkPolicy | None = ...,
        on_idle: str | None = ..., secrets: Literal["inherit"] | None = ...,
    ) -> Launch[VM] | Launch[Forks]: ...  # fmt: skip

    def fork(
        self,
        n: int | None = None,
        *,
        name: str | None = None,
        names: Sequence[str] | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT_S,
        detached: bool = False,
        ports: Sequence[PortSpec] | None = None,
        hosts: Sequence[Host] | HostPool[Host] | None = None,
        mounts: Sequence[str | Mount] | None = None,
        ttl: float | None = None,
        idle_timeout: float | None = None,
        network: NetworkPolicy | None = None,
        on_idle: str | None = None,
        secrets: Literal["inherit"] | None = None,
    ) -> Launch[VM] | Launch[Forks]:
        """Siblings of this running VM, started concurrently from one instant.

        ``child = await vm.fork(name="b")`` gives one VM (close it with
        ``await child.aclose()``); ``async with vm.fork(n=8) as forks`` gives
        ``Forks`` and closes them on exit.  This VM pauses only for the fork
        window and keeps running; memory is shared copy-on-write and every
        sibling writes its own qcow2 layer over the frozen disk.  Siblings get
        their own name, hostname, fresh guest entropy and the current time, and
        never inherit port forwards: ``ports`` gives a single sibling its own.
        ``detached`` siblings outlive this process (closing their handles only
        disconnects).  ``hosts`` (``Host.local()``, ``Host.ssh(...)``) spreads the
        siblings over several hosts by free memory and CPU, or a ``RayHosts`` pool
        lets Ray's scheduler place them; remote siblings
        start from a snapshot pushed there (see docs/scale-out.md).  Siblings
        keep this VM's live mounts; ``mounts`` re-binds them (by guest path) to
        other directories, or adds live mounts.  ``ttl``, ``idle_timeout``: each
        sibling's lifetime in seconds from its start, and without calls (see ``boot``);
        ``on_idle`` "snapshot:DIR" (see ``boot``) takes a single sibling.
        ``network``: the siblings' ``NetworkPolicy`` (default: this VM's, as it is now), to narrow
        what an untrusted attempt may reach.  ``secrets="inherit"``: the siblings' requests get this
        VM's secrets too (same placeholders); otherwise their placeholders go out as they are.
        """
        count = 1 if n is None else n
        if not isinstance(count, int) or count < 1:
            raise MachinenError(f"n must be a positive integer, got {n!r}", code="FORK_COUNT_INVALID")
        if names is not None:
            chosen = [registry.validate_name(x) for x in names]
            if len(chosen) != count and n is not None:
                raise MachinenError(f"{len(chosen)} names for {count} siblings", code="FORK_COUNT_INVALID")
        elif name is not None:
            chosen = [registry.validate_name(name if n is None else f"{name}-{i}") for i in range(count)]
        else:
            chosen = [f"{self.name[:40]}-{os.urandom(3).hex()}" for _ in range(count)]
        forwards = PortForward.all_of(ports)
        if forwards and len(chosen) > 1:
            raise MachinenError("ports can be given to a single sibling only", code="PARSE_PORT_INVALID")
        if hosts is not None and (forwards or not hosts):
            raise MachinenError("hosts= needs at least one host and takes no ports", code="FORK_HOSTS_INVALID")
        return self.host.fork_siblings(
            self, chosen, single=n is None and len(chosen) == 1, boot_timeout=boot_timeout, detached=detached,
            ports=forwards, hosts=hosts, mounts=mounts, ttl=ttl, idle_timeout=idle_timeout, on_idle=on_idle,
            network=network,
            inherit_secrets=secrets == "inherit",
        )  # fmt: skip

    @property
    def lineage(self) -> tuple[Ancestor, ...]:
        """This VM's ancestors, root first and its parent last, each with the instant (epoch seconds)
        of the fork or snapshot it came from; empty for a VM that was booted."""
        return tuple(self.info.get("lineage", ()))

    @property
    def deadline(self) -> float | None:
        """When the VM's supervisor stops it (epoch seconds; ``ttl=``, ``extend``), as of this handle's
        last word from it; None: no end."""
        return self.info.get("deadline")

    async def extend(self, seconds: float) -> float:
        """Push the VM's deadline ``seconds`` later (or, without one, set it ``seconds`` from now);
        returns the new deadline (epoch seconds).  BOOT_TTL_INVALID unless a positive number."""
        checked = checked_ttl(seconds)
        reply = await self._channel.call("vm.extend", {"seconds": checked})
        self.info = {**self.info, "deadline": reply["deadline"]}
        return float(reply["deadline"])

    @property
    def network(self) -> NetworkPolicy:
        """What the guest may reach now (``boot(network=)``, ``set_network``)."""
        return NetworkPolicy.from_wire(self.info.get("network_policy", NetworkPolicy().to_wire()))

    async def set_network(self, policy: NetworkPolicy) -> None:
        """Change what the guest may reach; new connections and DNS queries follow it at once,
        connections already open stay.  BOOT_NETWORK_RULE_INVALID for a VM without a network device."""
        if not isinstance(policy, NetworkPolicy):
            raise BootError(f"set_network takes a NetworkPolicy, not {policy!r:.100}", code="BOOT_NETWORK_RULE_INVALID")
        await self._channel.call("vm.set_network", {"policy": policy.to_wire()})
        self.info = {**self.info, "network_policy": policy.to_wire()}

    async def give_secrets(self, secrets: Sequence[SecretRule]) -> None:
        """Hand ``secrets`` (checked rules, values and placeholders) to the VM's supervisor: its egress
        proxy puts each value into requests to its hosts, the guest gets the placeholders as
        environment variables of later commands and trusts the proxy's CA (``boot(secrets=)``)."""
        entries = [{"name": s.name, "value": s.value, "hosts": list(s.hosts), "placeholder": s.placeholder,
                    "headers": list(s.headers)} for s in secrets]  # fmt: skip
        await self._trust_secrets(await self._channel.call("vm.set_secrets", {"secrets": entries}))

    async def secrets_as_set(self) -> list[SecretRule]:
        """The secrets this VM's supervisor puts into its requests, values included (over its
        0600 socket: this user's only), for VMs given the same ones (``fork(secrets="inherit")``)."""
        given = await self._channel.call("vm.secret_values")
        return [SecretRule(s["name"], s["value"], tuple(s["hosts"]), s["placeholder"], tuple(s["headers"]))
                for s in given["secrets"]]  # fmt: skip

    async def _trust_secrets(self, given: Mapping[str, object]) -> None:
        """The guest's part of ``vm.set_secrets``' reply: trust its CA, hold its placeholders."""
        placeholders = dict(given["placeholders"])  # type: ignore[call-overload]  # the supervisor's reply
        await self._channel.call("egress_trust", {"ca_pem": given["ca_pem"], "env": placeholders})
        self.placeholders = placeholders

    async def metrics(self, *, timeout: float | None = DEFAULT_CALL_TIMEOUT_S) -> VMMetrics:
        """What this VM costs its host now: CPU seconds, memory (guest RAM private to it, and shared
        with its fork template: ``shared_with``, so several siblings count it once) and disk layer
        bytes; see ``VMMetrics``."""
        with _deadline(timeout, "answer metrics"):
            return await self._channel.call("vm.metrics")

    async def snapshot(self, bundle_dir: str | os.PathLike[str]) -> SnapshotInfo:
        """Write a restorable bundle of this VM to ``bundle_dir`` (new or empty).

        Non-destructive: the VM pauses only to capture state and keeps running.
        """
        target = Path(bundle_dir).expanduser().resolve()
        result = await self._channel.call("vm.snapshot", {"dir": str(target)})
        return SnapshotInfo(
            path=Path(result["bundle"]),
            pause_ms=result["pause_ms"],
            write_ms=result["write_ms"],
            size_bytes=sum(f["size"] for f in result["files"].values()),
        )

    async def handoff(
        self,
        host: Host,
        *,
        name: str | None = None,
        ports: Sequence[PortSpec] | None = None,
        detached: bool | None = None,
        precopy: bool = True,
        mounts: Sequence[str | Mount] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> VM:
        """Move this running VM to ``host`` (a ``Host.ssh(...)``); returns the VM there.

        The VM pauses, its final state goes to the host (only the chunks the
        host lacks; with ``precopy`` a first snapshot taken while it still
        runs has already sent most of them) and is verified there, the VM
        starts there, and only then does this one stop.  On any failure this
        VM simply continues.  Ports are not carried over: pass ``ports``.  Its
        lifetime is: the deadline (as the time left to it) and ``idle_timeout``.
        The moved VM is owned like this one was (``detached`` overrides);
        ``moved.handoff_report`` tells bytes moved and the pause.  Live mounts
        need ``mounts``: directories of that host (absolute paths) to bind.
        """
        return await handoff(
            self, host, name=name, ports=ports, detached=detached, precopy=precopy, progress=progress, mounts=mounts
        )

    async def _snapshot_paused(self, bundle_dir: Path) -> None:
        """Snapshot and stay paused until ``_resume`` or until this handle disconnects."""
        await self._channel.call("vm.snapshot", {"dir": str(bundle_dir), "stay_paused": True})

    async def _supervisor_info(self) -> VMInfo:
        """The supervisor's account only: it answers while the guest is paused, as the agent cannot."""
        return await self._channel.call("vm.info")

    async def _resume(self) -> None:
        await self._channel.call("vm.resume")

    async def reset_agent_channel(self, *, timeout: float = DEFAULT_RESET_TIMEOUT_S) -> dict[str, AgentInfo]:
        """Drop and re-establish the supervisor's channel to the guest agent.

        Calls in flight fail with EXEC_AGENT_UNAVAILABLE; their guest processes
        keep running (as after a restore).  A recovery tool for a wedged channel.
        An agent that does not answer the new session within ``timeout`` s raises
        ``ExecTimeoutError`` (EXEC_AGENT_TIMEOUT); the supervisor keeps reconnecting.
        """
        with _deadline(timeout + AGENT_TIMEOUT_SLACK_S, "answer a new session"):  # the supervisor's, or this
            return await self._channel.call("vm.reset_agent_channel", {"timeout": timeout})

    async def stop(self) -> str:
        """Stop the VM (QEMU, supervisor, files) and wait until it is gone.

        Returns "stopped", or "killed" if its supervisor did not finish a clean
        stop in time and was SIGKILLed; STOP_FAILED if even that failed."""
        if self.owned:
            await self.aclose()
            return "stopped"
        await self._channel.aclose()
        return await self.host.stop(self.name)

    async def aclose(self) -> None:
        """Disconnect; a VM this handle booted is also stopped."""
        await close_connections([self.connection])
        release, self.release = self.release, None
        if release is not None:
            with anyio.CancelScope(shield=True):
                await release()
