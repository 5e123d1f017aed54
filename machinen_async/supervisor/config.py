"""What the launcher hands a supervisor: its config (argv) and the lifeline byte (stdin)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import BootError
from ..protocol.messages import Ancestor, BootRequest, ForkRequest, IncomingState, MachineSpec, RestoreRequest

# The launcher writes this byte on our stdin to let the VM outlive it; EOF
# without it means "my owner is gone": stop.
DETACH = b"d"


@dataclass(frozen=True)
class SupervisorConfig:
    name: str
    machine: MachineSpec
    ram_dir: str  # chosen by the launcher, so it can clean up if it has to SIGKILL us
    boot_timeout: float
    detached: bool
    ports: list[list[Any]] = field(default_factory=list)  # [[host address, host port, guest port], ...]
    # The long-running command: {"cmd", "env", "cwd"}; None runs the image's default cmd, if any.
    workload: dict[str, Any] | None = None
    start_workload: bool = True  # False: the launcher starts it (after copying directories in)
    incoming: IncomingState | None = None  # start from saved state instead of booting
    mounts: list[list[Any]] = field(default_factory=list)  # live mounts: [[host directory, guest path, read only], ...]
    unmounts: list[str] = field(default_factory=list)  # live mounts of the saved state to drop (guest paths)
    # A cold boot: capture a boot template (a bundle) into this directory as soon as the agent
    # answers, before the mounts and the workload (store/boot_templates.py).
    boot_template: str | None = None
    # ``incoming`` is a boot template: once resumed, prepare the mounts and start the workload as
    # a cold boot does (a warm start), rather than inherit them (a fork or a restore).
    warm: bool = False
    # Epoch seconds at which the supervisor stops the VM, owner or not (``ttl``); None: no end.
    deadline: float | None = None
    idle_timeout: float | None = None  # seconds with no call in progress after which it stops the VM
    on_idle: str | None = None  # "snapshot:DIR": write a bundle into DIR before that stop (``checked_on_idle``)

    @property
    def lineage(self) -> list[Ancestor]:
        """The VM's ancestors: a fork's or a restore's (a boot, warm or cold, has none)."""
        return [] if self.incoming is None or self.warm else list(self.incoming.lineage)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SupervisorConfig:
        data = json.loads(text)
        incoming = data.pop("incoming")
        return cls(
            **{**data, "machine": MachineSpec.from_wire(data["machine"])},
            incoming=None if incoming is None else IncomingState.from_wire(incoming),
        )


@dataclass(frozen=True)
class Lifetime:
    """When a VM's supervisor stops it, as a request asks: ``ttl`` seconds after its start, or
    ``idle_timeout`` seconds without calls (``on_idle`` "snapshot:DIR": a bundle into DIR first)."""

    ttl: float | None = None
    idle_timeout: float | None = None
    on_idle: str | None = None

    @classmethod
    def of(cls, request: BootRequest | ForkRequest | RestoreRequest) -> Lifetime:
        return cls(request.ttl, request.idle_timeout, request.on_idle)


def deadline_of(ttl: float | None) -> float | None:
    """The instant a VM started now with lifetime ``ttl`` ends (epoch seconds, as meta.json records it)."""
    return None if ttl is None else time.time() + ttl


def check_workload_started(started: dict[str, Any]) -> None:
    """The agent's answer to ``workload_start``: a command that is not there fails the boot."""
    if not started["running"] and started["exit_code"] == 127:
        raise BootError(f"cannot start the workload {started['argv']!r}", code="BOOT_CMD_NOT_FOUND")
