"""Who this guest is: what it reports (``info``), and the new identity a restored or forked guest takes on."""

from __future__ import annotations

import fcntl
import os
import platform
import socket
import struct
import sys
import time

from ..protocol import wire
from .workload import WORKLOAD

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing into PID 1 (slow under TCG)
if TYPE_CHECKING:
    from collections.abc import Mapping

    from ..protocol.messages import AgentInfo

AGENT_VERSION = "0.2.0"


def agent_info(params: Mapping[str, object] | None = None) -> AgentInfo:
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return {
        "agent_version": AGENT_VERSION,
        "protocol": wire.PROTOCOL_VERSION,
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,  # the agent's interpreter: provision's export may need it
        "uptime_s": uptime,
        "time": time.time(),
        "pid": os.getpid(),
        "workload": WORKLOAD.status(),
    }


RNDADDENTROPY, RNDRESEEDCRNG = 0x40085203, 0x5207


def take_on(params: Mapping[str, object]) -> AgentInfo:
    """Called by the host right after this VM was restored or forked.

    Siblings start with identical kernel RNG state, hostname and a clock
    that stopped while the template was frozen: give each its own identity,
    fresh entropy (credited, then an immediate reseed) and the host's time.
    """
    if params.get("hostname"):
        socket.sethostname(params["hostname"])
    if params.get("time_ns"):
        time.clock_settime_ns(time.CLOCK_REALTIME, params["time_ns"])
    entropy = params.get("entropy") or b""
    if entropy:
        with open("/dev/urandom", "wb") as random_device:
            fcntl.ioctl(random_device, RNDADDENTROPY, struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy)
            fcntl.ioctl(random_device, RNDRESEEDCRNG)
    machine_id = params.get("machine_id")
    if isinstance(machine_id, str) and len(machine_id) == 32 and os.path.isdir("/etc"):
        _write_machine_id(machine_id)
    return agent_info()


def _write_machine_id(machine_id: str) -> None:
    """Replace /etc/machine-id (never through a link an image or a guest process left there)."""
    partial = "/etc/.machine-id.machinen"
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o444)
        with os.fdopen(fd, "w") as f:
            f.write(machine_id + "\n")
        os.rename(partial, "/etc/machine-id")
    except OSError as exc:  # a read-only /etc: the rest of the identity still applies
        print(f"agent: cannot write /etc/machine-id: {exc}", file=sys.stderr)
