"""What the launcher hands a supervisor: its config (argv) and the lifeline byte (stdin)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

# The launcher writes this byte on our stdin to let the VM outlive it; EOF
# without it means "my owner is gone": stop.
DETACH = b"d"


@dataclass(frozen=True)
class SupervisorConfig:
    name: str
    memory_mib: int
    cpus: int
    accel: str
    kernel: str
    initrd: str
    image: str
    ram_dir: str  # chosen by the launcher, so it can clean up if it has to SIGKILL us
    tsc_khz: int | None
    boot_timeout: float
    detached: bool
    network: bool = True
    # Destinations the guest may reach although netguard closes them ("127.0.0.1:11434", ...).
    network_allow: list[str] = field(default_factory=list)
    image_source: str = ""  # the rootfs tarball the image was built from, for people reading a manifest
    image_key: str = ""  # the image's content key (its file may be named by sha256 when received)
    ports: list[list] = field(default_factory=list)  # [[host address, host port, guest port], ...]
    # The long-running command: {"cmd", "env", "cwd"}; None runs the image's default cmd, if any.
    workload: dict[str, Any] | None = None
    # Start from saved state instead of booting (fork sibling or restore):
    # a fork template: {state, mem, ram_in_state, chain, disk_size, holds, source};
    # a bundle: {bundle, files (the manifest's, to check the copies against), ram_in_state, chain, ...}
    incoming: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SupervisorConfig:
        return cls(**json.loads(text))
