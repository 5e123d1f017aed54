"""The contracts between host processes, spelled once: what a VM runs on (``MachineSpec``), where a
VM that resumes finds its state (``IncomingState``), a fork template (``ForkTemplate``, the
supervisor's answer to ``vm.fork_template``, which a peer relays to the SDK of another host), and
what a host driver is asked to start (``BootRequest``, ``ForkRequest``, ``RestoreRequest``, with
their ``PortForward``s and ``MountBinding``s): the SDK builds one, and every driver -- this machine,
an SSH host, a Ray node -- takes it as it is.

They cross as JSON (a supervisor's argv) or msgpack (the supervisor socket, the peer link), so each
has ``to_wire`` and a ``from_wire`` that refuses a malformed one with a typed error.  What crosses
to the guest is in ``guest_abi.py`` (the guest does not import ``dataclasses``: ~10 ms natively,
many times that under TCG, at every boot).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Self, TypedDict, cast

from ..errors import BootError, MachinenError
from .mounts import MountEntry, is_mount_entry
from .netpolicy import NetworkPolicy, NetworkPolicyEntry, ResolvedName, resolved_names
from .ports import PortEntry, PortSpec, parse_port_forwards
from .secret import SecretSlot

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


# What the SDK returns about VMs and hosts: JSON-shaped (``machinen ls --json`` prints them as
# they are), so typed dicts rather than classes; a checker knows every key.


class Ancestor(TypedDict):
    """One of a VM's ancestors: its ``name``, and ``taken_at``, the instant (epoch seconds) of the
    fork template or snapshot its descendants came from."""

    name: str
    taken_at: float


MAX_LINEAGE = 1024  # ancestors a VM records (the oldest are dropped beyond: a bound on what crosses)
MAX_ANCESTOR_NAME = 255


def is_lineage(value: object) -> bool:
    """A lineage as it crosses (a bundle's manifest, a fork template): a bounded list of
    ``{"name", "taken_at"}`` maps, names non-empty text, instants finite numbers."""
    return (
        isinstance(value, list | tuple)
        and len(value) <= MAX_LINEAGE
        and all(
            isinstance(ancestor, dict)
            and ancestor.keys() == {"name", "taken_at"}
            and type(ancestor["name"]) is str
            and 0 < len(ancestor["name"]) <= MAX_ANCESTOR_NAME
            and type(ancestor["taken_at"]) in (int, float)
            and math.isfinite(ancestor["taken_at"])
            for ancestor in value
        )
    )


def descend(lineage: Iterable[Ancestor], parent: str, taken_at: float) -> list[Ancestor]:
    """The lineage of a VM started from ``parent`` as it was at ``taken_at``: ``parent``'s own, then ``parent``."""
    return [*lineage, {"name": parent, "taken_at": float(taken_at)}][-MAX_LINEAGE:]


class VMInfo(TypedDict):
    """A VM as its supervisor describes it (``vm.info``; its ``meta.json``)."""

    name: str
    supervisor_pid: int
    qemu_pid: int
    accel: str
    memory_mib: int
    cpus: int
    image: str
    image_source: str
    ram_dir: str
    detached: bool
    forked_from: str | None
    start: str  # "cold", "warm", "fork" or "restore"
    network: bool
    network_policy: NetworkPolicyEntry
    ports: list[PortEntry]  # [host address, host port, guest port]
    mounts: list[MountEntry]  # live mounts: [host directory, guest path, read only]
    started_at: float
    boot_s: float
    socket: str
    deadline: float | None  # epoch seconds at which the supervisor stops the VM (``ttl``), or None
    idle_timeout: float | None  # seconds with no call in progress after which it stops the VM, or None
    on_idle: str | None  # "snapshot:DIR": a bundle written into DIR before that stop; None: just the stop
    lineage: list[Ancestor]  # root first, the parent last; empty for a boot (cold or warm)
    restored_from: str | None  # the bundle a restore started from


class VMMetrics(TypedDict):
    """``vm.metrics()``: what a VM costs its host now (supervisor/metrics.py reads it from /proc)."""

    cpu_s: float  # the VMM process's user + system CPU seconds so far
    qemu_rss_bytes: int  # the VMM process's resident memory, guest RAM included ...
    qemu_pss_bytes: int  # ... and its proportional share (pages shared with N processes count 1/N)
    guest_private_bytes: int  # guest RAM only this VM has: all of it, or a fork sibling's copied pages
    guest_shared_bytes: int  # guest RAM it maps from its fork template, shared with its siblings
    shared_with: str | None  # that template's RAM file (count its shared bytes once), or None
    disk_bytes: int  # allocated bytes of its own top disk layer (what it wrote)


class Pong(TypedDict):
    pong: bool
    time: float  # the guest's clock


class WorkloadState(TypedDict):
    running: bool
    argv: list[str] | None
    pid: int | None
    exit_code: int | None
    restarts: int


class AgentInfo(TypedDict):
    """The guest agent's own account (``describe()["agent"]``)."""

    agent_version: str
    protocol: int
    hostname: str
    kernel: str
    python: str
    python_executable: str
    uptime_s: float
    time: float
    pid: int
    workload: WorkloadState


class VMDescription(VMInfo):
    """``vm.describe()``: the supervisor's account and the agent's, fresh."""

    agent: AgentInfo


class VMRow(TypedDict, total=False):
    """One VM as ``machinen ls --json`` and ``Host.list()`` show it (``node``: a Ray pool's)."""

    name: str
    pid: int
    qemu_pid: int
    accel: str
    memory_mib: int
    uptime_s: float
    image: str
    image_source: str
    start: str
    detached: bool
    forked_from: str | None
    ports: list[str]  # "ADDRESS:HOST->GUEST"
    node: str
    deadline: float | None  # epoch seconds at which the VM stops (``ttl``), or None
    lineage: list[Ancestor]
    restored_from: str | None
    metrics: VMMetrics | None  # ``machinen ls --json`` of this machine: None for a VM that did not answer


class HostFacts(TypedDict):
    """What a host says of itself (``Host.info()``): enough to decide whether and how much to place there."""

    version: str
    protocol: int
    arch: str
    qemu_version: str
    accel: str
    cpus: int
    load_1m: float
    mem_available_mib: int
    vms: int
    pid: int


def _fields_of(cls: type[DataclassInstance], data: object) -> dict[str, Any]:
    """``data`` if it has every field ``cls`` requires and none it does not know."""
    if not isinstance(data, dict):
        raise MachinenError(f"a {cls.__name__} must be a map, not {type(data).__name__}", code="HOST_PROTOCOL")
    known = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    if not required <= data.keys() <= known:
        raise MachinenError(
            f"a {cls.__name__} needs {sorted(required)} and knows {sorted(known)}; got {sorted(map(str, data))}",
            code="HOST_PROTOCOL",
        )
    return data


@dataclass(frozen=True)
class MachineSpec:
    """What a VM runs on: its virtual hardware and the files it boots; a restore must match it."""

    memory_mib: int
    cpus: int
    accel: str
    kernel: str
    initrd: str
    image: str
    tsc_khz: int | None = None
    network: bool = True  # outbound only, user-mode NAT
    # What the guest may reach (netguard and the egress proxy enforce it); never in a bundle.
    network_policy: NetworkPolicy = NetworkPolicy()  # noqa: RUF009 (frozen: one shared instance is safe)
    # What the image was built from, for people: a tarball's path or an OCI image's REF@sha256:DIGEST
    image_source: str = ""
    image_key: str = ""  # the image's content key (its file may be named by sha256 when received)

    def to_wire(self) -> dict[str, object]:
        return {**asdict(self), "network_policy": self.network_policy.to_wire()}

    @classmethod
    def from_wire(cls, data: object) -> MachineSpec:
        data = _fields_of(cls, data)
        return cls(**{**data, "network_policy": NetworkPolicy.from_wire(data.get("network_policy", {}))})


@dataclass(frozen=True)
class IncomingState:
    """Where a VM that starts from saved state (fork sibling or restore) finds it."""

    chain: list[list[str]]  # the frozen disk, [path, format] per layer, top first, base image last
    disk_size: int
    holds: list[str]  # shared layers and templates to hold while the VM runs
    ram_in_state: bool  # the device state carries the RAM too (a snapshot of a fork)
    source: str | None = None  # the VM it was captured from
    state: str | None = None  # a fork template's device state ...
    mem: str | None = None  # ... and RAM (mapped copy-on-write)
    bundle: str | None = None  # or a bundle to copy (and check) them from ...
    files: dict[str, object] = field(default_factory=dict)  # ... against its manifest's entries
    lineage: list[Ancestor] = field(default_factory=list)  # the VM's that starts from it
    restored_from: str | None = None  # the bundle it came from (a restore)
    # What the source's guest resolved (egress by name), so that a sibling's connections to those
    # addresses go on as the source's would; a bundle has none.
    resolved_names: list[ResolvedName] = field(default_factory=list)
    # The secrets its guest holds placeholders of (names, hosts, placeholders; never a value).
    secrets: tuple[SecretSlot, ...] = ()

    def to_wire(self) -> dict[str, object]:
        return {**asdict(self), "secrets": [slot.to_map() for slot in self.secrets]}

    @classmethod
    def from_wire(cls, data: object) -> IncomingState:
        data = _fields_of(cls, data)
        if not is_lineage(data.get("lineage", [])):
            raise _invalid("a lineage is a list of {name, taken_at}", data.get("lineage"))
        return cls(**{**data, "resolved_names": resolved_names(data.get("resolved_names", [])),
                      "secrets": SecretSlot.all_from(data.get("secrets", []))})  # fmt: skip


@dataclass(frozen=True)
class ForkTemplate:
    """A running VM captured for fork siblings: their incoming state, its machine, and the pause it took."""

    incoming: IncomingState
    machine: MachineSpec
    pause_ms: float
    pause_steps_ms: dict[str, float]
    mounts: list[MountEntry] = field(default_factory=list)  # the source's live mounts, which siblings serve too

    def to_wire(self) -> dict[str, object]:
        return {**asdict(self), "incoming": self.incoming.to_wire(), "machine": self.machine.to_wire()}

    @classmethod
    def from_wire(cls, data: object) -> ForkTemplate:
        data = _fields_of(cls, data)
        return cls(
            incoming=IncomingState.from_wire(data["incoming"]),
            machine=MachineSpec.from_wire(data["machine"]),
            pause_ms=data["pause_ms"],
            pause_steps_ms=data["pause_steps_ms"],
            mounts=data.get("mounts", []),
        )


class Workload(TypedDict, total=False):
    """What a booted VM runs (``boot(cmd=...)``): ``cmd`` in ``cwd`` with ``env`` added, or the OCI
    image's own Entrypoint + Cmd (``image_cmd``), or the image's command only when the VM's image
    asks for one (``from_image``, what a boot without ``cmd`` sends)."""

    cmd: list[str]
    env: dict[str, str]
    cwd: str | None
    image_cmd: bool
    from_image: bool


MIN_MEMORY_MIB = 64
PULL_POLICIES = ("missing", "always", "never")
WORKLOAD_KEYS = frozenset({"cmd", "env", "cwd", "image_cmd", "from_image"})


def _invalid(what: str, value: object, code: str = "HOST_PROTOCOL") -> MachinenError:
    return MachinenError(f"{what}, not {value!r:.200}", code=code)


def _names(value: object, *, least: int) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or len(value) < least or not all(type(name) is str for name in value):
        raise _invalid(f"names are a list of at least {least} strings", value)
    return tuple(value)


def _flag(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise _invalid(f"{what} is true or false", value)
    return value


def _seconds(value: object) -> float | None:
    """``value`` as a positive finite number of seconds, or None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < math.inf):
        return None
    return float(value)


def _timeout(value: object) -> float:
    seconds = _seconds(value)
    if seconds is None:
        raise _invalid("boot_timeout is a positive number of seconds", value, "BOOT_TIMEOUT_INVALID")
    return seconds


def checked_ttl(value: object, what: str = "ttl") -> float | None:
    """A lifetime in seconds (``ttl=``, ``idle_timeout=``, ``vm.extend``): None (no end), or a
    positive finite number."""
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is None:
        raise BootError(f"{what} is a positive number of seconds, not {value!r:.100}", code="BOOT_TTL_INVALID")
    return seconds


def seconds_left(deadline: object, now: float) -> float | None:
    """The seconds from ``now`` to a VM's ``deadline`` (epoch seconds, as describe() and a VM list
    row give it), 0 once past; None without one (or for a peer's odd value)."""
    if isinstance(deadline, bool) or not isinstance(deadline, int | float):
        return None
    return max(0.0, deadline - now)


IDLE_SNAPSHOT = "snapshot:"  # on_idle="snapshot:DIR": a bundle of the VM into DIR, then it stops


def checked_on_idle(value: object, idle_timeout: float | None, vms: int) -> str | None:
    """``on_idle``: what the supervisor of each of ``vms`` VMs does when ``idle_timeout`` fires.
    None or "stop": stop the VM (None returned); "snapshot:DIR" (returned as it is): write a bundle
    of it into DIR, an absolute path of its host, then stop it -- one VM only, as siblings would
    share DIR.  On the wire: None or "snapshot:DIR"."""
    if value is None:
        return None
    if type(value) is not str or not (
        value == "stop" or value.startswith(IDLE_SNAPSHOT) and os.path.isabs(value.removeprefix(IDLE_SNAPSHOT))
    ):
        raise BootError(
            f'on_idle is "stop" or "snapshot:DIR" (DIR an absolute path), not {value!r:.200}',
            code="BOOT_ON_IDLE_INVALID",
        )
    if idle_timeout is None:
        raise BootError(f"on_idle={value!r:.200} needs an idle_timeout", code="BOOT_ON_IDLE_INVALID")
    if value == "stop":
        return None
    if vms > 1:
        raise BootError(
            f"on_idle={value!r:.200} writes one bundle: it takes one VM, not {vms}", code="BOOT_ON_IDLE_INVALID"
        )
    return value


def idle_snapshot_dir(on_idle: str | None) -> str | None:
    """Where a checked ``on_idle`` has the supervisor write a bundle before it stops an idle VM."""
    return None if on_idle is None else on_idle.removeprefix(IDLE_SNAPSHOT)


def _strings(value: object, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple) or not all(type(v) is str for v in value):
        raise _invalid(f"{what} is a list of strings", value)
    return tuple(value)


def _wire(value: object) -> object:
    """A request's field as it crosses: tuples as lists, ports and mounts in their list form."""
    if isinstance(value, PortForward | MountBinding | NetworkPolicy):
        return value.to_wire()
    if isinstance(value, tuple):
        return [_wire(item) for item in value]
    return value


class _Request:
    """What the launch requests share: their wire form, and their checks on arrival (each request's
    ``__post_init__`` checks every field, whoever made it)."""

    def to_wire(self) -> dict[str, object]:
        return {f.name: _wire(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_wire(cls, data: object) -> Self:
        return cls(**_fields_of(cls, data))  # type: ignore[arg-type]  # each request is a dataclass


def _optional_string(value: object, what: str) -> str | None:
    if value is not None and type(value) is not str:
        raise _invalid(f"{what} is a string", value)
    return value


@dataclass(frozen=True)
class PortForward:
    """A TCP port of the VM's host (``address:host_port``) tunnelled to ``guest_port`` in the guest."""

    address: str
    host_port: int
    guest_port: int

    @classmethod
    def all_of(cls, specs: Iterable[PortSpec | PortForward] | None) -> tuple[PortForward, ...]:
        """``"3000:3000"``, ``"0.0.0.0:8080:80"``, ``(3000, 3000)`` or ``PortForward``s, each checked, and
        no host port twice."""
        if specs is not None and not isinstance(specs, list | tuple):
            raise MachinenError(f"ports are a list of forwards, not {specs!r:.100}", code="PARSE_PORT_INVALID")
        plain = [spec.to_wire() if isinstance(spec, PortForward) else spec for spec in specs or ()]
        return tuple(cls(str(address), int(host), int(guest)) for address, host, guest in parse_port_forwards(plain))

    def to_wire(self) -> PortEntry:
        return [self.address, self.host_port, self.guest_port]  # the supervisor's form


@dataclass(frozen=True)
class MountBinding:
    """A live mount: directory ``host`` of the VM's host at ``guest`` (both absolute), served on every
    access; ``host`` empty (resuming VMs only) unmounts what the saved state had at ``guest``."""

    host: str
    guest: str
    read_only: bool = False

    @classmethod
    def from_wire(cls, data: object) -> MountBinding:
        if not is_mount_entry(data, drop=True):
            raise MachinenError(
                f"a live mount is [host directory, guest path, read only], not {data!r:.200}",
                code="MOUNT_SPEC_INVALID",
            )
        host, guest, read_only = data
        return cls(str(host), str(guest), bool(read_only))

    def to_wire(self) -> MountEntry:
        return [self.host, self.guest, self.read_only]  # the supervisor's and the manifest's form


def _bindings(data: object) -> tuple[MountBinding, ...]:
    """``MountBinding``s, or their wire form, checked; one per guest path."""
    if not isinstance(data, list | tuple):
        raise _invalid("mounts are a list", data, "MOUNT_SPEC_INVALID")
    bindings = tuple(MountBinding.from_wire(m.to_wire() if isinstance(m, MountBinding) else m) for m in data)
    if len({binding.guest for binding in bindings}) != len(bindings):
        raise MachinenError("two mounts at one guest path", code="MOUNT_SPEC_INVALID")
    return bindings


def _workload(value: object) -> Workload | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value.keys() <= WORKLOAD_KEYS:
        raise _invalid(f"a workload is a map of {sorted(WORKLOAD_KEYS)}", value)
    cmd = value.get("cmd")
    if cmd is not None and (not isinstance(cmd, list) or not cmd or not all(type(a) is str for a in cmd)):
        raise _invalid("a workload's cmd is a non-empty list of strings", cmd)
    env = value.get("env") or {}
    if not isinstance(env, dict) or not all(type(k) is str and type(v) is str for k, v in env.items()):
        raise _invalid("a workload's env maps strings to strings", env)
    _optional_string(value.get("cwd"), "a workload's cwd")
    return cast(Workload, value)  # each key checked above


@dataclass(frozen=True)
class BootRequest(_Request):
    """Boot one VM: on the host that runs it, ``image`` (a rootfs tarball's path there, an OCI
    reference, or None for the base image) is resolved, memory is checked against what is free,
    and a warm start resumes that host's boot template.  Mounts copied in at boot are not here:
    the caller copies them through the VM's own file calls once it answers (``start_workload``
    False: the workload waits for that)."""

    name: str
    image: str | None = None
    memory_mib: int = 256
    cpus: int = 1
    accel: str | None = None
    boot_timeout: float = 60.0
    detached: bool = False
    ports: tuple[PortForward, ...] = ()
    network: bool = True  # a network device (outbound NAT, the host closed)
    network_policy: NetworkPolicy = NetworkPolicy()  # what the guest may reach  # noqa: RUF009 (frozen)
    workload: Workload | None = None
    start_workload: bool = True
    mounts: tuple[MountBinding, ...] = ()  # live ones, of the VM's host
    pull: str = "missing"
    insecure: tuple[str, ...] = ()  # registries reached over plain HTTP
    credentials: tuple[str, str] | None = field(default=None, repr=False)  # (user, password) for the registry
    warm: bool = True
    ttl: float | None = None  # seconds from the start after which the VM's supervisor stops it
    idle_timeout: float | None = None  # seconds with no call after which its supervisor stops it
    on_idle: str | None = None  # None (stop) or "snapshot:DIR": a bundle into DIR first (``checked_on_idle``)

    def __post_init__(self) -> None:
        """Every field checked here, so a bad request fails where it is made, as on arrival."""
        if type(self.name) is not str:
            raise _invalid("a VM name is a string", self.name)
        _optional_string(self.image, "image")
        if type(self.memory_mib) is not int or self.memory_mib < MIN_MEMORY_MIB:
            raise BootError(
                f"memory must be an integer >= {MIN_MEMORY_MIB} MiB, got {self.memory_mib!r}",
                code="BOOT_MEMORY_INVALID",
            )
        if type(self.cpus) is not int or self.cpus < 1:
            raise BootError(f"cpus must be an integer >= 1, got {self.cpus!r}", code="BOOT_CPUS_INVALID")
        _optional_string(self.accel, "accel")  # which ones exist is the VMM backend's to say
        if self.pull not in PULL_POLICIES:
            raise _invalid(f"pull is one of {PULL_POLICIES}", self.pull, "IMAGE_PULL_POLICY_INVALID")
        credentials = self.credentials
        if credentials is not None and (
            not isinstance(credentials, list | tuple)
            or len(credentials) != 2
            or not all(type(c) is str for c in credentials)
        ):
            raise _invalid("credentials are (user, password)", "...", "IMAGE_CREDENTIALS_INVALID")
        mounts = _bindings(self.mounts)
        if any(not binding.host for binding in mounts):
            raise BootError("a boot has no saved mounts to drop", code="MOUNT_SPEC_INVALID")
        idle_timeout = checked_ttl(self.idle_timeout, "idle_timeout")
        checked = {
            "boot_timeout": _timeout(self.boot_timeout),
            "ttl": checked_ttl(self.ttl),
            "idle_timeout": idle_timeout,
            "on_idle": checked_on_idle(self.on_idle, idle_timeout, 1),
            "ports": PortForward.all_of(self.ports),
            "network_policy": NetworkPolicy.from_wire(self.network_policy),
            "mounts": mounts,
            "insecure": _strings(self.insecure, "insecure"),
            "credentials": None if credentials is None else tuple(credentials),
            "workload": _workload(self.workload),
        }
        for what in ("detached", "network", "start_workload", "warm"):
            _flag(getattr(self, what), what)
        for key, value in checked.items():
            object.__setattr__(self, key, value)


@dataclass(frozen=True)
class ForkRequest(_Request):
    """Siblings of a running VM, one per name, from one instant; ``mounts`` re-bind the source's
    live mounts for them (or add some, or drop one: ``host`` empty).  No names: only the capture
    (a spread whose siblings all start from a bundle of it elsewhere)."""

    names: tuple[str, ...]
    ports: tuple[PortForward, ...] = ()
    detached: bool = False
    boot_timeout: float = 60.0
    mounts: tuple[MountBinding, ...] = ()
    ttl: float | None = None  # each sibling's, from its start
    idle_timeout: float | None = None
    network_policy: NetworkPolicy | None = None  # the siblings' (None: the source's)
    on_idle: str | None = None

    def __post_init__(self) -> None:
        _resuming_fields(self, least=0)
        if self.network_policy is not None:
            object.__setattr__(self, "network_policy", NetworkPolicy.from_wire(self.network_policy))


@dataclass(frozen=True)
class RestoreRequest(_Request):
    """VMs from a snapshot bundle of the host that runs them: one per name, ``siblings`` sharing its
    RAM copy-on-write.  ``image`` helps find the image it was taken on; ``trust`` accepts a bundle
    this user's machinen did not seal; ``network_policy``: what the guest may reach (a bundle has none)."""

    bundle: str
    names: tuple[str, ...]
    siblings: bool = False
    ports: tuple[PortForward, ...] = ()
    detached: bool = False
    boot_timeout: float = 60.0
    mounts: tuple[MountBinding, ...] = ()
    image: str | None = None
    accel: str | None = None
    trust: bool = False
    network_policy: NetworkPolicy = NetworkPolicy.closed()  # noqa: RUF009 (frozen)
    ttl: float | None = None  # each VM's, from its start
    idle_timeout: float | None = None
    on_idle: str | None = None

    def __post_init__(self) -> None:
        if type(self.bundle) is not str:
            raise _invalid("a bundle is a path", self.bundle)
        _optional_string(self.image, "image")
        _optional_string(self.accel, "accel")
        for what in ("siblings", "trust"):
            _flag(getattr(self, what), what)
        object.__setattr__(self, "network_policy", NetworkPolicy.from_wire(self.network_policy))
        _resuming_fields(self, least=1)
        if self.siblings and self.ports:
            raise MachinenError("ports can be given to a single VM only", code="PARSE_PORT_INVALID")


def _resuming_fields(request: ForkRequest | RestoreRequest, *, least: int) -> None:
    """The fields a fork and a restore share, checked and made immutable."""
    _flag(request.detached, "detached")
    names = _names(request.names, least=least)
    ports = PortForward.all_of(request.ports)
    if ports and len(names) > 1:
        raise MachinenError("ports can be given to a single VM only", code="PARSE_PORT_INVALID")
    mounts = _bindings(request.mounts)
    idle_timeout = checked_ttl(request.idle_timeout, "idle_timeout")
    for key, value in (("names", names), ("ports", ports), ("mounts", mounts),
                       ("boot_timeout", _timeout(request.boot_timeout)), ("ttl", checked_ttl(request.ttl)),
                       ("idle_timeout", idle_timeout),
                       ("on_idle", checked_on_idle(request.on_idle, idle_timeout, len(names)))):  # fmt: skip
        object.__setattr__(request, key, value)
