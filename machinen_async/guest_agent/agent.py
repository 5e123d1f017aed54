"""machinen guest agent: runs inside the VM as PID 1 (stdlib + msgpack only).

PID 1 mounts the basics, then forks: the parent only reaps orphans (and
respawns the server if it dies), the child serves the host over the
virtio-serial port ``org.machinen.agent`` using the frames in ``wire``.

Threads, not asyncio: every call gets its own threads (one that starts it,
then a process waiter, one pump per output pipe, one writer for input), so a
slow consumer of one call never stalls another, and blocking
``os.read``/``os.write`` on pipes and on the port stay simple.  The thread
that reads the port only dispatches: it never waits for a call to start (a
spawn, a TCP connect, a file open) or for one to take its input.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import platform
import pty
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections import deque

from ..protocol import wire
from ..protocol.guest_abi import AGENT_PORT_NAME, DNS_IP, GATEWAY_IP, GUEST_IP, IMAGE_CONFIG, WORKLOAD_LOG

AGENT_VERSION = "0.2.0"
# While no host is connected, read() on the port returns b"" at once (and
# poll() reports HUP): sleep between tries instead of spinning.  A supervisor
# keeps the port connected for the VM's whole life, so this only runs in the
# short gaps around a restore.
DISCONNECTED_POLL_S = 0.02
# A command that left a background child holding its stdout/stderr open is
# reported finished once no output arrived for this long after it exited.
OUTPUT_GRACE_AFTER_EXIT_S = 0.25
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "xterm",
}


def _file_error(exc: OSError) -> tuple[str, str]:
    codes = {
        errno.ENOENT: "FILE_NOT_FOUND",
        errno.EACCES: "FILE_PERMISSION_DENIED",
        errno.EPERM: "FILE_PERMISSION_DENIED",
        errno.EISDIR: "FILE_IS_A_DIRECTORY",
        errno.ENOTDIR: "FILE_NOT_FOUND",
    }
    return codes.get(exc.errno, "FILE_IO_ERROR"), f"{exc.strerror}: {exc.filename}"


def start_thread(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


class Task:
    """Server side of one call; output obeys the host's credit window."""

    def __init__(self, agent: Agent, sid: int) -> None:
        self.agent = agent
        self.sid = sid
        self.session = agent.session
        self.cond = threading.Condition()
        self.credit = {wire.STDOUT: wire.INITIAL_WINDOW, wire.STDERR: wire.INITIAL_WINDOW}
        self.finished = False
        self.cancelled = False
        self.input: InputPump | None = None
        # Frames that arrive while the call is still starting wait here, in order.
        self.dispatch_lock = threading.Lock()
        self.early: list[list] | None = []

    def begin(self, *args) -> None:
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

    def deliver(self, frame: list) -> None:
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

    def send(self, frame: list) -> None:
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

    def on_frame(self, frame: list) -> None:
        kind = frame[0]
        if kind == wire.CREDIT:
            with self.cond:
                self.credit[frame[2]] = self.credit.get(frame[2], 0) + frame[3]
                self.cond.notify_all()
        elif kind in (wire.DATA, wire.EOF) and self.input is not None:
            self.input.put(frame[3] if kind == wire.DATA else None)
        elif kind == wire.CANCEL:
            with self.cond:
                self.cancelled = True
                self.cond.notify_all()
            self.on_cancel()
        elif kind == wire.CONTROL:
            self.on_control(frame[2])

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

    def on_control(self, payload: dict) -> None:
        pass

    def finish(self, value) -> None:
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

    def __init__(self, task: Task, fd: int, on_eof) -> None:
        self.task = task
        self.fd = fd
        self.on_eof = on_eof
        self.queue: deque[bytes | None] = deque()
        self.cond = threading.Condition()
        self.thread = start_thread(self._run)

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


class SharedFd:
    def __init__(self, fd: int, users: int) -> None:
        self.fd = fd
        self.users = users
        self.lock = threading.Lock()

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
    def start(self, params: dict) -> None:
        env = dict(BASE_ENV)
        env.update(params.get("env") or {})
        self.master = None
        if params.get("tty"):
            # One pseudo-terminal for stdin/stdout/stderr, as the controlling tty of a new session.
            self.master, slave = pty.openpty()
            _set_window_size(slave, params.get("rows") or 24, params.get("cols") or 80)
            stdio = {"stdin": slave, "stdout": slave, "stderr": slave, "preexec_fn": _take_controlling_tty}
        else:
            stdin = subprocess.PIPE if params.get("stdin") else subprocess.DEVNULL
            stdio = {"stdin": stdin, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        try:
            self.proc = subprocess.Popen(
                params["argv"], cwd=params.get("cwd") or "/", env=env, start_new_session=True, **stdio
            )
        except FileNotFoundError as exc:
            if params.get("cwd") and exc.filename == params.get("cwd"):
                return self.fail("EXEC_CWD_NOT_FOUND", f"working directory not found: {exc.filename}")
            return self.fail("EXEC_COMMAND_NOT_FOUND", f"command not found: {params['argv'][0]}")
        except (PermissionError, NotADirectoryError) as exc:
            return self.fail("EXEC_PERMISSION_DENIED", f"{exc.strerror}: {exc.filename}")
        except (OSError, ValueError, TypeError) as exc:
            return self.fail("EXEC_SPAWN_FAILED", f"cannot start {params['argv']!r}: {exc}")
        finally:
            if self.master is not None:
                os.close(slave)
        self.timed_out = False
        self.output_detached = False
        self.output_lock = threading.Lock()  # DATA before EOF, and one EOF per fd, whoever sends them
        self.output_closed: set[int] = set()
        self.bytes_read = 0
        timeout = params.get("timeout")
        self.timer = threading.Timer(timeout, self._on_timeout) if timeout else None
        if self.timer:
            self.timer.daemon = True
            self.timer.start()
        if self.master is not None:
            # Reader and writer share the master fd: closed when both are done with it, never under one.
            master = SharedFd(self.master, users=2)
            self.input = InputPump(self, self.master, lambda broken: master.release())  # no EOF on a tty but ^D
            self.pump_sources = [self.master]
            self.pumps = [start_thread(self._pump, self.master, wire.STDOUT, master.release)]
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

    def _pump(self, source: int, fd: int, close) -> None:
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

    def on_control(self, payload: dict) -> None:
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


class TunnelTask(Task):
    """A TCP connection to a guest port, relayed over the call's fds 0 (in) and 1 (out).

    Host port forwards use it, so they need no guest network device and work
    the same in forks and restores.
    """

    def start(self, params: dict) -> None:
        try:
            self.sock = socket.create_connection(("127.0.0.1", int(params["port"])), timeout=5)
        except OSError as exc:
            return self.fail("TUNNEL_CONNECT_FAILED", f"guest port {params['port']}: {exc.strerror or exc}")
        self.sock.settimeout(None)
        self.input = InputPump(self, self.sock.fileno(), self._host_closed)
        self.outbound = start_thread(self._pump)

    def _host_closed(self, broken: bool) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.outbound.join()
        self.sock.close()
        self.finish({})

    def _pump(self) -> None:
        while True:
            try:
                data = self.sock.recv(self.take_credit(wire.STDOUT))
            except OSError:
                data = b""
            if not data or self.cancelled:
                break
            self.spend_credit(wire.STDOUT, len(data))
            self.send([wire.DATA, self.sid, wire.STDOUT, data])
        self.send([wire.EOF, self.sid, wire.STDOUT])

    def on_cancel(self) -> None:
        super().on_cancel()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class ReadFileTask(Task):
    def start(self, params: dict) -> None:
        start_thread(self._run, params["path"])

    def _run(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                while True:
                    data = f.read(self.take_credit(wire.STDOUT))
                    if not data or self.cancelled or self.orphaned:
                        break
                    self.spend_credit(wire.STDOUT, len(data))
                    self.send([wire.DATA, self.sid, wire.STDOUT, data])
        except OSError as exc:
            return self.fail(*_file_error(exc))
        self.send([wire.EOF, self.sid, wire.STDOUT])
        self.finish({"size": size})


class WriteFileTask(Task):
    def start(self, params: dict) -> None:
        self.path = params["path"]
        self.mode = params.get("mode")
        append = params.get("append", False)
        directory = os.path.dirname(self.path) or "/"
        try:
            if params.get("parents"):
                os.makedirs(directory, exist_ok=True)
            if append:
                self.target = None
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, self.mode or 0o644)
            else:
                # Write next to the target and rename, so readers never see half a file.
                self.target = os.path.join(directory, f".{os.path.basename(self.path)}.{os.getpid()}.{self.sid}")
                fd = os.open(self.target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            return self.fail(*_file_error(exc))
        self.fd = fd
        self.input = InputPump(self, fd, self._complete)

    def _complete(self, broken: bool) -> None:
        try:
            if self.cancelled or self.orphaned:
                raise OSError(errno.ECANCELED, "upload abandoned", self.path)
            if broken:
                raise OSError(errno.EIO, "write failed", self.path)
            if self.mode is not None:
                os.fchmod(self.fd, self.mode)
            os.close(self.fd)
            self.fd = -1
            if self.target:
                os.rename(self.target, self.path)
        except OSError as exc:
            if self.fd >= 0:
                os.close(self.fd)
            if self.target and os.path.exists(self.target):
                os.unlink(self.target)
            return self.fail(*_file_error(exc))
        self.finish({"size": os.stat(self.path).st_size})


class UnaryTask(Task):
    def start(self, params: dict, handler) -> None:
        try:
            self.finish(handler(params))
        except Exception as exc:  # report, never kill the agent
            self.fail("EXEC_PROTOCOL", f"{type(exc).__name__}: {exc}")


def agent_info(params: dict | None = None) -> dict:
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return {
        "agent_version": AGENT_VERSION,
        "protocol": wire.PROTOCOL_VERSION,
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uptime_s": uptime,
        "time": time.time(),
        "pid": os.getpid(),
        "workload": WORKLOAD.status(),
    }


WORKLOAD_MAX_BACKOFF_S = 10.0


class Workload:
    """The VM's long-running command (an image's default cmd, or boot(cmd=...)).

    Supervised: output goes to WORKLOAD_LOG; a non-zero exit restarts it
    after a growing pause; a zero exit ends it.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state: dict = {"running": False, "argv": None, "pid": None, "exit_code": None, "restarts": 0}

    def start(self, params: dict) -> dict:
        spec = params
        if params.get("from_image"):
            try:
                with open(IMAGE_CONFIG) as f:
                    spec = json.load(f)
            except FileNotFoundError:
                return self.status()
        if not spec.get("cmd"):
            return self.status()
        with self.lock:
            if self.state["argv"] is not None:
                raise RuntimeError("a workload is already running")
            self.state["argv"] = list(spec["cmd"])
        env = dict(BASE_ENV)
        env.update(spec.get("env") or {})
        os.makedirs(os.path.dirname(WORKLOAD_LOG), exist_ok=True)
        started = threading.Event()
        start_thread(self._supervise, spec["cmd"], env, spec.get("cwd") or "/", started)
        started.wait(5)
        return self.status()

    def _supervise(self, argv: list, env: dict, cwd: str, started: threading.Event) -> None:
        backoff = 0.5
        while True:
            with open(WORKLOAD_LOG, "ab") as log:
                try:
                    proc = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        cwd=cwd, env=env, start_new_session=True,
                    )  # fmt: skip
                except OSError as exc:
                    log.write(f"machinen: cannot start {argv!r}: {exc}\n".encode())
                    with self.lock:
                        self.state.update(running=False, exit_code=127)
                    started.set()
                    return
            with self.lock:
                self.state.update(running=True, pid=proc.pid)
            started.set()
            returncode = proc.wait()
            with self.lock:
                self.state.update(running=False, exit_code=128 - returncode if returncode < 0 else returncode)
                if returncode == 0:
                    return
                self.state["restarts"] += 1
            time.sleep(backoff)
            backoff = min(backoff * 2, WORKLOAD_MAX_BACKOFF_S)

    def status(self, params: dict | None = None) -> dict:
        with self.lock:
            return dict(self.state)


WORKLOAD = Workload()
RNDADDENTROPY, RNDRESEEDCRNG = 0x40085203, 0x5207


def resumed(params: dict) -> dict:
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
    return agent_info()


class Agent:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.write_lock = threading.Lock()
        self.session: bytes | None = None
        self.tasks: dict[int, Task] = {}
        self.unary = {
            "ping": lambda p: {"pong": True, "time": time.time()},
            "info": agent_info,
            "resumed": resumed,
            "workload_start": WORKLOAD.start,
            "workload_status": WORKLOAD.status,
        }
        self.streaming = {
            "exec": ExecTask,
            "read_file": ReadFileTask,
            "write_file": WriteFileTask,
            "tunnel": TunnelTask,
        }

    def send(self, frame: list) -> None:
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
                self.dispatch(frame)

    def dispatch(self, frame: list) -> None:
        kind, sid = frame[0], frame[1]
        if kind == wire.HELLO:
            if frame[2] != self.session:
                self.session = frame[2]
                for task in list(self.tasks.values()):
                    task.on_session_change()
                self.tasks.clear()
                hello = frame[4] if len(frame) > 4 and isinstance(frame[4], dict) else {}
                if hello.get("resume"):  # restored or forked: take the new identity first
                    try:
                        resumed(hello["resume"])
                    except OSError as exc:
                        print(f"agent: applying the new identity failed: {exc}", file=sys.stderr)
            self.send([wire.HELLO, 0, frame[2], wire.PROTOCOL_VERSION, agent_info()])
        elif kind == wire.OPEN:
            method, params = frame[2], frame[3]
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
            task = self.tasks.get(sid)
            if task is not None:
                task.deliver(frame)


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


def _mount(source: str, target: str, fstype: str, options: str = "") -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    os.makedirs(target, exist_ok=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, options.encode() or None) != 0:
        err = ctypes.get_errno()
        if err != errno.EBUSY:
            print(f"agent: mount {target}: {os.strerror(err)}", file=sys.stderr)


def _interface_up(s: socket.socket, name: bytes) -> None:
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH14x", name, 0)))[1]
    fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", name, flags | IFF_UP))


def _configure_network() -> None:
    """eth0 for QEMU user-mode networking (fixed addresses, so no DHCP client needed)."""
    if not os.path.exists("/sys/class/net/eth0"):
        return
    SIOCSIFADDR, SIOCSIFNETMASK, SIOCADDRT = 0x8916, 0x891C, 0x890B
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:

        def sockaddr(ip: str) -> bytes:
            return struct.pack("HH4s8x", socket.AF_INET, 0, socket.inet_aton(ip))

        fcntl.ioctl(s, SIOCSIFADDR, struct.pack("16s", b"eth0") + sockaddr(GUEST_IP))
        fcntl.ioctl(s, SIOCSIFNETMASK, struct.pack("16s", b"eth0") + sockaddr("255.255.255.0"))
        _interface_up(s, b"eth0")
        # struct rtentry: pad, dst, gateway, genmask, flags (RTF_UP | RTF_GATEWAY), then the rest zeroed
        route = struct.pack("L", 0) + sockaddr("0.0.0.0") + sockaddr(GATEWAY_IP) + sockaddr("0.0.0.0")
        route += struct.pack("H", 0x0001 | 0x0002) + bytes(120 - len(route) - 2)
        fcntl.ioctl(s, SIOCADDRT, route)
    with open("/etc/resolv.conf", "w") as f:
        f.write(f"nameserver {DNS_IP}\n")


def _kernel_args() -> dict[str, str]:
    with open("/proc/cmdline") as f:
        return dict(arg.split("=", 1) for arg in f.read().split() if "=" in arg)


def init_system() -> None:
    """What an init does before services: filesystems, hostname, network."""
    _mount("devpts", "/dev/pts", "devpts", "gid=5,mode=620,ptmxmode=666")
    _mount("tmpfs", "/dev/shm", "tmpfs", "mode=1777")
    _mount("tmpfs", "/run", "tmpfs", "mode=755")
    _mount("tmpfs", "/tmp", "tmpfs", "mode=1777")
    hostname = _kernel_args().get("machinen.hostname")
    if hostname:
        socket.sethostname(hostname)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            _interface_up(s, b"lo")
        _configure_network()
    except OSError as exc:
        print(f"agent: network: {exc}", file=sys.stderr)


def reap_forever(server_pid: int) -> None:
    """PID 1's job: reap every orphan; bring the server back if it dies."""
    while True:
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            time.sleep(0.1)
            continue
        except InterruptedError:
            continue
        if pid == server_pid:
            print("agent: server exited; restarting", file=sys.stderr)
            time.sleep(0.2)
            server_pid = fork_server()


def fork_server() -> int:
    pid = os.fork()
    if pid == 0:
        try:
            serve_port()
        finally:
            os._exit(1)
    return pid


def serve_port() -> None:
    fd = os.open(find_port(), os.O_RDWR)
    Agent(fd).serve()


def main() -> None:
    os.environ.update(BASE_ENV)
    if os.getpid() == 1:
        init_system()
        reap_forever(fork_server())
    else:
        serve_port()


if __name__ == "__main__":
    main()
