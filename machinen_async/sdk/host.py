"""``Host``: where VMs run, as the SDK offers it.  ``Host.local()`` is this machine,
``Host.ssh(...)`` another one.

A ``Host`` wraps a driver (hosts/): the driver starts and finds VMs and hands
back ``Connection``s; this turns them into ``VM``s that know their host, and
runs what a VM does where it lives (its forks, its handoff).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import HostError, MachinenError
from ..hosts.base import DEFAULT_BOOT_TIMEOUT_S, Connection, HostDriver, TransferReport
from ..hosts.local import LocalDriver
from ..protocol.ports import PortSpec, parse_port_forwards
from ..store import registry
from .forks import ForkLaunch, Forks
from .handoff import handoff
from .mounts import Mount, rebinding
from .spread import HostPool, fork_across
from .vm import VM

Progress = Callable[[str], None]


class Host:
    """Where VMs run: this machine, or one reached over SSH."""

    def __init__(self, driver: HostDriver) -> None:
        self.driver = driver

    @staticmethod
    def local() -> Host:
        return Host(LocalDriver())

    @staticmethod
    def ssh(
        host: str,
        *,
        port: int | None = None,
        username: str | None = None,
        client_keys: Sequence[str] | None = None,
        known_hosts: Any = (),
        config: Sequence[str] | None = None,
        machinen: str | None = None,
        connect_timeout: float = 15.0,
        **options: Any,
    ) -> Host:
        """A host reached with asyncssh; the options are asyncssh's ``connect`` options.

        ``host`` may be an alias of your ssh config (``~/.ssh/config``, plus
        the file named by ``MACHINEN_SSH_CONFIG``).  ``machinen`` is the
        command that runs machinen there (default ``$MACHINEN_REMOTE_COMMAND``
        or ``machinen``).  Use it as ``async with Host.ssh(...) as hostb``.
        """
        from ..hosts.ssh import SSHDriver, ssh_settings  # asyncssh loads only when a host is reached over SSH

        settings = ssh_settings(
            port=port, username=username, client_keys=client_keys, known_hosts=known_hosts, config=config,
            connect_timeout=connect_timeout, options=options,
        )  # fmt: skip
        command = machinen or os.environ.get("MACHINEN_REMOTE_COMMAND") or "machinen"
        return Host(SSHDriver(host, settings, command))

    @staticmethod
    def from_spec(spec: str) -> Host:
        """``[user@]host`` as ssh takes it (aliases from the ssh config included)."""
        username, _, host = spec.rpartition("@")
        if not host or ":" in host or "/" in host:
            raise HostError(f"not a host: {spec!r} (expected [user@]host)", code="HOST_SPEC_INVALID")
        return Host.ssh(host, username=username or None)

    @property
    def name(self) -> str:
        return self.driver.name

    def address(self, vm_name: str) -> str:
        """How the CLI names VM ``vm_name`` of this host (``name``, or ``host:name``)."""
        return self.driver.address(vm_name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Host) and self.driver == other.driver

    def __hash__(self) -> int:
        return hash(self.driver)

    def __repr__(self) -> str:
        return f"<Host {self.name}>"

    def vm(self, connection: Connection) -> VM:
        return VM(connection, self)

    async def open(self) -> Host:
        await self.driver.open()
        return self

    async def __aenter__(self) -> Host:
        try:
            return await self.open()
        except BaseException:
            await self.aclose()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; VMs started through it without ``detached`` stop."""
        await self.driver.aclose()

    async def info(self) -> dict[str, Any]:
        """Fresh facts: version, arch, QEMU, accelerator, CPUs, load, free memory."""
        return await self.driver.info()

    async def push(
        self, bundle_dir: str | os.PathLike, *, progress: Progress | None = None, trust: bool = False
    ) -> TransferReport:
        """Copy a snapshot bundle to this host, sending only the chunks it lacks.

        The kernel, initrd and image go along if the host lacks them.  Chunks
        that arrived stay there, so a push cut by a dropped connection resumes
        where it stopped when called again.  Everything is verified by sha256
        on arrival, and the host then vouches for the bundle under its own key
        (so it restores without ``trust``): a bundle this user's machinen did
        not write is therefore pushed only with ``trust=True``.  ``progress`` is
        called from a worker thread.
        """
        path = Path(bundle_dir).expanduser().resolve()
        return await self.driver.push(path, progress=progress, trust=trust)

    def restore(
        self,
        remote_bundle: str,
        *,
        name: str | None = None,
        n: int | None = None,
        names: Sequence[str] | None = None,
        ports: Sequence[PortSpec] | None = None,
        detached: bool = False,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT_S,
        mounts: Sequence[str | Mount] | None = None,
    ) -> Launch:
        """Start a VM on this host from a bundle pushed there (``push().remote_bundle``);
        with ``n`` or ``names``, siblings sharing its RAM copy-on-write, named as
        ``restore()`` names them (then ``Forks``).

        Without ``detached`` the VMs live until their handles are closed or this
        connection ends.  ``mounts``: live mounts from directories of that host (absolute paths),
        re-binding the bundle's or adding some."""
        forwards = parse_port_forwards(ports)
        chosen, siblings = restore_names(name, n, names, forwards)
        bound = rebinding(mounts, here=self.driver == LocalDriver())

        async def start() -> VM | Forks:
            started = await self.driver.restore(
                remote_bundle, chosen, siblings=siblings, ports=forwards, detached=detached, boot_timeout=boot_timeout,
                mounts=bound,
            )  # fmt: skip
            vms = [self.vm(connection) for connection in started]
            return Forks(vms) if siblings else vms[0]

        return Launch(start)

    @contextlib.asynccontextmanager
    async def connect(self, name: str) -> AsyncIterator[VM]:
        """Attach to VM ``name`` on this host; leaving the block only disconnects."""
        vm = self.vm(await self.driver.connect(name))
        try:
            yield vm
        finally:
            await vm.aclose()

    async def list(self) -> list[dict[str, Any]]:
        return await self.driver.list()

    async def stop(self, name: str, *, force: bool = False) -> str:
        """Stop VM ``name`` there: "stopped", or "killed" (forced, or it did not stop cleanly in time)."""
        return await self.driver.stop(name, force=force)

    async def remove_bundle(self, remote_bundle: str) -> None:
        await self.driver.remove_bundle(remote_bundle)

    def fork_siblings(
        self,
        source: VM,
        names: list[str],
        *,
        single: bool,
        boot_timeout: float,
        detached: bool,
        ports: list[list],
        hosts: Sequence[Host] | HostPool | None,
        mounts: Sequence[str | Mount] | None,
    ) -> ForkLaunch:
        """``source.fork()``: siblings here, or spread over ``hosts``."""
        # A spread's mounts bind on every host that gets siblings: absolute directories of each.
        bound = rebinding(mounts, here=self.driver == LocalDriver() and hosts is None)

        async def start() -> Forks:
            if hosts is not None:
                return await fork_across(source, names, hosts, boot_timeout, detached, mounts, bound)
            return await self.fork_here(
                source, names, boot_timeout=boot_timeout, detached=detached, ports=ports, mounts=bound
            )

        return ForkLaunch(start, single)

    async def fork_here(
        self,
        source: VM,
        names: list[str],
        *,
        boot_timeout: float,
        detached: bool,
        ports: list[list],
        bundle_dir: Path | None = None,
        mounts: Sequence[Sequence] = (),
    ) -> Forks:
        started, template = await self.driver.fork(
            source.connection, names, ports=ports, detached=detached, boot_timeout=boot_timeout, bundle_dir=bundle_dir,
            mounts=mounts,
        )  # fmt: skip
        return Forks([self.vm(connection) for connection in started], template)

    async def handoff(self, vm: VM, destination: Host, **options: Any) -> VM:
        return await handoff(vm, destination, **options)


def restore_names(
    name: str | None, n: int | None, names: Sequence[str] | None, forwards: list[list]
) -> tuple[list[str], bool]:
    """The names of the VMs a restore starts, and whether they are siblings (``n`` or ``names``)."""
    if n is None and names is None:
        return [registry.validate_name(name) if name is not None else registry.new_name()], False
    if names is not None:
        chosen = [registry.validate_name(x) for x in names]
    elif isinstance(n, int) and not isinstance(n, bool) and n >= 1:
        prefix = registry.validate_name(name) if name is not None else registry.new_name()
        chosen = [f"{prefix}-{i}" for i in range(n)]
    else:
        raise MachinenError(f"n must be a positive integer, got {n!r}", code="FORK_COUNT_INVALID")
    if forwards:
        raise MachinenError("ports can be given to a single VM only", code="PARSE_PORT_INVALID")
    return chosen, True


class Launch:
    """``async with boot(...) as vm`` (stopped on exit) or ``vm = await boot(...)`` (call ``vm.aclose()``).

    Also ``restore(..., n=4)``: then the result is ``Forks``."""

    def __init__(self, start: Callable[[], Any]) -> None:
        self._start = start
        self._vm: Any = None

    def __await__(self):
        return self._start().__await__()

    async def __aenter__(self) -> Any:
        self._vm = await self._start()
        return self._vm

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._vm is not None
        await self._vm.aclose()


def split_vm_address(address: str) -> tuple[Host | None, str]:
    """``name`` or ``host:name`` (host as ssh takes it, ``[user@]host``)."""
    host, colon, name = address.rpartition(":")
    if not colon:
        return None, address
    return Host.from_spec(host), name
