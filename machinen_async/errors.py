"""Typed errors with stable ``code`` strings.

Codes follow machinen's (see docs/architecture.md); they are part of the API
and never change meaning.  Every error crosses process boundaries (guest
agent -> supervisor -> SDK/CLI) as ``(code, message)`` and is rebuilt here by
``error_from_code``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class MachinenError(Exception):
    """Base of every error this package raises on purpose."""

    default_code = "MACHINEN_ERROR"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None, **details: Any):
        super().__init__(message)
        self.code = code or self.default_code
        if retryable is not None:
            self.retryable = retryable
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class BootError(MachinenError):
    default_code = "BOOT_FAILED"


class BootTimeoutError(BootError):
    default_code = "BOOT_TIMEOUT"
    retryable = True


class AssetsError(MachinenError):
    default_code = "ASSETS_BUILD_FAILED"


class ExecError(MachinenError):
    """A guest command failed; ``result`` is set for EXEC_NONZERO_EXIT."""

    default_code = "EXEC_PROTOCOL"

    def __init__(self, message: str, *, code: str | None = None, result: Any = None, **details: Any):
        super().__init__(message, code=code, **details)
        self.result = result


class ExecTimeoutError(ExecError):
    default_code = "EXEC_AGENT_TIMEOUT"


class AgentUnavailableError(ExecError):
    default_code = "EXEC_AGENT_UNAVAILABLE"
    retryable = True


class GuestFileError(MachinenError):
    default_code = "FILE_IO_ERROR"


class SnapshotError(MachinenError):
    default_code = "SNAPSHOT_DUMP_FAILED"


class ForkError(MachinenError):
    default_code = "FORK_FAILED"


class RegistryError(MachinenError):
    default_code = "REGISTRY_VM_NOT_FOUND"


class HostError(MachinenError):
    """A remote host: unreachable, another machinen version, or unable to run this VM."""

    default_code = "HOST_UNREACHABLE"


class TransferError(MachinenError):
    """Moving files between hosts failed; what arrived is kept, so a retry resumes."""

    default_code = "TRANSFER_FAILED"
    retryable = True


class HandoffError(MachinenError):
    """A handoff did not complete; the source VM is running as before."""

    default_code = "HANDOFF_FAILED"


class ImageError(MachinenError):
    """An OCI / Docker image could not be named, pulled or unpacked; nothing half-written is kept."""

    default_code = "IMAGE_PULL_FAILED"


_CLASS_BY_CODE: dict[str, type[MachinenError]] = {
    "BOOT_TIMEOUT": BootTimeoutError,
    "EXEC_AGENT_TIMEOUT": ExecTimeoutError,
    "EXEC_AGENT_UNAVAILABLE": AgentUnavailableError,
}
_CLASS_BY_PREFIX: dict[str, type[MachinenError]] = {
    "BOOT_": BootError,
    "ASSETS_": AssetsError,
    "EXEC_": ExecError,
    "FILE_": GuestFileError,
    "SNAPSHOT_": SnapshotError,
    "FORK_": ForkError,
    "REGISTRY_": RegistryError,
    "HOST_": HostError,
    "TRANSFER_": TransferError,
    "HANDOFF_": HandoffError,
    "IMAGE_": ImageError,
}


def error_from_code(
    code: str, message: str, *, unknown: type[MachinenError] = MachinenError, **details: Any
) -> MachinenError:
    """Rebuild a typed error received from another process; a code of none of our kinds is an
    ``unknown`` (a hostile guest may send any string)."""
    cls = _CLASS_BY_CODE.get(code)
    if cls is None:
        cls = next((c for p, c in _CLASS_BY_PREFIX.items() if code.startswith(p)), unknown)
    return cls(message, code=code, **details)


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


@contextmanager
def plain_errors() -> Iterator[None]:
    """Re-raise a task group's failure as the plain typed error it carries.

    Callers of ``vm.exec()`` expect ``except ExecError``, not an
    ``ExceptionGroup`` produced by the tasks that collect its output.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if all(isinstance(leaf, MachinenError) for leaf in leaves):
            raise leaves[0] from None
        raise
