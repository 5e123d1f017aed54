"""What host and guest agree on besides the frames: the port, the image's files, the addresses.

Stdlib only: it is copied into every image beside the guest agent (as is ``wire``).
"""

from __future__ import annotations

TYPE_CHECKING = False  # what checkers assume true; the agent need not import typing's modules
if TYPE_CHECKING:
    from collections.abc import Mapping

# The virtio-serial port the agent serves (QEMU: virtserialport name=...).
AGENT_PORT_NAME = "org.machinen.agent"
# A provisioned image's workload: what to run (written by provision()) and where its output goes.
IMAGE_CONFIG = "/etc/machinen/image.json"
# What an image that brings no interpreter of its own carries for the agent (store/guest_runtime.py):
# the runtime, and the OCI image config's Env, WorkingDir and User, the defaults of every command.
RUNTIME_DIR = "/.machinen"
EXEC_DEFAULTS = "/.machinen/image.json"
WORKLOAD_LOG = "/var/log/machinen/workload.log"
# An exec's ``user`` for machinen's own commands (copying mounts in, exporting a rootfs), which
# must not run as an OCI image's User.
ROOT_USER = "0:0"
# QEMU user-mode networking: the guest, its gateway (the host, whose loopback it reaches), DNS.
GUEST_IP, GATEWAY_IP, DNS_IP = "10.0.2.15", "10.0.2.2", "10.0.2.3"


class ExecRequest:
    """The params of an ``exec`` call (host → guest), checked on arrival.

    A plain class, not a dataclass: PID 1 would pay for importing ``dataclasses``
    (~10 ms natively, many times that under TCG) at every boot.
    """

    __slots__ = ("argv", "cols", "cwd", "env", "rows", "stdin", "timeout", "tty", "user")
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    stdin: bool
    timeout: float | None
    tty: bool
    rows: int
    cols: int
    user: str | None

    def __init__(
        self,
        argv: list[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bool = False,
        timeout: float | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        user: str | None = None,
    ) -> None:
        self.argv, self.env, self.cwd, self.stdin, self.timeout = argv, dict(env or {}), cwd, stdin, timeout
        self.tty, self.rows, self.cols, self.user = tty, rows, cols, user

    def to_wire(self) -> dict[str, object]:
        wire: dict[str, object] = {
            "argv": self.argv,
            "env": self.env,
            "cwd": self.cwd,
            "stdin": self.stdin,
            "timeout": self.timeout,
        }
        if self.tty:
            wire.update(tty=True, rows=self.rows, cols=self.cols)
        if self.user is not None:  # only when asked: agents older than the field refuse it
            wire["user"] = self.user
        return wire

    @classmethod
    def from_wire(cls, params: object) -> ExecRequest:
        """The request ``params`` describes; ValueError naming the first field that is wrong."""
        if not isinstance(params, dict) or not set(params) <= set(cls.__slots__):
            raise ValueError(f"exec params must be a map of {sorted(cls.__slots__)}")
        argv, env = params.get("argv"), params.get("env") or {}
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a non-empty list of strings")
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("env must map strings to strings")
        cwd, timeout, user = params.get("cwd"), params.get("timeout"), params.get("user")
        if cwd is not None and not isinstance(cwd, str):
            raise ValueError("cwd must be a string")
        if user is not None and not (isinstance(user, str) and user and user.count(":") <= 1 and "\0" not in user):
            raise ValueError("user must be USER, UID, USER:GROUP or UID:GID")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
            raise ValueError("timeout must be a number of seconds (0: none)")
        flags = {key: params.get(key, default) for key, default in (("stdin", False), ("tty", False))}
        if not all(isinstance(value, bool) for value in flags.values()):
            raise ValueError("stdin and tty must be booleans")
        size = {key: params.get(key) or default for key, default in (("rows", 24), ("cols", 80))}
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536 for v in size.values()):
            raise ValueError("rows and cols must be integers in 1..65535")
        return cls(argv, env, cwd, timeout=timeout, user=user, **flags, **size)
