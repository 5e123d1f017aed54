"""The live-mount protocol: file requests from the guest, answered by the supervisor from a host directory.

A live mount is one long ``mount`` call the supervisor opens to the agent.  On
it the guest's FUSE daemon (``guest/mounts.py``) sends requests on fd 1 and
the supervisor (``supervisor/mounts.py``) answers on fd 0, both as messages
``u32 length | msgpack``: ``[request_id, op, args]`` and ``[request_id, errno,
result]``.  Requests name files by path relative to the mount's root and hold
no state on the host, so the mount survives what the call does not: a fork
or restore starts a new agent session, the new supervisor opens the call
again, and the daemon (in guest memory, forked with it) re-sends what was
unanswered.  Stdlib + msgpack: it is copied into the image.
"""

from __future__ import annotations

import struct

import msgpack

TYPE_CHECKING = False  # what checkers assume true; PID 1 imports this module and need not import typing
if TYPE_CHECKING:
    from typing import TypeGuard

# Request ops and their args; the host checks every one (the guest may be hostile).
OPS = {
    "lstat": ("path",),
    "list": ("path",),
    "readlink": ("path",),
    "read": ("path", "offset", "size"),
    "statfs": (),
    "write": ("path", "offset", "data"),
    "create": ("path", "mode", "exclusive"),
    "truncate": ("path", "size"),
    "open": ("path", "writable", "truncate"),
    "mkdir": ("path", "mode"),
    "symlink": ("target", "path"),
    "unlink": ("path",),
    "rmdir": ("path",),
    "rename": ("old", "new", "noreplace"),
    "chmod": ("path", "mode"),
    "utimens": ("path", "atime_ns", "mtime_ns"),
    "fsync": ("path",),
}
WRITING_OPS = frozenset(("write", "create", "truncate", "mkdir", "symlink", "unlink", "rmdir", "rename", "chmod",
                         "utimens"))  # fmt: skip
MAX_IO = 128 * 1024  # the most one read or write moves (FUSE's max_write)
MAX_MESSAGE = MAX_IO + 8 * 1024
MAX_PATH, MAX_NAME = 4096, 255
MountEntry = list[str | bool]  # [host directory, guest path, read only]: a live mount on the wire
_LENGTH = struct.Struct(">I")


class MountProtocolError(Exception):
    """A message that is not one of this protocol's."""


def encode(message: list[object]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(body)) + body


class MessageReader:
    """Messages out of a byte stream that arrives in pieces; each bounded before it is decoded."""

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self.limit: int = limit
        self.buffer: bytearray = bytearray()

    def add(self, data: bytes) -> None:
        self.buffer += data

    def feed(self, data: bytes) -> list[list[object]]:
        """Take ``data``; every message now complete."""
        self.add(data)
        messages: list[list[object]] = []
        while (message := self.next_message()) is not None:
            messages.append(message[0])
        return messages

    def next_message(self) -> tuple[list[object], int] | None:
        """The next complete message in what was fed and the bytes it took, or None.  A host
        takes them one at a time, so what it has decoded and not answered stays bounded."""
        if len(self.buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self.buffer)
        if length > self.limit:
            raise MountProtocolError(f"a message of {length} bytes (at most {self.limit})")
        size = _LENGTH.size + length
        if len(self.buffer) < size:
            return None
        body = bytes(self.buffer[_LENGTH.size : size])
        del self.buffer[:size]
        try:
            message = msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=MAX_MESSAGE,
                                      max_str_len=MAX_PATH * 2, max_array_len=1 << 16, max_map_len=16)  # fmt: skip
        except Exception as exc:
            raise MountProtocolError(f"undecodable message: {type(exc).__name__}") from None
        if not isinstance(message, list) or len(message) != 3 or type(message[0]) is not int:
            raise MountProtocolError("a message is [request_id, op or errno, args or result]")
        return message, size


def check_path(path: object) -> str:
    """A path relative to the mount root, or MountProtocolError: no "..", ".", empty parts, NUL."""
    if type(path) is not str or len(path) > MAX_PATH or "\0" in path:
        raise MountProtocolError("a path is a string without NUL of at most 4096 characters")
    if path == "":
        return path
    parts = path.split("/")
    if any(part in ("", ".", "..") or len(part.encode()) > MAX_NAME for part in parts):
        raise MountProtocolError(f"not a path inside the mount: {path[:200]!r}")
    return path


def is_mount_entry(value: object, *, drop: bool = False) -> TypeGuard[MountEntry]:
    """``[host directory, guest path, read only]``, both paths absolute: how a live mount is recorded
    (supervisor config, fork template, bundle manifest) and asked for over the peer link, where
    (``drop``) a host directory ``""`` asks for it to be unmounted."""

    def absolute(path: object) -> bool:
        return isinstance(path, str) and path.startswith("/") and "\0" not in path and len(path) <= MAX_PATH

    return (
        isinstance(value, list)
        and len(value) == 3
        and (absolute(value[0]) or (drop and value[0] == ""))
        and absolute(value[1])
        and (type(value[2]) is bool)
    )
