"""``mount``: a live host directory at a guest path, as a FUSE file system served from this agent.

The kernel's requests on /dev/fuse are answered by worker threads here, each
by asking the host on the mount call (``protocol/mounts.py``).  What the file
system needs to remember -- which node id is which path, which handles are
open -- lives here, in guest memory, so a fork or a restore carries it: when
the host session changes the call is orphaned, requests wait, and the new
supervisor's ``mount`` call for the same guest path takes over and gets the
unanswered ones again.  The host keeps no state per request.

Attributes are never cached (timeouts 0) and file pages are dropped at each
open, so a change made on the host is seen at the next stat or open; writes
go through to the host before the write call returns.  Every file shows as
owned by root (uid 0, gid 0): the guest acts as root and the host side as the
supervisor's user.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import threading

from ..protocol import mounts as protocol
from ..protocol import wire
from .task import Task, start_thread

MOUNTS: dict[str, FuseMount] = {}  # by guest path: they outlive the calls that serve them
_MOUNTS_LOCK = threading.Lock()
WORKERS = 4
ROOT_ID = 1
FUSE_MINOR = 31  # FUSE 7.31 (Linux 5.4+): all this needs

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY = struct.Struct("<QQQQII")
ATTR_OUT = struct.Struct("<QII")
OPEN_OUT = struct.Struct("<QII")
INIT_IN = struct.Struct("<IIII")
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
IO_IN = struct.Struct("<QQIIQII")  # fuse_read_in and fuse_write_in share this layout
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
DIRENT = struct.Struct("<QQII")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")

LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME = (
    1,
    2,
    3,
    4,
    5,
    6,
    8,
    9,
    10,
    11,
    12,
)
LINK, OPEN, READ, WRITE, STATFS, RELEASE, FSYNC, FLUSH, INIT, OPENDIR, READDIR = (
    13,
    14,
    15,
    16,
    17,
    18,
    20,
    25,
    26,
    27,
    28,
)
RELEASEDIR, FSYNCDIR, ACCESS, CREATE, INTERRUPT, DESTROY, BATCH_FORGET, RENAME2 = 29, 30, 34, 35, 36, 38, 42, 45
SILENT = frozenset((FORGET, BATCH_FORGET, INTERRUPT))  # the kernel expects no reply
INIT_FLAGS = (1 << 0) | (1 << 3) | (1 << 5) | (1 << 12) | (1 << 22)  # async read, atomic O_TRUNC, big writes,
# auto-invalidate data on a changed mtime/size, max_pages
FATTR_MODE, FATTR_SIZE, FATTR_ATIME, FATTR_MTIME, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 1, 8, 16, 32, 128, 256
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
RENAME_NOREPLACE = 1
MS_NOSUID, MS_NODEV, MS_RDONLY = 2, 4, 1
MNT_DETACH = 2


def _name(body: bytes) -> str:
    return body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class FuseMount:
    """One mounted host directory: its node and handle tables and the host link serving it."""

    def __init__(self, target: str, read_only: bool) -> None:
        self.target: str = target
        self.cond: threading.Condition = threading.Condition()
        self.paths: dict[int, str] = {ROOT_ID: ""}
        self.lookups: dict[int, int] = {ROOT_ID: 1}
        self.nodes: dict[str, int] = {"": ROOT_ID}
        self.next_node: int = ROOT_ID + 1
        self.handles: dict[int, tuple[int, list[object] | None]] = {}  # fh -> (node, directory entries)
        self.next_handle: int = 1
        self.pending: dict[int, list[object]] = {}  # request id -> [message, reply, link it went to]
        self.next_request: int = 1
        self.link: MountTask | None = None
        self.dropped: bool = False
        os.makedirs(target, exist_ok=True)
        self.fd: int = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other,max_read={protocol.MAX_IO}"
        flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"machinen", target.encode(), b"fuse.machinen", flags, options.encode()) != 0:
            code = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(code, f"mount {target}: {os.strerror(code)}")
        for _ in range(WORKERS):
            start_thread(self._serve)

    # --- the host link -------------------------------------------------------------

    def drop(self) -> None:
        """No host serves this mount any more: fail what waits and what comes, and unmount it."""
        with self.cond:
            self.dropped = True
            for entry in self.pending.values():
                if entry[1] is None:
                    entry[1] = (errno.ENOTCONN, None)
            self.cond.notify_all()
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(self.target.encode(), MNT_DETACH) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"unmount {self.target}: {os.strerror(code)}")

    def attach(self, link: MountTask) -> None:
        """``link`` serves from now on; what no live link answered goes to it."""
        with self.cond:
            self.link = link
            unanswered = [entry for entry in self.pending.values() if entry[1] is None and entry[2] is not link]
            for entry in unanswered:
                entry[2] = link
        for entry in unanswered:
            link.send_message(entry[0])

    def detach(self, link: MountTask) -> None:
        with self.cond:
            if self.link is link:
                self.link = None

    def answer(self, request_id: int, error: int, result: object) -> None:
        with self.cond:
            entry = self.pending.get(request_id)
            if entry is not None and entry[1] is None:
                entry[1] = (error, result)
                self.cond.notify_all()

    def ask(self, op: str, *args: object) -> object:
        """The host's answer to one request; OSError with the host's errno if it failed."""
        with self.cond:
            if self.dropped:
                raise OSError(errno.ENOTCONN, "the mount was dropped")
            request_id = self.next_request
            self.next_request += 1
            entry = self.pending[request_id] = [protocol.encode([request_id, op, list(args)]), None, self.link]
            link = self.link
        try:
            if link is not None:
                link.send_message(entry[0])
            with self.cond:
                while entry[1] is None:
                    self.cond.wait()
        finally:
            with self.cond:
                del self.pending[request_id]
        error, result = entry[1]
        if error:
            raise OSError(error, os.strerror(error))
        return result

    # --- the kernel's requests ----------------------------------------------------------

    def _serve(self) -> None:
        while True:
            try:
                request = os.read(self.fd, protocol.MAX_IO + 64 * 1024)
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue  # a request the kernel took back
                return  # ENODEV: unmounted
            _, opcode, unique, node, _, _, _, _, _ = IN_HEADER.unpack_from(request)
            body = memoryview(request)[IN_HEADER.size :]
            try:
                payload, error = self.handle(opcode, node, bytes(body)), 0
            except OSError as exc:
                payload, error = b"", exc.errno or errno.EIO
            except (ValueError, KeyError, struct.error, TypeError, UnicodeError):
                payload, error = b"", errno.EINVAL
            if opcode in SILENT:
                continue
            try:
                os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size + len(payload), -error, unique) + payload)
            except OSError:
                pass  # interrupted meanwhile: the kernel no longer waits for it

    def _path(self, node: int) -> str:
        with self.cond:
            path = self.paths.get(node)
        if path is None:
            raise OSError(errno.ESTALE, "stale node")
        return path

    def _entry(self, path: str, attrs: list[int]) -> bytes:
        with self.cond:
            node = self.nodes.get(path)
            if node is None:
                node = self.nodes[path] = self.next_node
                self.next_node += 1
                self.paths[node] = path
                self.lookups[node] = 0
            self.lookups[node] += 1
        return ENTRY.pack(node, 0, 0, 0, 0, 0) + _attr(attrs)

    def _forget(self, node: int, count: int) -> None:
        with self.cond:
            if node == ROOT_ID or node not in self.lookups:
                return
            self.lookups[node] -= count
            if self.lookups[node] <= 0:
                del self.lookups[node]
                path = self.paths.pop(node)
                if self.nodes.get(path) == node:
                    del self.nodes[path]

    def _moved(self, old: str, new: str) -> None:
        """Renamed: the node of ``old`` and everything below it now answer to ``new``."""
        with self.cond:
            moving = [(p, n) for p, n in self.nodes.items() if p == old or p.startswith(old + "/")]
            for path, node in moving:
                del self.nodes[path]
            for path, node in moving:
                renamed = new + path[len(old) :]
                stale = self.nodes.pop(renamed, None)
                if stale is not None:
                    self.paths[stale] = None  # what the rename replaced: gone
                self.nodes[renamed] = node
                self.paths[node] = renamed

    def _handle(self, node: int, entries: list | None = None) -> int:
        with self.cond:
            handle = self.next_handle
            self.next_handle += 1
            self.handles[handle] = (node, entries)
        return handle

    def handle(self, opcode: int, node: int, body: bytes) -> bytes:
        if opcode == INIT:
            _, _, readahead, flags = INIT_IN.unpack_from(body)
            return INIT_OUT.pack(7, FUSE_MINOR, min(readahead, protocol.MAX_IO), flags & INIT_FLAGS, 16, 12,
                                 protocol.MAX_IO, 1, protocol.MAX_IO // 4096, 0, 0)  # fmt: skip
        if opcode == FORGET:
            self._forget(node, struct.unpack_from("<Q", body)[0])
            return b""
        if opcode == BATCH_FORGET:
            (count,) = struct.unpack_from("<I", body)
            for index in range(count):
                self._forget(*struct.unpack_from("<QQ", body, 8 + 16 * index))
            return b""
        if opcode in (INTERRUPT, FLUSH, DESTROY):
            return b""
        if opcode == ACCESS:
            raise OSError(errno.ENOSYS, "no access checks here: the kernel's own apply")
        if opcode in (RELEASE, RELEASEDIR):
            with self.cond:
                self.handles.pop(struct.unpack_from("<Q", body)[0], None)
            return b""
        path = self._path(node)
        if opcode == LOOKUP:
            child = _join(path, _name(body))
            return self._entry(child, self.ask("lstat", child))
        if opcode == GETATTR:
            return ATTR_OUT.pack(0, 0, 0) + _attr(self.ask("lstat", path))
        if opcode == SETATTR:
            return ATTR_OUT.pack(0, 0, 0) + _attr(self._setattr(path, SETATTR_IN.unpack_from(body)))
        if opcode == READLINK:
            return self.ask("readlink", path).encode("utf-8", "surrogateescape")
        if opcode == OPEN:
            (flags,) = struct.unpack_from("<I", body)
            self.ask("open", path, flags & os.O_ACCMODE != os.O_RDONLY, bool(flags & os.O_TRUNC))
            return OPEN_OUT.pack(self._handle(node), 0, 0)
        if opcode == READ:
            _, offset, size, *_ = IO_IN.unpack_from(body)
            return self.ask("read", path, offset, min(size, protocol.MAX_IO))
        if opcode == WRITE:
            _, offset, size, *_ = IO_IN.unpack_from(body)
            data = body[IO_IN.size : IO_IN.size + size]
            return struct.pack("<II", self.ask("write", path, offset, data), 0)
        if opcode in (FSYNC, FSYNCDIR):
            self.ask("fsync", path)
            return b""
        if opcode == STATFS:
            blocks, free, available, files, free_files, block_size, name_max = self.ask("statfs")
            return STATFS_OUT.pack(blocks, free, available, files, free_files, block_size, name_max, block_size, 0)
        if opcode == OPENDIR:
            return OPEN_OUT.pack(self._handle(node, None), 0, 0)
        if opcode == READDIR:
            return self._readdir(path, *struct.unpack_from("<QQI", body))
        if opcode in (MKNOD, CREATE):
            mode = struct.unpack_from("<I", body, 4 if opcode == CREATE else 0)[0]
            if not stat.S_ISREG(mode):
                raise OSError(errno.EPERM, "only regular files can be made here")
            if opcode == MKNOD:
                child = _join(path, _name(body[16:]))
                return self._entry(child, self.ask("create", child, stat.S_IMODE(mode), True))
            (flags,) = struct.unpack_from("<I", body)
            child = _join(path, _name(body[16:]))
            entry = self._entry(child, self.ask("create", child, stat.S_IMODE(mode), bool(flags & os.O_EXCL)))
            with self.cond:
                node = self.nodes[child]
            return entry + OPEN_OUT.pack(self._handle(node), 0, 0)
        if opcode == MKDIR:
            (mode,) = struct.unpack_from("<I", body)
            child = _join(path, _name(body[8:]))
            return self._entry(child, self.ask("mkdir", child, stat.S_IMODE(mode)))
        if opcode == SYMLINK:
            name, target = body.split(b"\0")[:2]
            child = _join(path, name.decode("utf-8", "surrogateescape"))
            return self._entry(child, self.ask("symlink", target.decode("utf-8", "surrogateescape"), child))
        if opcode in (UNLINK, RMDIR):
            child = _join(path, _name(body))
            self.ask("unlink" if opcode == UNLINK else "rmdir", child)
            with self.cond:
                removed = self.nodes.pop(child, None)
                if removed is not None:
                    self.paths[removed] = None  # its handles now fail with ESTALE
            return b""
        if opcode in (RENAME, RENAME2):
            header = 8 if opcode == RENAME else 16
            new_dir = struct.unpack_from("<Q", body)[0]
            flags = struct.unpack_from("<I", body, 8)[0] if opcode == RENAME2 else 0
            if flags & ~RENAME_NOREPLACE:
                raise OSError(errno.EINVAL, "only RENAME_NOREPLACE is supported")
            old_name, new_name = body[header:].split(b"\0")[:2]
            old = _join(path, old_name.decode("utf-8", "surrogateescape"))
            new = _join(self._path(new_dir), new_name.decode("utf-8", "surrogateescape"))
            self.ask("rename", old, new, bool(flags & RENAME_NOREPLACE))
            self._moved(old, new)
            return b""
        if opcode == LINK:
            raise OSError(errno.EPERM, "hard links are not made on a live mount")
        raise OSError(errno.ENOSYS, f"FUSE opcode {opcode}")

    def _setattr(self, path: str, fields: tuple) -> list:
        valid, _, _, size, _, atime, mtime, _, atime_ns, mtime_ns, _, mode, *_ = fields
        if valid & FATTR_MODE:
            self.ask("chmod", path, stat.S_IMODE(mode))
        if valid & FATTR_SIZE:
            self.ask("truncate", path, size)
        if valid & (FATTR_ATIME | FATTR_MTIME):

            def when(is_set: int, now: int, seconds: int, nanoseconds: int) -> int:
                if not valid & is_set:
                    return UTIME_OMIT
                return UTIME_NOW if valid & now else seconds * 1_000_000_000 + nanoseconds

            self.ask("utimens", path, when(FATTR_ATIME, FATTR_ATIME_NOW, atime, atime_ns),
                     when(FATTR_MTIME, FATTR_MTIME_NOW, mtime, mtime_ns))  # fmt: skip
        return self.ask("lstat", path)

    def _readdir(self, path: str, handle: int, offset: int, size: int) -> bytes:
        with self.cond:
            _, entries = self.handles.get(handle, (None, None))
        if entries is None or offset == 0:
            entries = [[".", 0, stat.S_IFDIR], ["..", 0, stat.S_IFDIR], *self.ask("list", path)]
            with self.cond:
                if handle in self.handles:
                    self.handles[handle] = (self.handles[handle][0], entries)
        out = bytearray()
        for index in range(offset, len(entries)):
            name, inode, kind = entries[index]
            encoded = name.encode("utf-8", "surrogateescape")
            record = DIRENT.pack(inode or 1, index + 1, len(encoded), kind >> 12) + encoded
            record += b"\0" * (-len(record) % 8)
            if len(out) + len(record) > size:
                break
            out += record
        return bytes(out)


def _attr(attrs: list[int]) -> bytes:
    """A host lstat ``[ino, mode, nlink, size, blocks, atime_ns, mtime_ns, ctime_ns, blksize]`` as fuse_attr."""
    inode, mode, links, size, blocks, atime, mtime, ctime, block_size = attrs
    seconds = [t // 1_000_000_000 for t in (atime, mtime, ctime)]
    nanoseconds = [t % 1_000_000_000 for t in (atime, mtime, ctime)]
    return ATTR.pack(inode, size, blocks, *seconds, *nanoseconds, mode, links, 0, 0, 0, block_size, 0)


def mounted(target: object, read_only: bool) -> FuseMount:
    """The live mount at ``target``, mounted now if it is not yet (requests wait for a link)."""
    if not isinstance(target, str) or not target.startswith("/") or "\0" in target:
        raise ValueError(f"not an absolute guest path: {target!r:.200}")
    with _MOUNTS_LOCK:
        mount = MOUNTS.get(target)
        if mount is None:
            mount = MOUNTS[target] = FuseMount(target, read_only)
        return mount


def drop_mount(params: wire.Params) -> dict[str, bool]:
    """``mount_drop``: a mount the saved state had and this VM does not keep; what is open on it fails."""
    with _MOUNTS_LOCK:
        mount = MOUNTS.pop(params["target"], None)
    if mount is not None:
        mount.drop()
    return {"dropped": mount is not None}


def prepare_mount(params: wire.Params) -> dict[str, str]:
    """``mount_prepare``: mount before the workload starts, ahead of the call that will serve it."""
    mounted(params["target"], bool(params.get("read_only")))
    return {"mounted": params["target"]}


class MountTask(Task):
    """The host side's link to one mount: requests out on fd 1, answers in on fd 0."""

    mount: FuseMount | None = None

    def start(self, params: wire.Params) -> None:
        self.send_lock: threading.Lock = threading.Lock()
        self.reader: protocol.MessageReader = protocol.MessageReader()
        try:
            self.mount = mounted(params.get("target"), bool(params.get("read_only")))
        except (OSError, ValueError) as exc:
            return self.fail("MOUNT_FAILED", str(exc))
        self.mount.attach(self)

    def send_message(self, message: bytes) -> None:
        """One whole request (never interleaved with another's bytes), within the host's credit."""
        with self.send_lock:
            view = memoryview(message)
            while view:
                size = min(self.take_credit(wire.STDOUT), len(view))
                if self.cancelled or self.orphaned:
                    return  # this link is gone; the request waits for the next one
                self.spend_credit(wire.STDOUT, size)
                self.send([wire.DATA, self.sid, wire.STDOUT, bytes(view[:size])])
                view = view[size:]

    def on_frame(self, frame: wire.Frame) -> None:
        if wire.kind(frame) != wire.DATA:
            return super().on_frame(frame)
        fd, answer_bytes = wire.data(frame)
        if fd != wire.STDIN:
            return None  # answers come on stdin only
        try:
            answers = self.reader.feed(answer_bytes)
        except protocol.MountProtocolError as exc:
            self.mount.detach(self)
            return self.fail("EXEC_PROTOCOL", f"mount answers: {exc}")
        for request_id, error, result in answers:
            if type(error) is int:
                self.mount.answer(request_id, error, result)
        self.send([wire.CREDIT, self.sid, wire.STDIN, len(answer_bytes)])
        return None

    def on_session_change(self) -> None:
        if self.mount is not None:
            self.mount.detach(self)
        super().on_session_change()

    def on_cancel(self) -> None:
        if self.mount is not None:
            self.mount.detach(self)
        super().on_cancel()
