"""``Host``: where VMs run, as the SDK offers it.  ``Host.local()`` is this machine,
``Host.ssh(...)`` another one; ``boot()`` starts a VM on one of them (by default this one).

A ``Host`` wraps a driver (hosts/): the driver starts and finds VMs and hands
back ``Connection``s; this turns them into ``VM``s that know their host, and
runs what a VM does where it lives (its forks).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import TypedDict, Unpack, overload

import anyio

from ..errors import BootError, HostError, MachinenError
from ..hosts.base import DEFAULT_BOOT_TIMEOUT_S, Connection, HostDriver, HostPool, Progress, TransferReport
from ..hosts.local import LocalDriver
from ..protocol.messages import (
    IDLE_SNAPSHOT,
    BootRequest,
    ForkRequest,
    HostFacts,
    PortForward,
    RestoreRequest,
    VMRow,
    Workload,
)
from ..protocol.ports import PortSpec
from ..protocol.secret import SecretRule
from ..store import registry
from ..supervisor.config import check_workload_started
from .forks import Forks, Launch, close_all
from .mounts import Mount, checked_mounts, copy_in, live_mounts, rebinding
from .network import NetworkPolicy, Secret, network_settings, secret_rules
from .process import Command, argv_of
from .spread import fork_across
from .vm import VM


class PoolBootOptions(TypedDict, total=False):
    """``boot()``'s options that every VM of a warm pool is booted with (``warm_pool(**options)``)."""

    cpus: int
    accel: str | None
    boot_timeout: float
    detached: bool
    ports: Sequence[PortSpec] | None
    network: bool | NetworkPolicy
    cmd: Command | None
    env: Mapping[str, str] | None
    cwd: str | None
    mounts: Sequence[str | Mount] | None
    progress: Callable[[str], None] | None
    pull: str
    credentials: tuple[str, str] | None
    insecure: Sequence[str]


class BootOptions(PoolBootOptions, total=False):
    """``boot()``'s keyword options but ``host``: what ``Host.boot`` and ``RayHosts.boot`` pass on."""

    name: str | None
    memory_mib: int
    warm: bool
    ttl: float | None
    idle_timeout: float | None
    on_idle: str | None
    secrets: Mapping[str, Secret] | None


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
        known_hosts: object = (),
        config: Sequence[str] | None = None,
        machinen: str | None = None,
        connect_timeout: float = 15.0,
        **options: object,
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

    async def info(self) -> HostFacts:
        """Fresh facts: version, arch, QEMU, accelerator, CPUs, load, free memory."""
        return await self.driver.info()

    async def push(
        self, bundle_dir: str | os.PathLike[str], *, progress: Progress | None = None, trust: bool = False
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

    @overload
    def restore(
        self, remote_bundle: str, *, name: str | None = None, n: None = None, names: None = None,
        ports: Sequence[PortSpec] | None = ..., detached: bool = ..., boot_timeout: float = ...,
        mounts: Sequence[str | Mount] | None = ..., network: NetworkPolicy | None = ..., ttl: float | None = ...,
        idle_timeout: float | None = ..., on_idle: str | None = ..., secrets: Mapping[str, Secret] | None = ...,
    ) -> Launch[VM]: ...  # fmt: skip

    @overload
    def restore(
        self, remote_bundle: str, *, name: str | None = None, n: int, names: Sequence[str] | None = None,
        ports: Sequence[PortSpec] | None = ..., detached: bool = ..., boot_timeout: float = ...,
        mounts: Sequence[str | Mount] | None = ..., network: NetworkPolicy | None = ..., ttl: float | None = ...,
        idle_timeout: float | None = ..., on_idle: str | None = ..., secrets: Mapping[str, Secret] | None = ...,
    ) -> Launch[Forks]: ...  # fmt: skip

    @overload
    def restore(
        self, remote_bundle: str, *, name: str | None = None, n: None = None, names: Sequence[str],
        ports: Sequence[PortSpec] | None = ..., detached: bool = ..., boot_timeout: float = ...,
        mounts: Sequence[str | Mount] | None = ..., network: NetworkPolicy | None = ..., ttl: float | None = ...,
        idle_timeout: float | None = ..., on_idle: str | None = ..., secrets: Mapping[str, Secret] | None = ...,
    ) -> Launch[Forks]: ...  # fmt: skip

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
        network: NetworkPolicy | None = None,
        ttl: float | None = None,
        idle_timeout: float | None = None,
        on_idle: str | None = None,
        secrets: Mapping[str, Secret] | None = None,
    ) -> Launch[VM] | Launch[Forks]:
        """Start a VM on this host from a bundle pushed there (``push().remote_bundle``);
        with ``n`` or ``names``, siblings sharing its RAM copy-on-write, named as
        ``restore()`` names them (then ``Forks``).

        Without ``detached`` the VMs live until their handles are closed or this
        connection ends.  ``mounts``: live mounts from directories of that host (absolute paths),
        re-binding the bundle's or adding some.  ``network``: the policy (default:
        ``NetworkPolicy.closed()``: a bundle may come from anywhere).
        ``on_idle`` "snapshot:DIR": DIR is a directory of that host (an absolute path).
        ``secrets``: as ``restore()`` takes them."""
        chosen, siblings = restore_names(name, n, names)
        here = self.driver == LocalDriver()
        request = RestoreRequest(
            bundle=remote_bundle, names=tuple(chosen), siblings=siblings, ports=PortForward.all_of(ports),
            detached=detached, boot_timeout=boot_timeout, mounts=rebinding(mounts, here=here),
            network_policy=network if network is not None else NetworkPolicy.closed(), ttl=ttl, idle_timeout=idle_timeout,
            on_idle=on_idle_argument(on_idle, here=here),
        )  # fmt: skip
        return self.start_restore(request, secrets=secret_rules(secrets))

    def start_restore(
        self, request: RestoreRequest, *, progress: Progress | None = None, secrets: Sequence[SecretRule] = ()
    ) -> Launch[VM] | Launch[Forks]:
        """The VMs ``request`` names, from a bundle of this host: ``Forks`` if they are siblings;
        ``secrets`` given to each (bound to the placeholders their guests hold)."""

        async def start() -> list[VM]:
            vms = [self.vm(connection) for connection in await self.driver.restore(request, progress=progress)]
            if secrets:
                try:
                    await give_secrets_to(vms, secrets)
                except BaseException:
                    await discard(vms, detached=request.detached)
                    raise
            return vms

        async def siblings() -> Forks:
            return Forks(await start())

        async def one() -> VM:
            return (await start())[0]

        return Launch(siblings) if request.siblings else Launch(one)

    def boot(self, image: str | os.PathLike[str] | None = None, **options: Unpack[BootOptions]) -> Launch[VM]:
        """A VM booted on this host: ``boot(image, host=self, **options)`` (see ``boot``)."""
        return boot(image, host=self, **options)

    @contextlib.asynccontextmanager
    async def connect(self, name: str) -> AsyncIterator[VM]:
        """Attach to VM ``name`` on this host; leaving the block only disconnects."""
        vm = self.vm(await self.driver.connect(name))
        try:
            yield vm
        finally:
            await vm.aclose()

    async def list(self) -> list[VMRow]:
        return await self.driver.list()

    async def stop(self, name: str, *, force: bool = False) -> str:
        """Stop VM ``name`` there: "stopped", or "killed" (forced, or it did not stop cleanly in time)."""
        return await self.driver.stop(name, force=force)

    async def remove_bundle(self, remote_bundle: str) -> None:
        await self.driver.remove_bundle(remote_bundle)

    def fork_siblings(
        self,
        source: VM,
        names: Sequence[str],
        *,
        single: bool,
        boot_timeout: float,
        detached: bool,
        ports: tuple[PortForward, ...],
        hosts: Sequence[Host] | HostPool[Host] | None,
        mounts: Sequence[str | Mount] | None,
        ttl: float | None = None,
        idle_timeout: float | None = None,
        network: NetworkPolicy | None = None,
        on_idle: str | None = None,
        inherit_secrets: bool = False,
    ) -> Launch[VM] | Launch[Forks]:
        """``source.fork()``: siblings here, or spread over ``hosts``; ``single``: the one sibling itself."""
        # A spread's mounts (and on_idle's directory) are on every host that gets siblings: absolute paths of each.
        here = self.driver == LocalDriver() and hosts is None
        request = ForkRequest(
            tuple(names), ports=ports, detached=detached, boot_timeout=boot_timeout, mounts=rebinding(mounts, here=here),
            ttl=ttl, idle_timeout=idle_timeout, on_idle=on_idle_argument(on_idle, here=here), network_policy=network,
        )  # fmt: skip

        async def start() -> Forks:
            forks = await (fork_across(source, request, hosts, mounts) if hosts is not None
                           else self.fork_here(source, request))  # fmt: skip
            if inherit_secrets:
                try:
                    await give_secrets_to(forks, await source.secrets_as_set())
                except BaseException:
                    await discard(forks, detached=detached)
                    raise
            return forks

        if not single:
            return Launch(start)

        async def start_one() -> VM:
            return (await start())[0]

        return Launch(start_one)

    async def fork_here(self, source: VM, request: ForkRequest, *, bundle_dir: Path | None = None) -> Forks:
        started, template = await self.driver.fork(source.connection, request, bundle_dir=bundle_dir)
        return Forks([self.vm(connection) for connection in started], template)


def restore_names(name: str | None, n: int | None, names: Sequence[str] | None) -> tuple[list[str], bool]:
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
    return chosen, True


def split_vm_address(address: str) -> tuple[Host | None, str]:
    """``name`` or ``host:name`` (host as ssh takes it, ``[user@]host``)."""
    host, colon, name = address.rpartition(":")
    if not colon:
        return None, address
    return Host.from_spec(host), name


def image_argument(image: str | os.PathLike[str] | None, *, here: bool) -> str | None:
    """``image`` as a request carries it: a path object names a file, so one of this machine is made
    absolute (a plain string may be a reference, which the host that runs the VM tells apart)."""
    if isinstance(image, os.PathLike):
        return str(Path(image).expanduser().resolve()) if here else os.fspath(image)
    return image


def on_idle_argument(on_idle: str | None, *, here: bool) -> str | None:
    """``on_idle`` as a request carries it: the DIR of "snapshot:DIR" made absolute from this
    process's directory when the VM runs on this machine (elsewhere it is a path there, already
    absolute); anything else as it is, for the request to check."""
    if not here or not isinstance(on_idle, str) or not on_idle.startswith(IDLE_SNAPSHOT):
        return on_idle
    directory = on_idle.removeprefix(IDLE_SNAPSHOT)
    return IDLE_SNAPSHOT + str(Path(directory).expanduser().resolve()) if directory else on_idle


IMAGE_CMD = "image"  # boot(cmd="image"): an OCI image's Entrypoint + Cmd as the workload


async def give_secrets_to(vms: Sequence[VM], secrets: Sequence[SecretRule]) -> None:
    """``secrets`` to each of ``vms`` at once (bound to the placeholders their guests hold)."""
    async with anyio.create_task_group() as tg:
        for vm in vms:
            tg.start_soon(vm.give_secrets, secrets)


async def discard(started: VM | Forks | Sequence[VM], *, detached: bool) -> None:
    """VMs just started whose set-up failed: closed, and stopped too when detached (closing a
    detached VM's handle would leave it running, half set up)."""
    with anyio.CancelScope(shield=True):
        vms = [started] if isinstance(started, VM) else list(started)
        await (started.aclose() if isinstance(started, VM | Forks) else close_all(vms))
        if detached:
            for vm in vms:
                with contextlib.suppress(MachinenError):
                    await vm.host.stop(vm.name, force=True)


async def _launch(
    host: Host, request: BootRequest, copies: Sequence[Mount], secrets: Sequence[SecretRule], progress: Progress | None
) -> VM:
    vm = host.vm(await host.driver.boot(request, progress=progress))
    try:
        if copies or secrets:  # the copies and the secrets' placeholders first, so the workload finds them
            for mount in copies:
                await copy_in(vm, mount, stall_timeout=request.boot_timeout)
            if secrets:
                await vm.give_secrets(secrets)
            started = await vm.connection.channel.call("workload_start", request.workload or {"from_image": True})
            check_workload_started(started)
    except BaseException:
        await discard(vm, detached=request.detached)
        raise
    return vm


def _workload(cmd: Command | None, env: Mapping[str, str] | None, cwd: str | None) -> Workload | None:
    if cmd is None:
        return None
    if cmd == IMAGE_CMD:
        return {"image_cmd": True}
    return {"cmd": argv_of(cmd), "env": dict(env or {}), "cwd": cwd}


def boot(
    image: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    memory_mib: int = 256,
    cpus: int = 1,
    accel: str | None = None,
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT_S,
    detached: bool = False,
    ports: Sequence[PortSpec] | None = None,
    network: bool | NetworkPolicy = True,
    cmd: Command | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    mounts: Sequence[str | Mount] | None = None,
    progress: Callable[[str], None] | None = None,
    pull: str = "missing",
    credentials: tuple[str, str] | None = None,
    insecure: Sequence[str] = (),
    warm: bool = True,
    ttl: float | None = None,
    idle_timeout: float | None = None,
    on_idle: str | None = None,
    secrets: Mapping[str, Secret] | None = None,
    host: Host | None = None,
) -> Launch[VM]:
    """Boot a microVM from ``image``: a rootfs tarball, or an OCI / Docker image reference
    (``"python:3.12-slim"``, ``"localhost:5000/team/agent@sha256:..."``, ``"oci:./layout:tag"``,
    ``"docker-archive:./image.tar"``; see ``rootfs_of``); default: the Debian base.  An OCI
    image needs nothing inside it (the agent brings its own interpreter); its Env, WorkingDir
    and User are the defaults of every command.  ``pull``: "missing" (default: a cached
    reference boots without asking the registry), "always" (ask what the tag names now) or
    "never"; ``credentials``: (user, password) for the registry, else ``~/.docker/config.json``;
    ``insecure``: registries reached over plain HTTP (``"host:port"``, ``"host"`` or a network
    such as ``"10.0.0.0/8"``; loopback ones always are), as Docker's ``insecure-registries``.

    ``warm`` (default): resume the boot template of this start key (image, kernel, memory, CPUs,
    network device...), which the key's first boot captured as soon as its agent answered; the
    VM gets its own hostname, machine-id, entropy and clock, then everything below applies as on
    a cold boot (``describe()["start"]`` says which it was).  False always boots the kernel.

    ``host``: where the VM runs (default ``Host.local()``; ``Host.ssh(...)``, a ``RayHosts`` node):
    there the image is found or pulled, the memory checked and its boot template resumed, and
    ``ports`` and live mounts are that host's; a tarball path is a path there, while copied
    ``mounts`` are directories of this machine, copied through the VM's agent.

    The VM runs ``cmd`` (or else the image's default cmd, see ``provision``)
    as its supervised workload: output in /var/log/machinen/workload.log,
    restarted after a non-zero exit.  ``cmd="image"``: an OCI image's
    Entrypoint + Cmd (never by default: a sandbox image's CMD is often a shell).

    ``accel``: "kvm", "tcg" or "auto" (default, also $MACHINEN_ACCEL).  With
    ``detached`` the VM outlives this process; reach it with ``connect(name)``.
    ``ports``: host -> guest TCP forwards, ``["3000:3000", "0.0.0.0:8080:80",
    (5432, 5432)]`` (loopback unless an address is given); they tunnel through
    the guest agent, so they need no guest network.  ``network``: outbound
    access (QEMU user-mode NAT, DNS through a resolver of the host, nothing
    inbound) with the host closed (its loopback, its addresses, link-local);
    a ``NetworkPolicy`` allows or denies names and addresses, or closes it all
    (``vm.set_network`` changes it later); False boots with no network device
    at all.  Fork siblings keep their source's policy unless ``fork(network=)``.  ``mounts``: host
    directories in the guest, ``Mount(host, guest, live=True)`` or
    ``"HOST:GUEST[:ro|rw]"`` (copied in at boot); live ones are the host's
    files themselves, both ways, and fork siblings keep them (see ``Mount``).

    ``ttl``: the VM's lifetime in seconds: its supervisor stops it that long after it started,
    detached or not, its owner there or not (``vm.extend`` pushes the deadline; ``vm.deadline``).
    ``idle_timeout``: its supervisor stops it once it has had no call in progress and none started
    for that many seconds.  ``on_idle``: what it does then: "stop" (default), or "snapshot:DIR":
    first write the bundle ``vm.snapshot(DIR)`` writes (DIR new or empty, its parent there; a
    relative DIR is taken from this process's directory), to ``restore`` later.  A snapshot that
    fails (DIR not empty, a full disk) is logged by the supervisor and the VM stops all the same.
    """
    host = host or Host.local()
    here = host.driver == LocalDriver()
    # Copied mounts are the caller's directories, wherever the VM runs; live ones the VM host's.
    chosen = checked_mounts(mounts, live_here=here)
    has_network, network_policy = network_settings(network)
    rules = secret_rules(secrets)
    if rules and not has_network:
        raise BootError("secrets go out through the VM's network: boot it with one", code="BOOT_SECRET_INVALID")
    request = BootRequest(
        name=registry.validate_name(name) if name is not None else registry.new_name(),
        image=image_argument(image, here=here),
        memory_mib=memory_mib,
        cpus=cpus,
        accel=accel,
        boot_timeout=boot_timeout,
        detached=detached,
        ports=PortForward.all_of(ports),
        network=has_network,
        network_policy=network_policy,
        workload=_workload(cmd, env, cwd),
        start_workload=all(mount.live for mount in chosen) and not rules,
        mounts=live_mounts(chosen),
        pull=pull,
        insecure=tuple(insecure),
        credentials=credentials,
        warm=warm,
        ttl=ttl,
        idle_timeout=idle_timeout,
        on_idle=on_idle_argument(on_idle, here=here),
    )
    return Launch(lambda: _launch(host, request, [mount for mount in chosen if not mount.live], rules, progress))
