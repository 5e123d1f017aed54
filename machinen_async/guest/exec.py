"""``exec``: a guest process on pipes or a pseudo-terminal, its output within the call's credit."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import threading

from ..protocol import wire
from ..protocol.guest_abi import ExecRequest
from .task import BASE_ENV, IMAGE_DEFAULTS, InputPump, Task, identity, start_thread

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing into PID 1 (slow under TCG)
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

# A command that left a background child holding its stdout/stderr open is
# reported finished once no output arrived for this long after it exited.
OUTPUT_GRACE_AFTER_EXIT_S = 0.25


class SharedFd:
    def __init__(self, fd: int, users: int) -> None:
        self.fd = fd
        self.users: int = users
        self.lock: threading.Lock = threading.Lock()

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                os.close(self.fd)


def _take_controlling_tty() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _set_window_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class ExecTask(Task):
    input: InputPump | None  # Task's, set here once the process runs
    proc: subprocess.Popen[bytes]

    def start(self, params: Mapping[str, object]) -> None:
        try:
            request = ExecRequest.from_wire(params)
        except ValueError as exc:
            return self.fail("EXEC_PROTOCOL", f"malformed exec request: {exc}")
        env = dict(BASE_ENV)
        env.update(request.env)
        self.master: int | None = None
        if request.tty:
            # One pseudo-terminal for stdin/stdout/stderr, as the controlling tty of a new session.
            self.master, slave = pty.openpty()
            _set_window_size(slave, request.rows, request.cols)
            stdio = {"stdin": slave, "stdout": slave, "stderr": slave, "preexec_fn": _take_controlling_tty}
        else:
            stdin = subprocess.PIPE if request.stdin else subprocess.DEVNULL
            stdio = {"stdin": stdin, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        try:
            self.proc = subprocess.Popen(request.argv, cwd=request.cwd or IMAGE_DEFAULTS["cwd"], env=env,
                                         start_new_session=True, **identity(request.user), **stdio)  # fmt: skip
        except FileNotFoundError as exc:
            if request.cwd and exc.filename == request.cwd:
                return self.fail("EXEC_CWD_NOT_FOUND", f"working directory not found: {exc.filename}")
            return self.fail("EXEC_COMMAND_NOT_FOUND", f"command not found: {request.argv[0]}")
        except (PermissionError, NotADirectoryError) as exc:
            return self.fail("EXEC_PERMISSION_DENIED", f"{exc.strerror}: {exc.filename}")
        except (OSError, ValueError, TypeError, KeyError) as exc:  # KeyError: no such user (the call's or the image's)
            return self.fail("EXEC_SPAWN_FAILED", f"cannot start {request.argv!r}: {exc!r}")
        finally:
            if self.master is not None:
                os.close(slave)
        self.timed_out: bool = False
        self.output_detached: bool = False
        self.output_lock: threading.Lock = threading.Lock()  # DATA before EOF, and one EOF per fd, whoever sends them
        self.output_closed: set[int] = set()
        self.bytes_read: int = 0
        self.timer: threading.Timer | None = (
            threading.Timer(request.timeout, self._on_timeout) if request.timeout else None
        )
        if self.timer:
            self.timer.daemon = True
            self.timer.start()
        if self.master is not None:
            # Reader and writer share the master fd: closed when both are done with it, never under one.
            master = SharedFd(self.master, users=2)
            self.input = InputPump(self, self.master, lambda broken: master.release())  # no EOF on a tty but ^D
            self.pump_sources: list[int] = [self.master]
            self.pumps: list[threading.Thread] = [start_thread(self._pump, self.master, wire.STDOUT, master.release)]
            self._output(wire.EOF, wire.STDERR)  # all output arrives on stdout
        else:
            if self.proc.stdin is not None:
                self.input = InputPump(self, self.proc.stdin.fileno(), lambda broken: self.proc.stdin.close())
            self.pump_sources = [self.proc.stdout.fileno(), self.proc.stderr.fileno()]
            self.pumps = [
                start_thread(self._pump, self.proc.stdout.fileno(), wire.STDOUT, self.proc.stdout.close),
                start_thread(self._pump, self.proc.stderr.fileno(), wire.STDERR, self.proc.stderr.close),
            ]
        start_thread(self._wait)

    def _pump(self, source: int, fd: int, close: Callable[[], object]) -> None:
        while True:
            size = self.take_credit(fd)
            try:
                data = os.read(source, size)
            except OSError:  # EIO: every process holding the terminal's other end is gone
                data = b""
            if not data:
                break
            self.bytes_read += len(data)
            if self.output_detached:
                continue
            self.spend_credit(fd, len(data))
            self._output(wire.DATA, fd, data)
        close()
        self._output(wire.EOF, fd)

    def _output(self, kind: int, fd: int, data: bytes = b"") -> None:
        """Send DATA or EOF on ``fd``, unless its EOF went out already (a detached pump)."""
        with self.output_lock:
            if fd in self.output_closed:
                return
            if kind == wire.EOF:
                self.output_closed.add(fd)
                self.send([wire.EOF, self.sid, fd])
            else:
                self.send([wire.DATA, self.sid, fd, data])

    def _pipes_idle(self) -> bool:
        """No pump can make progress: no output waiting and the write ends still held
        (by a background child); a pump that merely was not scheduled yet is not idle."""
        poller = select.poll()
        for source in self.pump_sources:
            poller.register(source, select.POLLIN)
        try:
            return not poller.poll(0)
        except OSError:
            return False  # a pump closed its pipe meanwhile: it is finishing

    def _wait(self) -> None:
        returncode = self.proc.wait()
        if self.timer:
            self.timer.cancel()
        while any(p.is_alive() for p in self.pumps):
            before = self.bytes_read
            for pump in self.pumps:
                pump.join(OUTPUT_GRACE_AFTER_EXIT_S)
            if self.bytes_read == before and any(p.is_alive() for p in self.pumps):
                with self.cond:
                    waiting_for_credit = any(c <= 0 for c in self.credit.values())
                if not waiting_for_credit and self._pipes_idle():
                    self.output_detached = True
                    for pump, fd in zip(self.pumps, (wire.STDOUT, wire.STDERR)):
                        if pump.is_alive():
                            self._output(wire.EOF, fd)
                    break
        signum = -returncode if returncode < 0 else None
        if self.master is not None:
            self.input.put(None)
        self.finish(
            {
                "exit_code": 128 + signum if signum else returncode,
                "signal": signum,
                "timed_out": self.timed_out,
            }
        )

    def _kill_group(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def _on_timeout(self) -> None:
        self.timed_out = True
        self._kill_group(signal.SIGKILL)

    def on_cancel(self) -> None:
        super().on_cancel()
        if hasattr(self, "proc"):
            self._kill_group(signal.SIGKILL)

    def on_control(self, payload: Mapping[str, object]) -> None:
        if payload.get("resize") and self.master is not None:
            rows, cols = payload["resize"]
            _set_window_size(self.master, rows, cols)  # the kernel sends SIGWINCH to the foreground group
        signum = payload.get("signal")
        if signum and hasattr(self, "proc"):
            if payload.get("group"):
                self._kill_group(signum)
            else:
                try:
                    self.proc.send_signal(signum)
                except ProcessLookupError:
                    pass
