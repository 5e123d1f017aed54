"""A call's server side (``Task``) and what every kind of call shares: the output credit
window, the input pump, its threads, the environment guest processes start with."""

from __future__ import annotations

import os
import threading
from collections import deque

from ..protocol import wire
from ..protocol.guest_abi import EXEC_DEFAULTS

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing into PID 1 (slow under TCG)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .server import Agent

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "xterm",
}
# Where and as whom commands run unless a call says otherwise: an OCI image's WorkingDir and User.
IMAGE_DEFAULTS: dict[str, Any] = {"cwd": "/", "user": None, "group": None, "cmd": []}


def take_image_defaults() -> None:
    """An OCI image's Env, WorkingDir and User (``EXEC_DEFAULTS``, written when its disk was
    built) become the defaults of every command, as in a container."""
    if not os.path.exists(EXEC_DEFAULTS):
        return
    import json  # only in such images: PID 1 imports as little as it can (slow under TCG)

    with open(EXEC_DEFAULTS) as f:
        defaults = json.load(f)
    for entry in defaults.get("env") or []:
        name, _, value = entry.partition("=")
        if name:
            BASE_ENV[name] = value
    IMAGE_DEFAULTS["cwd"] = defaults.get("cwd") or "/"
    IMAGE_DEFAULTS["cmd"] = [word for word in defaults.get("cmd") or [] if isinstance(word, str)]
    IMAGE_DEFAULTS["user"], IMAGE_DEFAULTS["group"] = _user_and_group(defaults.get("user") or "")


def _user_and_group(spec: str) -> tuple[int | str | None, int | str | None]:
    """``USER[:GROUP]`` (names or numeric ids, as an image's User or Docker's ``--user``)."""
    user, _, group = spec.partition(":")
    if not user:
        return None, None
    return int(user) if user.isdigit() else user, (int(group) if group.isdigit() else group) if group else None


def identity(user_spec: str | None = None) -> dict[str, Any]:
    """``Popen``'s user, group and extra groups for ``user_spec`` (a call's own ``user``), else the
    image's User (neither: root's own).  A user without a group runs with its passwd entry's group,
    or 0 where it has none (as Docker)."""
    user, group = _user_and_group(user_spec) if user_spec else (IMAGE_DEFAULTS["user"], IMAGE_DEFAULTS["group"])
    if user is None:
        return {}
    if group is None:
        import pwd

        try:
            group = (pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)).pw_gid
        except KeyError:
            group = 0
    return {"user": user, "group": group, "extra_groups": []}


def start_thread(target: Callable[..., object], *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


class Task:
    """Server side of one call; output obeys the host's credit window."""

    def __init__(self, agent: Agent, sid: int) -> None:
        self.agent: Agent = agent
        self.sid: int = sid
        self.session: bytes | None = agent.session
        self.cond: threading.Condition = threading.Condition()
        self.credit: dict[int, int] = {wire.STDOUT: wire.INITIAL_WINDOW, wire.STDERR: wire.INITIAL_WINDOW}
        self.finished: bool = False
        self.cancelled: bool = False
        self.input: InputPump | None = None
        # Frames that arrive while the call is still starting wait here, in order.
        self.dispatch_lock: threading.Lock = threading.Lock()
        self.early: list[wire.Frame] | None = []

    def begin(self, *args: object) -> None:
        """Start the call (on its own thread), then take the frames that came meanwhile."""
        try:
            self.start(*args)
        except Exception as exc:  # malformed params: fail the call, never the agent
            self.fail("EXEC_PROTOCOL", f"cannot start the call: {type(exc).__name__}: {exc}")
        finally:
            with self.dispatch_lock:
                early, self.early = self.early, None
                for frame in early:
                    self.on_frame(frame)

    def deliver(self, frame: wire.Frame) -> None:
        """From the port reader: never blocks (``on_frame`` only queues and notifies)."""
        with self.dispatch_lock:
            if self.early is not None:
                self.early.append(frame)
                return
            self.on_frame(frame)

    @property
    def orphaned(self) -> bool:
        """The host session that opened this call is gone: keep working, drop output."""
        return self.session != self.agent.session

    def send(self, frame: wire.Frame) -> None:
        with self.cond:
            if self.finished or self.cancelled or self.orphaned:
                return
        self.agent.send(frame)

    def take_credit(self, fd: int) -> int:
        """Block until output may be sent on ``fd``; return how many bytes."""
        with self.cond:
            while self.credit[fd] <= 0 and not (self.cancelled or self.orphaned):
                self.cond.wait(1.0)
            if self.cancelled or self.orphaned:
                return wire.CHUNK
            return min(self.credit[fd], wire.CHUNK)

    def spend_credit(self, fd: int, size: int) -> None:
        with self.cond:
            self.credit[fd] -= size

    def on_frame(self, frame: wire.Frame) -> None:
        kind = wire.kind(frame)
        if kind == wire.CREDIT:
            fd, amount = wire.credit(frame)
            with self.cond:
                self.credit[fd] = self.credit.get(fd, 0) + amount
                self.cond.notify_all()
        elif kind in (wire.DATA, wire.EOF) and self.input is not None:
            self.input.put(wire.data(frame)[1] if kind == wire.DATA else None)
        elif kind == wire.CANCEL:
            with self.cond:
                self.cancelled = True
                self.cond.notify_all()
            self.on_cancel()
        elif kind == wire.CONTROL:
            self.on_control(wire.control(frame))

    def on_session_change(self) -> None:
        """Processes outlive the session that started them (forks keep them);
        their stdin is closed and their output dropped."""
        with self.cond:
            self.cond.notify_all()
        if self.input is not None:
            self.input.put(None)

    def on_cancel(self) -> None:
        self.agent.tasks.pop(self.sid, None)
        if self.input is not None:
            self.input.put(None)

    def on_control(self, payload: wire.Params) -> None:
        pass

    def finish(self, value: object) -> None:
        self.send([wire.RESULT, self.sid, value])
        self._close()

    def fail(self, code: str, message: str) -> None:
        self.send([wire.ERROR, self.sid, code, message])
        self._close()

    def _close(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()
        self.agent.tasks.pop(self.sid, None)


class InputPump:
    """Writes the host's DATA frames to an fd on its own thread, returning credit."""

    def __init__(self, task: Task, fd: int, on_eof: Callable[[bool], None]) -> None:
        self.task: Task = task
        self.fd: int = fd
        self.on_eof: Callable[[bool], None] = on_eof
        self.queue: deque[bytes | None] = deque()
        self.cond: threading.Condition = threading.Condition()
        self.thread: threading.Thread = start_thread(self._run)

    def put(self, data: bytes | None) -> None:
        with self.cond:
            self.queue.append(data)
            self.cond.notify()

    def _run(self) -> None:
        broken = False
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                data = self.queue.popleft()
            if data is None:
                break
            if not broken:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(self.fd, view) :]
                except OSError:
                    broken = True  # reader went away: swallow the rest, keep the host flowing
            self.task.send([wire.CREDIT, self.task.sid, wire.STDIN, len(data)])
        self.on_eof(broken)


class UnaryTask(Task):
    def start(self, params: wire.Params, handler: Callable[[wire.Params], object]) -> None:
        try:
            self.finish(handler(params))
        except Exception as exc:  # report, never kill the agent
            self.fail("EXEC_PROTOCOL", f"{type(exc).__name__}: {exc}")
