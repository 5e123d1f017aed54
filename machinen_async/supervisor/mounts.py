"""Live mounts, host side: answer the guest's file requests (``protocol/mounts.py``) from a host directory.

Everything the guest names is a path below the mount's root, resolved by the
kernel with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` from a
descriptor of the root: ``..``, absolute paths, symlinks (also ones swapped in
while a request runs) and magic links never lead outside.  Symlinks the guest
creates must stay inside the tree by their text (no absolute targets, no
climbing above the root); files with more than one hard link are refused
(the other link may be anywhere on the host); ``read_only`` is enforced here,
whatever the guest's mount says.  Requests are stateless, so any supervisor
serving the same directory answers a forked or restored guest's mount.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import posixpath
import stat
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import structlog

from ..errors import BootError
from ..protocol import mounts as protocol
from ..protocol import wire
from .relay import AgentRelay, ClientConnection

log = structlog.get_logger("machinen.supervisor")

SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x02, 0x04, 0x08
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
RENAME_NOREPLACE = 1
REQUESTS_IN_FLIGHT = 8  # worker threads per mount
REQUESTS_WAITING = 64  # decoded and not yet answered, per mount call
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


class HostDirectory:
    """The host side of one live mount: file operations confined below ``root``."""

    def __init__(self, root: str, read_only: bool) -> None:
        try:
            self.root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise BootError(f"cannot mount {root}: {exc.strerror}", code="MOUNT_SOURCE_NOT_FOUND") from None
        self.read_only = read_only
        self.ops: dict[str, Callable[..., Any]] = {name: getattr(self, f"_{name}") for name in protocol.OPS}

    def close(self) -> None:
        os.close(self.root_fd)

    def serve(self, op: Any, args: Any) -> tuple[int, Any]:
        """``(0, result)`` or ``(errno, None)`` for one request; never raises for what the guest sent."""
        try:
            if op not in self.ops or not isinstance(args, list) or len(args) != len(protocol.OPS[op]):
                raise OSError(errno.EINVAL, "not a request of this protocol")
            if self.read_only and op in protocol.WRITING_OPS:
                raise OSError(errno.EROFS, "read-only mount")
            return 0, self.ops[op](*args)
        except OSError as exc:
            return exc.errno or errno.EIO, None
        except (protocol.MountProtocolError, TypeError, ValueError, OverflowError):
            return errno.EINVAL, None

    # --- resolution -------------------------------------------------------------

    def _beneath(self, path: Any, flags: int, mode: int = 0) -> int:
        """A descriptor of ``path`` below the root; no symlink anywhere on the way or at the end."""
        how = _OpenHow(flags | os.O_CLOEXEC, mode, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        name = protocol.check_path(path) or "."
        return _check(_libc.syscall(SYS_OPENAT2, self.root_fd, name.encode(), ctypes.byref(how), ctypes.sizeof(how)))

    @contextlib.contextmanager
    def _parent(self, path: Any):
        """(descriptor of the parent directory, final name) of a path other than the root."""
        path = protocol.check_path(path)
        if not path:
            raise OSError(errno.EPERM, "the mount's root itself")
        parent, _, name = path.rpartition("/")
        fd = self._beneath(parent, os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd, name
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _file(self, path: Any, flags: int, mode: int = 0):
        fd = self._beneath(path, flags, mode)
        try:
            facts = os.fstat(fd)
            if not stat.S_ISDIR(facts.st_mode) and facts.st_nlink > 1:
                raise OSError(errno.EPERM, "a file with other hard links (they may be outside the mount)")
            yield fd
        finally:
            os.close(fd)

    def _lstat(self, path: Any) -> list:
        path = protocol.check_path(path)
        if not path:
            return _attrs(os.fstat(self.root_fd))
        with self._parent(path) as (fd, name):
            return _attrs(os.stat(name, dir_fd=fd, follow_symlinks=False))

    # --- reading ----------------------------------------------------------------

    def _list(self, path: Any) -> list:
        fd = self._beneath(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with os.scandir(fd) as entries:
                return [[entry.name, entry.inode(), _kind(entry)] for entry in entries]
        finally:
            os.close(fd)

    def _readlink(self, path: Any) -> str:
        with self._parent(path) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def _read(self, path: Any, offset: int, size: int) -> bytes:
        with self._file(path, os.O_RDONLY) as fd:
            return os.pread(fd, max(0, min(size, protocol.MAX_IO)), offset)

    def _statfs(self) -> list:
        facts = os.statvfs(self.root_fd)
        return [facts.f_blocks, facts.f_bfree, facts.f_bavail, facts.f_files, facts.f_ffree, facts.f_bsize,
                facts.f_namemax]  # fmt: skip

    def _open(self, path: Any, writable: bool, truncate: bool) -> None:
        if self.read_only and (writable or truncate):
            raise OSError(errno.EROFS, "read-only mount")
        flags = (os.O_RDWR if writable else os.O_RDONLY) | (os.O_TRUNC if truncate else 0)
        with self._file(path, flags):
            pass

    # --- writing ----------------------------------------------------------------

    def _write(self, path: Any, offset: int, data: bytes) -> int:
        if not isinstance(data, bytes) or len(data) > protocol.MAX_IO:
            raise OSError(errno.EINVAL, "a write moves at most MAX_IO bytes")
        with self._file(path, os.O_WRONLY) as fd:
            return os.pwrite(fd, data, offset)

    def _create(self, path: Any, mode: int, exclusive: bool) -> list:
        try:
            fd = self._beneath(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            if exclusive:
                raise
            with self._file(path, os.O_WRONLY):
                pass  # there already: opened as it is, as open(O_CREAT) would
        else:
            try:
                os.fchmod(fd, mode & 0o7777)  # the guest applied its umask; ours must not apply too
            finally:
                os.close(fd)
        return self._lstat(path)

    def _truncate(self, path: Any, size: int) -> None:
        with self._file(path, os.O_WRONLY) as fd:
            os.ftruncate(fd, size)

    def _mkdir(self, path: Any, mode: int) -> list:
        with self._parent(path) as (fd, name):
            os.mkdir(name, 0o700, dir_fd=fd)
        self._chmod(path, mode)  # the guest applied its umask; ours must not apply too
        return self._lstat(path)

    def _symlink(self, target: Any, path: Any) -> list:
        path = protocol.check_path(path)
        if not isinstance(target, str) or not target or "\0" in target or len(target) > protocol.MAX_PATH:
            raise OSError(errno.EINVAL, "not a symlink target")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
        if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
            raise OSError(errno.EPERM, "a symlink on a live mount stays inside it")
        with self._parent(path) as (fd, name):
            os.symlink(target, name, dir_fd=fd)
        return self._lstat(path)

    def _unlink(self, path: Any) -> None:
        with self._parent(path) as (fd, name):
            os.unlink(name, dir_fd=fd)

    def _rmdir(self, path: Any) -> None:
        with self._parent(path) as (fd, name):
            os.rmdir(name, dir_fd=fd)

    def _rename(self, old: Any, new: Any, noreplace: bool) -> None:
        with self._parent(old) as (old_fd, old_name), self._parent(new) as (new_fd, new_name):
            _check(_libc.renameat2(old_fd, old_name.encode(), new_fd, new_name.encode(),
                                   RENAME_NOREPLACE if noreplace else 0))  # fmt: skip

    def _chmod(self, path: Any, mode: int) -> None:
        fd = self._beneath(path, os.O_PATH)  # refuses a symlink: chmod would follow it
        try:
            os.chmod(f"/proc/self/fd/{fd}", mode & 0o7777)
        finally:
            os.close(fd)

    def _utimens(self, path: Any, atime_ns: int, mtime_ns: int) -> None:
        def spec(ns: int) -> _Timespec:
            return _Timespec(0, ns) if ns in (UTIME_NOW, UTIME_OMIT) else _Timespec(*divmod(ns, 1_000_000_000))

        times = (_Timespec * 2)(spec(atime_ns), spec(mtime_ns))
        with self._parent(path) as (fd, name):
            _check(_libc.utimensat(fd, name.encode(), times, AT_SYMLINK_NOFOLLOW))

    def _fsync(self, path: Any) -> None:
        with self._file(path, os.O_RDONLY) as fd:
            os.fsync(fd)


def _attrs(facts: os.stat_result) -> list:
    return [facts.st_ino, facts.st_mode, facts.st_nlink, facts.st_size, facts.st_blocks, facts.st_atime_ns,
            facts.st_mtime_ns, facts.st_ctime_ns, facts.st_blksize]  # fmt: skip


def _kind(entry: os.DirEntry) -> int:
    if entry.is_symlink():
        return stat.S_IFLNK
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    return stat.S_IFREG if entry.is_file(follow_symlinks=False) else 0


async def serve_mount(relay: AgentRelay, directory: HostDirectory, target: str) -> None:
    """Keep the guest's mount at ``target`` answered for the VM's whole life.

    One ``mount`` call at a time; when the agent channel resets it is opened
    again once the agent answers (a guest that fails the call for good ends it).
    """
    limiter = anyio.CapacityLimiter(REQUESTS_IN_FLIGHT)
    while True:
        while not relay.agent_up:
            await anyio.sleep(0.05)
        if not await _serve_link(relay, directory, target, limiter):
            return
        await anyio.sleep(0.05)


async def _serve_link(relay: AgentRelay, directory: HostDirectory, target: str, limiter: anyio.CapacityLimiter) -> bool:
    """Serve one ``mount`` call until it ends; whether to open another.

    Host memory stays bounded whatever the guest sends: a request's credit goes
    back to the guest only once it is answered, at most ``REQUESTS_WAITING``
    requests are decoded at a time (the rest wait as bytes, within the call's
    window), and a message that breaks the protocol ends this call."""
    link = ClientConnection(None)
    agent_sid = relay.open_call(link, 1, "mount", {"target": target, "read_only": directory.read_only})
    if agent_sid is None:
        return True
    window = {"credit": wire.INITIAL_WINDOW, "granted": anyio.Event()}
    send_lock = anyio.Lock()
    received: deque[bytes] = deque()  # DATA not decoded yet; its credit is not returned yet
    reader = protocol.MessageReader()
    state = {"answering": 0, "broken": False}

    async def answer(request: list, size: int, tg: anyio.abc.TaskGroup) -> None:
        request_id, op, args = request
        async with limiter:
            error, result = await anyio.to_thread.run_sync(directory.serve, op, args)
        view = memoryview(protocol.encode([request_id, error, result]))
        async with send_lock:
            while view:
                while window["credit"] <= 0:
                    window["granted"] = anyio.Event()
                    await window["granted"].wait()
                piece = min(window["credit"], wire.CHUNK, len(view))
                window["credit"] -= piece
                relay.send([wire.DATA, agent_sid, wire.STDIN, bytes(view[:piece])])
                view = view[piece:]
        if size:
            relay.send([wire.CREDIT, agent_sid, wire.STDOUT, size])
        state["answering"] -= 1
        decode(tg)

    def decode(tg: anyio.abc.TaskGroup) -> None:
        """Start answering what has arrived, as far as the limit allows."""
        while received and state["answering"] < REQUESTS_WAITING and not state["broken"]:
            data = received.popleft()
            try:
                requests = reader.feed(data)
            except protocol.MountProtocolError as exc:
                log.warning("guest broke the mount protocol", target=target, problem=str(exc))
                state["broken"] = True
                tg.cancel_scope.cancel()  # the next call starts clean
                return
            if not requests:  # part of a request: its bytes wait in the reader, bounded by MAX_MESSAGE
                relay.send([wire.CREDIT, agent_sid, wire.STDOUT, len(data)])
            for index, request in enumerate(requests):  # the frame's credit returns with its last answer
                state["answering"] += 1
                tg.start_soon(answer, request, len(data) if index == len(requests) - 1 else 0, tg)

    finished = False
    try:
        async with anyio.create_task_group() as tg:
            async for frame in link.outbox:
                kind = frame[0]
                if kind == wire.DATA:
                    received.append(frame[3])
                    decode(tg)
                elif kind == wire.CREDIT:
                    window["credit"] += frame[3]
                    window["granted"].set()
                elif kind in wire.FINAL_KINDS:
                    finished = True
                    if kind == wire.ERROR and frame[2] != "EXEC_AGENT_UNAVAILABLE":
                        log.warning("guest mount failed", target=target, code=frame[2], message=frame[3])
                        return False
                    return True
            tg.cancel_scope.cancel()
    finally:
        if not finished:
            relay.cancel(agent_sid)
    return True
