"""The contracts between host processes, spelled once: what a VM runs on (``MachineSpec``), where a
VM that resumes finds its state (``IncomingState``), and a fork template (``ForkTemplate``, the
supervisor's answer to ``vm.fork_template``, which a peer relays to the SDK of another host).

They cross as JSON (a supervisor's argv) or msgpack (the supervisor socket, the peer link), so each
has ``to_wire`` and a ``from_wire`` that refuses a malformed one with a typed error.  What crosses
to the guest is in ``guest_abi.py`` (the guest does not import ``dataclasses``: ~10 ms natively,
many times that under TCG, at every boot).
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, TypeVar

from ..errors import MachinenError

Message = TypeVar("Message")


def _fields_of(cls: type[Message], data: Any) -> dict[str, Any]:
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
    # Destinations the guest may reach although netguard closes them ("127.0.0.1:11434", ...).
    network_allow: tuple[str, ...] = ()
    # What the image was built from, for people: a tarball's path or an OCI image's REF@sha256:DIGEST
    image_source: str = ""
    image_key: str = ""  # the image's content key (its file may be named by sha256 when received)

    def to_wire(self) -> dict[str, Any]:
        return {**asdict(self), "network_allow": list(self.network_allow)}

    @classmethod
    def from_wire(cls, data: Any) -> MachineSpec:
        data = _fields_of(cls, data)
        return cls(**{**data, "network_allow": tuple(data.get("network_allow", ()))})


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
    files: dict[str, Any] = field(default_factory=dict)  # ... against its manifest's entries

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: Any) -> IncomingState:
        return cls(**_fields_of(cls, data))


@dataclass(frozen=True)
class ForkTemplate:
    """A running VM captured for fork siblings: their incoming state, its machine, and the pause it took."""

    incoming: IncomingState
    machine: MachineSpec
    pause_ms: float
    pause_steps_ms: dict[str, float]
    mounts: list[list] = field(default_factory=list)  # the source's live mounts, which siblings serve too

    def to_wire(self) -> dict[str, Any]:
        return {**asdict(self), "incoming": self.incoming.to_wire(), "machine": self.machine.to_wire()}

    @classmethod
    def from_wire(cls, data: Any) -> ForkTemplate:
        data = _fields_of(cls, data)
        return cls(
            incoming=IncomingState.from_wire(data["incoming"]),
            machine=MachineSpec.from_wire(data["machine"]),
            pause_ms=data["pause_ms"],
            pause_steps_ms=data["pause_steps_ms"],
            mounts=data.get("mounts", []),
        )
