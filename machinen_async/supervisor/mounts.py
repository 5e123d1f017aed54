"""Live mounts, host side: answer the guest's file requests (``protocol/mounts.py``) from a host directory.

Everything the guest names is a path below the mount's root, resolved by the
kernel with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` from a
descriptor of the root: ``..``, absolute paths, symlinks (also ones swapped in
while a request runs) and magic links never lead outside.

What the guest leaves behind must not lead outside either, for the host's own
tools, which follow links.  A symlink the guest makes is relative and climbs
only first (``../../lib/x``, never ``a/../..``, where ``a`` may be a link) and
no higher than its own directory's depth; a rename that would move a link, or
a directory holding links, to where it climbs out is refused.  Then every
link resolves inside: its climb ends inside, and each name after it is a real
directory or another such link.  Only regular files and directories are
opened (non-blocking: a FIFO cannot wedge a worker), first as ``O_PATH`` and
checked, then reopened through that descriptor: a file with more than one hard
link is refused before anything changes it (the other link may be anywhere on
the host).  Modes lose set-uid, set-gid and sticky bits; ``read_only`` is
enforced here, whatever the guest's mount says.  Requests are stateless, so any
supervisor serving the same directory answers a forked or restored guest's mount.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import os
import stat
import threading
from collections.abc import Callable
from typing import Any

import anyio
import structlog

from ..errors import BootError, MachinenError
from ..protocol import mounts as protocol
from ..vmm import capped_log
from .agent_call import AgentCall
from .relay import AgentRelay

log: structlog.typing.FilteringBoundLogger = structlog.get_logger("machinen.supervisor")

SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x02, 0x04, 0x08
AT_FDCWD, AT_SYMLINK_NOFOLLOW = -100, 0x100
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
RENAME_NOREPLACE = 1
MODE_BITS = 0o777  # no set-uid, set-gid or sticky bit on a host file the guest made
# A rename that moves a directory up is refused with EXDEV past this many entries (the
# links in it would have to be checked): ``mv`` then copies, making each link anew.
RENAME_CHECK_ENTRIES = 10_000
REQUESTS_IN_FLIGHT = 8  # answers being built or sent at once, per mount (on threads of its own)
REQUESTS_WAITING = 64  # decoded and not yet answered, per mount call
# A guest that breaks the mount protocol over and over costs at most this many log lines a
# minute; beyond them each new call waits BREAK_BACKOFF_S.
BREAKS_PER_WINDOW, BREAK_BACKOFF_S = 5, 1.0
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
            self.root_fd: int = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise BootError(f"cannot mount {root}: {exc.strerror}", code="MOUNT_SOURCE_NOT_FOUND") from None
        self.read_only = read_only
        self.shape_lock: threading.Lock = (
            threading.Lock()
        )  # symlink and rename: a check and what it checked stay together
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
    def _checked(self, path: Any, *, directory: bool):
        """An ``O_PATH`` descriptor of a regular file with no other hard link (or, with
        ``directory``, of a directory): nothing else is ever opened or changed."""
        fd = self._beneath(path, os.O_PATH)
        try:
            facts = os.fstat(fd)
            if stat.S_ISDIR(facts.st_mode):
                if not directory:
                    raise OSError(errno.EISDIR, "a directory")
            elif not stat.S_ISREG(facts.st_mode):
                raise OSError(errno.EPERM, "neither a regular file nor a directory")
            elif facts.st_nlink > 1:
                raise OSError(errno.EPERM, "a file with other hard links (they may be outside the mount)")
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _file(self, path: Any, flags: int, *, directory: bool = False):
        """``path`` opened with ``flags`` once checked (``_checked``), through the checked descriptor."""
        with self._checked(path, directory=directory) as checked:
            fd = os.open(f"/proc/self/fd/{checked}", flags | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            yield fd
        finally:
            os.close(fd)

    def _lstat(self, path: Any) -> list[int]:
        path = protocol.check_path(path)
        if not path:
            return _attrs(os.fstat(self.root_fd))
        with self._parent(path) as (fd, name):
            return _attrs(os.stat(name, dir_fd=fd, follow_symlinks=False))

    # --- reading ----------------------------------------------------------------

    def _list(self, path: Any) -> list[list[str | int]]:
        fd = self._beneath(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK)
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

    def _statfs(self) -> list[int]:
        facts = os.statvfs(self.root_fd)
        return [facts.f_blocks, facts.f_bfree, facts.f_bavail, facts.f_files, facts.f_ffree, facts.f_bsize,
                facts.f_namemax]  # fmt: skip

    def _open(self, path: Any, writable: bool, truncate: bool) -> None:
        if self.read_only and (writable or truncate):
            raise OSError(errno.EROFS, "read-only mount")
        with self._file(path, os.O_RDWR if writable else os.O_RDONLY) as fd:
            if truncate:
                os.ftruncate(fd, 0)

    # --- writing ----------------------------------------------------------------

    def _write(self, path: Any, offset: int, data: bytes) -> int:
        if not isinstance(data, bytes) or len(data) > protocol.MAX_IO:
            raise OSError(errno.EINVAL, "a write moves at most MAX_IO bytes")
        with self._file(path, os.O_WRONLY) as fd:
            return os.pwrite(fd, data, offset)

    def _create(self, path: Any, mode: int, exclusive: bool) -> list[int]:
        try:
            fd = self._beneath(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            if exclusive:
                raise
            with self._file(path, os.O_WRONLY):
                pass  # there already: opened as it is, as open(O_CREAT) would
        else:
            try:
                os.fchmod(fd, mode & MODE_BITS)  # the guest applied its umask; ours must not apply too
            finally:
                os.close(fd)
        return self._lstat(path)

    def _truncate(self, path: Any, size: int) -> None:
        with self._file(path, os.O_WRONLY) as fd:
            os.ftruncate(fd, size)

    def _mkdir(self, path: Any, mode: int) -> list[int]:
        with self._parent(path) as (fd, name):
            os.mkdir(name, 0o700, dir_fd=fd)
        self._chmod(path, mode)  # the guest applied its umask; ours must not apply too
        return self._lstat(path)

    def _symlink(self, target: Any, path: Any) -> list[int]:
        path = protocol.check_path(path)
        if not isinstance(target, str) or not target or "\0" in target or len(target) > protocol.MAX_PATH:
            raise OSError(errno.EINVAL, "not a symlink target")
        if not _stays_inside(target, _depth(path)):
            raise OSError(errno.EPERM, "a symlink on a live mount stays inside it")
        with self.shape_lock, self._parent(path) as (fd, name):
            os.symlink(target, name, dir_fd=fd)
        return self._lstat(path)

    def _unlink(self, path: Any) -> None:
        with self._parent(path) as (fd, name):
            os.unlink(name, dir_fd=fd)

    def _rmdir(self, path: Any) -> None:
        with self._parent(path) as (fd, name):
            os.rmdir(name, dir_fd=fd)

    def _rename(self, old: Any, new: Any, noreplace: bool) -> None:
        with (
            self.shape_lock,
            self._parent(old) as (old_fd, old_name),
            self._parent(new) as (new_fd, new_name),
        ):
            facts = os.stat(old_name, dir_fd=old_fd, follow_symlinks=False)
            if stat.S_ISLNK(facts.st_mode):
                if not _stays_inside(os.readlink(old_name, dir_fd=old_fd), _depth(new), moved=True):
                    raise OSError(errno.EPERM, "the symlink would lead outside the mount from there")
            elif stat.S_ISDIR(facts.st_mode) and _depth(new) < _depth(old):
                _check_links_moving_up(old_fd, old_name, _depth(new) + 1)
            _check(_libc.renameat2(old_fd, old_name.encode(), new_fd, new_name.encode(),
                                   RENAME_NOREPLACE if noreplace else 0))  # fmt: skip

    def _chmod(self, path: Any, mode: int) -> None:
        with self._checked(path, directory=True) as fd:  # O_PATH refuses a symlink: chmod would follow it
            os.chmod(f"/proc/self/fd/{fd}", mode & MODE_BITS)

    def _utimens(self, path: Any, atime_ns: int, mtime_ns: int) -> None:
        def spec(ns: int) -> _Timespec:
            return _Timespec(0, ns) if ns in (UTIME_NOW, UTIME_OMIT) else _Timespec(*divmod(ns, 1_000_000_000))

        times = (_Timespec * 2)(spec(atime_ns), spec(mtime_ns))
        try:
            with self._checked(path, directory=True) as fd:
                _check(_libc.utimensat(AT_FDCWD, f"/proc/self/fd/{fd}".encode(), times, 0))
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            with self._parent(path) as (fd, name):  # a symlink's own times (``touch -h``)
                _check(_libc.utimensat(fd, name.encode(), times, AT_SYMLINK_NOFOLLOW))

    def _fsync(self, path: Any) -> None:
        with self._file(path, os.O_RDONLY, directory=True) as fd:
            os.fsync(fd)


def _depth(path: str) -> int:
    """How many directories below the root the entry at ``path`` (checked) sits in."""
    return path.count("/")


def _stays_inside(target: str, depth: int, *, moved: bool = False) -> bool:
    """Whether a symlink to ``target`` in a directory ``depth`` levels below the root resolves
    inside: relative, climbing only before it names anything, and no higher than ``depth``
    (where it climbs from is then a real directory, not a link).  A link being ``moved``
    may be absolute (one of the host's own: it leads where it led before)."""
    if target.startswith("/"):
        return moved
    parts = [part for part in target.split("/") if part not in ("", ".")]
    climb = 0
    while climb < len(parts) and parts[climb] == "..":
        climb += 1
    return ".." not in parts[climb:] and climb <= depth


def _check_links_moving_up(parent_fd: int, name: str, depth: int) -> None:
    """Refuse (EPERM) moving the directory ``name`` up to where its entries sit ``depth``
    levels below the root if a symlink in it would then lead outside; EXDEV past
    ``RENAME_CHECK_ENTRIES`` entries."""
    seen = 0
    pending = [(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                        dir_fd=parent_fd), depth)]  # fmt: skip
    try:
        while pending:
            fd, level = pending.pop()
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        seen += 1
                        if seen > RENAME_CHECK_ENTRIES:
                            raise OSError(errno.EXDEV, "too many entries to check: copy instead")
                        if entry.is_symlink():
                            if not _stays_inside(os.readlink(entry.name, dir_fd=fd), level, moved=True):
                                raise OSError(errno.EPERM, "a symlink in it would lead outside the mount")
                        elif entry.is_dir(follow_symlinks=False):
                            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                            pending.append((os.open(entry.name, flags, dir_fd=fd), level + 1))
            finally:
                os.close(fd)
    finally:
        for fd, _ in pending:
            os.close(fd)


def _attrs(facts: os.stat_result) -> list[int]:
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
    again once the agent answers (a guest that fails the call for good ends it;
    one that breaks the protocol gets a new call, logged and slowed within a budget).
    """
    threads = anyio.CapacityLimiter(REQUESTS_IN_FLIGHT)  # the mount's own: a slow one starves no other
    breaks = capped_log.Budget(BREAKS_PER_WINDOW, capped_log.BUDGET_WINDOW_S)
    while True:
        while not relay.agent_up:
            await anyio.sleep(0.05)
        outcome = await _serve_link(relay, directory, target, threads)
        if outcome is _Outcome.FAILED:
            return
        if outcome is _Outcome.BROKEN:
            if breaks.spend():
                log.warning("guest broke the mount protocol", target=target)
            else:
                if breaks.just_exhausted:
                    log.warning("guest keeps breaking the mount protocol: not logged for a while", target=target)
                await anyio.sleep(BREAK_BACKOFF_S)
        await anyio.sleep(0.05)


class _Outcome(enum.Enum):
    ENDED = "ended"  # the call ended with the agent channel: open it again
    BROKEN = "broken"  # the guest broke the protocol: open it again, within a budget
    FAILED = "failed"  # the guest failed the call: the mount is gone


async def _serve_link(
    relay: AgentRelay, directory: HostDirectory, target: str, threads: anyio.CapacityLimiter
) -> _Outcome:
    """Serve one ``mount`` call until it ends.

    Host memory stays bounded whatever the guest sends: requests are decoded one
    at a time, at most ``REQUESTS_WAITING`` of them decoded and not answered; at
    most ``REQUESTS_IN_FLIGHT`` answers exist at once, each built and sent within
    its slot and within the guest's credit (a guest crediting more than it was
    sent breaks the protocol: the relay's route rules fail the call); a request's
    bytes go back to the guest as credit only once it is answered, so what waits
    undecoded stays within one window."""
    call = AgentCall.open(relay, "mount", {"target": target, "read_only": directory.read_only})
    if call is None:
        return _Outcome.ENDED
    answer_slots = anyio.Semaphore(REQUESTS_IN_FLIGHT)
    send_lock = anyio.Lock()  # an answer's pieces are never interleaved with another's
    reader = protocol.MessageReader()
    waiting = 0  # decoded, not yet answered
    outcome: _Outcome | None = None

    async def answer(request: list[object], size: int) -> None:
        nonlocal waiting
        request_id, op, args = request
        async with answer_slots:
            error, result = await anyio.to_thread.run_sync(directory.serve, op, args, limiter=threads)
            async with send_lock:
                try:
                    await call.send(protocol.encode([request_id, error, result]))
                except MachinenError:
                    return  # the call ended: its requests come again on the next one
        call.acknowledge(size)
        waiting -= 1
        start_answers()

    def start_answers() -> None:
        """Decode and start answering what has arrived, as far as the limit allows."""
        nonlocal waiting, outcome
        while waiting < REQUESTS_WAITING and outcome is None:
            try:
                message = reader.next_message()
            except protocol.MountProtocolError as exc:
                log.debug("mount message refused", target=target, problem=str(exc))
                outcome = _Outcome.BROKEN
                tg.cancel_scope.cancel()  # the next call starts clean
                return
            if message is None:
                return
            waiting += 1
            tg.start_soon(answer, *message)

    async def take_requests() -> None:
        while data := await call.receive():
            reader.add(data)  # within the window: its credit returns as its requests are answered
            start_answers()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(take_requests)
            await call.run()
            tg.cancel_scope.cancel()  # answers still waiting for credit belong to the call that ended
        if outcome is None:
            outcome = _ended(call, target)
    finally:
        if outcome in (None, _Outcome.BROKEN):
            call.cancel()
    return outcome


def _ended(call: AgentCall, target: str) -> _Outcome:
    """What the agent's end of a ``mount`` call means for the mount."""
    if call.error is None:
        return _Outcome.ENDED
    code, message = call.error
    if code == "EXEC_PROTOCOL":
        return _Outcome.BROKEN
    if code == "EXEC_AGENT_UNAVAILABLE":
        return _Outcome.ENDED
    log.warning("guest mount failed", target=target, code=code, message=message)
    return _Outcome.FAILED
