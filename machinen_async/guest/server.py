"""The agent's server: reads the port, dispatches each frame to its call, writes frames back."""

from __future__ import annotations

import os
import sys
import threading
import time

from ..protocol import wire
from ..protocol.guest_abi import AGENT_PORT_NAME
from . import egress_trust
from .exec import ExecTask
from .files import ReadFileTask, WriteFileTask
from .identity import agent_info, take_on
from .mounts import MountTask, drop_mount, prepare_mount
from .task import Task, UnaryTask, start_thread
from .tunnel import TunnelTask
from .workload import WORKLOAD

# While no host is connected, read() on the port returns b"" at once (and
# poll() reports HUP): sleep between tries instead of spinning.  A supervisor
# keeps the port connected for the VM's whole life, so this only runs in the
# short gaps around a restore.
DISCONNECTED_POLL_S = 0.02

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing into PID 1 (slow under TCG)
if TYPE_CHECKING:
    from collections.abc import Callable


def _pong(params: wire.Params) -> dict[str, object]:
    return {"pong": True, "time": time.time()}


class Agent:
    def __init__(self, fd: int) -> None:
        self.fd: int = fd
        self.write_lock: threading.Lock = threading.Lock()
        self.session: bytes | None = None
        self.tasks: dict[int, Task] = {}
        self.unary: dict[str, Callable[[wire.Params], object]] = {
            "ping": _pong,
            "info": agent_info,
            "resumed": take_on,
            "workload_start": WORKLOAD.start,
            "workload_status": WORKLOAD.status,
            "mount_prepare": prepare_mount,
            "mount_drop": drop_mount,
            "egress_trust": egress_trust.trust,
        }
        self.streaming: dict[str, type[Task]] = {
            "exec": ExecTask,
            "read_file": ReadFileTask,
            "write_file": WriteFileTask,
            "tunnel": TunnelTask,
            "mount": MountTask,
        }

    def send(self, frame: wire.Frame) -> None:
        data = wire.encode(frame)
        with self.write_lock:
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self.fd, view) :]
                except InterruptedError:
                    continue

    def serve(self) -> None:
        decoder = wire.FrameDecoder(resync=True)
        while True:
            try:
                data = os.read(self.fd, 256 * 1024)
            except InterruptedError:
                continue
            if not data:
                decoder.reset()
                time.sleep(DISCONNECTED_POLL_S)
                continue
            for frame in decoder.feed(data):
                try:
                    self.dispatch(frame)
                except wire.ProtocolError as exc:  # no host sends one: never let it stop the agent
                    print(f"agent: frame refused: {exc}", file=sys.stderr)

    def dispatch(self, frame: wire.Frame) -> None:
        kind, sid = wire.kind(frame), wire.stream_id(frame)
        if kind == wire.HELLO:
            self.greet(frame)
        elif kind == wire.OPEN:
            method, params = wire.request(frame)
            if method in self.streaming:
                task = self.streaming[method](self, sid)
                self.tasks[sid] = task
                start_thread(task.begin, params)
            elif method in self.unary:
                task = UnaryTask(self, sid)
                self.tasks[sid] = task
                start_thread(task.begin, params, self.unary[method])
            else:
                self.send([wire.ERROR, sid, "EXEC_PROTOCOL", f"unknown method {method!r}"])
        else:
            running = self.tasks.get(sid)
            if running is not None:
                running.deliver(frame)

    def greet(self, frame: wire.Frame) -> None:
        """A host's HELLO: a new nonce starts a new session (orphaning the calls of the one before)."""
        nonce, _, hello = wire.hello(frame)
        if nonce != self.session:
            self.session = nonce
            for task in list(self.tasks.values()):
                task.on_session_change()
            self.tasks.clear()
            if hello.get("resume"):  # restored or forked: take the new identity first
                try:
                    take_on(hello["resume"])
                except OSError as exc:
                    print(f"agent: applying the new identity failed: {exc}", file=sys.stderr)
        self.send([wire.HELLO, 0, nonce, wire.PROTOCOL_VERSION, agent_info()])


def find_port() -> str:
    base = "/sys/class/virtio-ports"
    for _ in range(500):
        for entry in os.listdir(base) if os.path.isdir(base) else ():
            try:
                with open(os.path.join(base, entry, "name")) as f:
                    if f.read().strip() == AGENT_PORT_NAME:
                        return f"/dev/{entry}"
            except OSError:
                continue
        time.sleep(0.01)
    raise SystemExit(f"virtio port {AGENT_PORT_NAME} not found")
