"""``read_file`` and ``write_file``: a guest file streamed out or in, within the call's credit."""

from __future__ import annotations

import errno
import os

from ..protocol import wire
from .task import InputPump, Task, start_thread

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing into PID 1 (slow under TCG)
if TYPE_CHECKING:
    from collections.abc import Mapping


def _file_error(exc: OSError) -> tuple[str, str]:
    codes = {
        errno.ENOENT: "FILE_NOT_FOUND",
        errno.EACCES: "FILE_PERMISSION_DENIED",
        errno.EPERM: "FILE_PERMISSION_DENIED",
        errno.EISDIR: "FILE_IS_A_DIRECTORY",
        errno.ENOTDIR: "FILE_NOT_FOUND",
    }
    return codes.get(exc.errno, "FILE_IO_ERROR"), f"{exc.strerror}: {exc.filename}"


class ReadFileTask(Task):
    def start(self, params: Mapping[str, object]) -> None:
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
    input: InputPump | None  # Task's, set here once the file is open

    def start(self, params: Mapping[str, object]) -> None:
        self.path: str = params["path"]  # type: ignore[assignment]  # the SDK's write_file params (sdk/vm.py)
        self.mode: int | None = params.get("mode")  # type: ignore[assignment]
        append = params.get("append", False)
        directory = os.path.dirname(self.path) or "/"
        try:
            if params.get("parents"):
                os.makedirs(directory, exist_ok=True)
            if append:
                self.target: str | None = None
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, self.mode or 0o644)
            else:
                # Write next to the target and rename, so readers never see half a file.
                self.target = os.path.join(directory, f".{os.path.basename(self.path)}.{os.getpid()}.{self.sid}")
                fd = os.open(self.target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            return self.fail(*_file_error(exc))
        self.fd: int = fd
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
