"""Typed errors with stable ``code`` strings, and ``ERRORS``, the one registry of every code.

Codes follow machinen's; they are part of the API and never change meaning.  Each code belongs
to one class (``ERRORS``: rows of codes, their class and when they are raised; docs/errors.md is
generated from it, and a test fails when any code literal in the package is not in it).  Raising
``MachinenError(message, code=CODE)`` or any ancestor of CODE's class gives an error of CODE's
class, so ``except ForkError`` catches every FORK_ code however it was raised, here or in another
process.  Every error crosses process boundaries (guest agent -> supervisor -> SDK/CLI, peer ->
client) as ``(code, message)`` and is rebuilt by ``error_from_code``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sdk.process import ExecResult


class MachinenError(Exception):
    """Base of every error this package raises on purpose."""

    default_code: str = "MACHINEN_ERROR"
    retryable: bool = False
    code: str
    message: str
    details: dict[str, object]

    def __new__(cls, message: str = "", *args: object, code: str | None = None, **details: object) -> MachinenError:
        registered = _CLASS_OF.get(code or "")
        # The class of the code, the most specific one, when it is this class or one of its own.
        made = registered if registered is not None and issubclass(registered, cls) else cls
        return super().__new__(made, message)

    def __init__(
        self, message: str, *, code: str | None = None, retryable: bool | None = None, **details: object
    ) -> None:
        super().__init__(message)
        self.code = code or self.default_code
        if retryable is not None:
            self.retryable = retryable
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def to_dict(self) -> dict[str, str | bool]:
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

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool | None = None,
        result: ExecResult | None = None,
        **details: object,
    ) -> None:
        super().__init__(message, code=code, retryable=retryable, **details)
        self.result: ExecResult | None = result


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


class MountError(BootError):
    """A mount that is not one, or a directory that is not there (a boot error too)."""

    default_code = "MOUNT_SPEC_INVALID"


class ArgumentError(MachinenError):
    """An argument that is not one: a port spec, a CLI flag."""

    default_code = "PARSE_ARGS"


class PathError(MachinenError):
    default_code = "PATH_NOT_PRIVATE"


class StopError(MachinenError):
    default_code = "STOP_FAILED"


class ProvisionError(MachinenError):
    default_code = "PROVISION_FAILED"


class PoolError(MachinenError):
    default_code = "POOL_CLOSED"


class McpServerError(MachinenError):
    """``machinen mcp``: a server-wide limit reached, its extra not installed, an unusable token."""

    default_code = "MCP_LIMIT_VMS"


class ConnectionLostError(HostError, TransferError):
    """A host's connection dropped mid-call; what a push sent is kept, so a retry resumes."""

    default_code = "HOST_CONNECTION_LOST"
    retryable = True


@dataclass(frozen=True)
class ErrorRow:
    """Codes raised as ``cls``, and when (one row of docs/errors.md)."""

    cls: type[MachinenError]
    codes: tuple[str, ...]
    when: str


ERRORS: tuple[ErrorRow, ...] = tuple(ErrorRow(*row) for row in (
    (BootError, ("BOOT_IMAGE_NOT_FOUND",), "`image` does not exist; or the image a bundle was taken on is not on this host"),
    (ImageError, ("IMAGE_REFERENCE_INVALID", "IMAGE_NOT_FOUND", "IMAGE_AUTH_FAILED"), "an image reference that is not one (Docker's grammar); the registry has no such image or tag (its own words); wrong or missing credentials"),
    (ImageError, ("IMAGE_DIGEST_MISMATCH", "IMAGE_PLATFORM_MISSING", "IMAGE_PULL_FAILED"), "a blob or manifest is not what its digest says (nothing of it is kept); the index has no image for this platform (the ones it has are listed); the registry could not be reached (retryable, names the host)"),
    (ImageError, ("IMAGE_TOO_LARGE", "IMAGE_LAYER_INVALID", "IMAGE_MANIFEST_INVALID", "IMAGE_FORMAT_UNSUPPORTED", "IMAGE_PLATFORM_INVALID", "IMAGE_CACHE_CORRUPT"), "a manifest, layer or flattened tree over its bound; a layer that does not decode or names a path outside the root; a manifest or index that is not one; Docker schema 1, foreign layers or a non-image artifact; a `--platform` that is not `os/arch[/variant]`; a cache file that no longer matches its digest"),
    (ImageError, ("IMAGE_PULL_POLICY_INVALID", "IMAGE_CREDENTIALS_INVALID"), '`pull` not "missing", "always" or "never"; `credentials` not a (user, password) pair'),
    (MountError, ("MOUNT_SPEC_INVALID", "MOUNT_SOURCE_NOT_FOUND"), "a mount that is not `HOST:GUEST[:ro\\|rw]` or covers a system path, or two at one guest path; the host directory is not there (at boot, or at restore), or a restored bundle's live mount is not named in `mounts=` and the bundle was not written here by your machinen (taken elsewhere, `trust=True`, or received by `push`)"),
    (MountError, ("MOUNT_FAILED", "MOUNT_COPY_FAILED", "MOUNT_COPY_STALLED"), "the guest could not mount a live mount; copying a `--mount` directory in failed, or the guest took nothing of it for `boot_timeout` seconds"),
    (BootError, ("BOOT_MEMORY_INVALID", "BOOT_CPUS_INVALID", "BOOT_TIMEOUT_INVALID"), "memory not an int ≥ 64 MiB, or more than the host has available; cpus not an int ≥ 1; `boot_timeout` not a positive number"),
    (BootError, ("BOOT_TTL_INVALID",), "`ttl` or `idle_timeout` (boot, fork, restore, `--ttl`, `--idle-timeout`) or `vm.extend(seconds)` not a positive finite number of seconds"),
    (BootError, ("BOOT_ON_IDLE_INVALID",), '`on_idle` (boot, fork, restore, `--on-idle`) not "stop" or "snapshot:DIR", given without `idle_timeout`, or a snapshot for more than one VM (one bundle directory each)'),
    (BootTimeoutError, ("BOOT_TIMEOUT",), "the guest agent did not answer within `boot_timeout` (message has the console tail)"),
    (BootError, ("BOOT_FAILED", "BOOT_CANCELLED"), "QEMU or the supervisor died while booting (message has QEMU's output and the console tail); the supervisor was told to stop while it booted"),
    (BootError, ("BOOT_ACCEL_INVALID", "BOOT_QEMU_MISSING", "BOOT_VMM_UNKNOWN"), "bad `accel` / QEMU not installed / `MACHINEN_VMM` names no backend of this build"),
    (BootError, ("BOOT_PORT_FORWARD_IN_USE",), 'the host port is taken (the message names the VM holding it, or "another process")'),
    (BootError, ("BOOT_NETWORK_RULE_INVALID", "BOOT_NETWORK_GUARD_FAILED"), "a `NetworkPolicy` rule is neither a name (`api.example.com`, `*.example.com`, either with `:PORT`) nor `ADDR[/PREFIX][:PORT]`, `vm.set_network` on a VM without a network device; QEMU's connection filter could not be installed (needs Linux ≥ 5.5, on x86_64 or aarch64)"),
    (BootError, ("BOOT_DNS_SERVERS_INVALID",), "`MACHINEN_DNS_SERVERS` holds an item that is not `ADDR[:PORT]` (IPv6 in brackets)"),
    (BootError, ("BOOT_SECRET_INVALID",), "a secret's name is not an environment variable's name, its value is not printable ASCII (it goes into HTTP headers), its hosts are not host names (`api.example.com`, `*.example.com` with two labels at least, either with `:PORT`), its headers are not header names or name one it may not go in (Host, Origin, Content-Type...); secrets for a VM without a network device; a name `machinen mcp` holds no secret of"),
    (BootError, ("BOOT_CONFINEMENT_UNAVAILABLE",), "`MACHINEN_QEMU_NAMESPACES=on` (or `MACHINEN_VMM=fake`, which always runs its agent under bwrap) but bwrap is missing or cannot create a user namespace here"),
    (BootError, ("BOOT_CMD_NOT_FOUND",), "the workload command does not exist in the guest"),
    (BootError, ("BOOT_SNAPSHOT_NOT_FOUND",), "no bundle (no `manifest.cbor`) in the directory"),
    (ExecError, ("EXEC_NONZERO_EXIT",), "`check=True` and the command failed (`.result` has the output)"),
    (ExecTimeoutError, ("EXEC_AGENT_TIMEOUT",), "`timeout` expired: the guest process group was killed (`.result` has partial output)"),
    (AgentUnavailableError, ("EXEC_AGENT_UNAVAILABLE",), "the VM went away during the call (retryable)"),
    (ExecError, ("EXEC_COMMAND_NOT_FOUND", "EXEC_CWD_NOT_FOUND", "EXEC_PERMISSION_DENIED", "EXEC_SPAWN_FAILED", "EXEC_COMMAND_INVALID"), "the command could not start (or was empty)"),
    (ExecError, ("EXEC_PROTOCOL",), 'the guest agent (or a peer) broke the protocol: a malformed frame, output beyond its credit window, a frame a call cannot take; the message says which (see docs/security.md)'),
    (ExecError, ("EXEC_CANCELLED", "EXEC_STDIN_CLOSED"), "the call was cancelled; input sent to a call that has finished"),
    (ExecError, ("EXEC_OUTPUT_TOO_LARGE",), "`exec()` output beyond `max_output` (default 256 MiB per stream; the process is killed)"),
    (ExecError, ("TUNNEL_CONNECT_FAILED",), "nothing listens on the guest port of a forward (the host connection is closed)"),
    (GuestFileError, ("FILE_NOT_FOUND", "FILE_PERMISSION_DENIED", "FILE_IS_A_DIRECTORY", "FILE_IO_ERROR", "FILE_TOO_LARGE"), "guest file calls; a `read_file()` beyond `max_output`"),
    (PathError, ("PATH_NOT_PRIVATE",), "a directory machinen would use is a symlink, not a directory, or owned by another user"),
    (RegistryError, ("REGISTRY_VM_NOT_FOUND", "REGISTRY_NAME_IN_USE", "REGISTRY_NAME_INVALID"), "names"),
    (ArgumentError, ("PARSE_PORT_INVALID",), "a port spec is not `[ADDR:]HOST:GUEST` / a tuple, or ports were given to several siblings at once"),
    (ArgumentError, ("PARSE_ARGS", "PARSE_FLAG_INVALID"), "CLI options that do not combine; a flag value that is not one (`--env KEY=VALUE`)"),
    (ProvisionError, ("PROVISION_FAILED", "PROVISION_INSTALL_HOOK_FAILED", "PROVISION_TIMEOUT", "PROVISION_EXPORT_FAILED", "PROVISION_OUT_INVALID", "PROVISION_TOO_LARGE"), "baking an image"),
    (ForkError, ("FORK_MEMORY_BACKPRESSURE",), "the siblings would not fit in available host memory, or a Ray cluster found no room for them (retryable)"),
    (ForkError, ("FORK_FILE_LIMIT",), "the siblings need more open files than this process's hard limit allows (`ulimit -Hn`; the soft limit is raised toward it by itself)"),
    (ForkError, ("FORK_CAPTURE_INVALID",), "`MACHINEN_FORK_CAPTURE` is not `auto`, `copy` or `stream`"),
    (ForkError, ("FORK_COUNT_INVALID", "FORK_TEMPLATE_NOT_FOUND", "FORK_HOSTS_INVALID", "FORK_FAILED"), "bad `n`/`names`; the template vanished mid-fork; bad `hosts=` (none, with ports, or an unknown Ray strategy); the fork failed otherwise"),
    (PoolError, ("POOL_SIZE_INVALID", "POOL_OPTION_INVALID", "POOL_CLOSED"), "`warm_pool(size=)` not in 1..256; `name=`, `warm=` or `host=` given to a pool; `acquire()` after leaving the pool"),
    (SnapshotError, ("SNAPSHOT_CORRUPT",), "a file is missing or does not match its sha256, or the manifest is malformed"),
    (SnapshotError, ("SNAPSHOT_UNTRUSTED",), "the bundle's manifest carries no valid MAC under your key (written by another user or host, or modified): `trust=True` / `--trust` if you trust its source"),
    (SnapshotError, ("SNAPSHOT_DISK_UNSAFE",), "the bundle's `disk.qcow2` is not a plain qcow2: its header names an external data file, is encrypted, marked corrupt, or uses a feature or extension machinen does not know to be harmless"),
    (SnapshotError, ("SNAPSHOT_INCOMPATIBLE",), "bundle from another format, QEMU version, machine, accelerator, kernel or initrd; `image=` builds an image that is not byte-identical to the bundle's"),
    (SnapshotError, ("SNAPSHOT_RAM_IN_STATE",), "`restore(n=...)` of a bundle whose RAM is inside its state (one a handoff wrote, or an older snapshot of a fork)"),
    (SnapshotError, ("SNAPSHOT_DIR_NOT_EMPTY", "SNAPSHOT_DIR_INVALID", "SNAPSHOT_DUMP_FAILED"), "snapshot target problems; QEMU failed to save"),
    (AssetsError, ("ASSETS_BUILD_FAILED", "ASSETS_TOOL_MISSING", "ASSETS_PACKAGE_NOT_FOUND"), "building the guest assets"),
    (HostError, ("HOST_UNREACHABLE", "HOST_SPEC_INVALID", "HOST_CLOSED"), "SSH connection failed (or timed out), or a Ray cluster or node could not be reached; a bad `[user@]host` or Ray node ID; the `Host` was closed"),
    (HostError, ("HOST_RAY_MISSING", "HOST_RAY_NO_NODES"), "`RayHosts` without Ray installed (`pip install 'machinen_async[ray]'`); no live node of the cluster offers `machinen_slots`"),
    (HostError, ("HOST_MACHINEN_NOT_FOUND", "HOST_VERSION_MISMATCH"), "no machinen on the host; another machinen version there"),
    (HostError, ("HOST_INCOMPATIBLE",), "the host's architecture, QEMU version or accelerator cannot run the bundle"),
    (HostError, ("HOST_PROTOCOL", "HOST_PEER_FAILED"), "a host (or a request to one) broke the peer protocol: a malformed request or reply; the peer failed serving a request (the message has its error)"),
    (ConnectionLostError, ("HOST_CONNECTION_LOST",), "the SSH connection (or a Ray node's actor) dropped mid-call (retryable: a push resumes)"),
    (HostError, ("HOST_TIMEOUT",), "a host did not answer a call within 600 s"),
    (StopError, ("STOP_FAILED",), "the VM's supervisor survived SIGKILL"),
    (TransferError, ("TRANSFER_CORRUPT", "TRANSFER_INCOMPLETE", "TRANSFER_FAILED"), "a chunk or assembled file failed its sha256 check; a chunk never arrived; moving files failed otherwise"),
    (HandoffError, ("HANDOFF_TIMEOUT",), "a handoff's destination did not take over within 120 s (the source runs on)"),
    (HandoffError, ("HANDOFF_SAME_HOST", "HANDOFF_REMOTE_SOURCE", "HANDOFF_FAILED"), "handoff to this host; handoff of a VM that runs elsewhere (do it from its host); the handoff failed otherwise (the source runs on)"),
    (ForkError, ("FORK_REMOTE_SOURCE",), "a fork spread over hosts (`hosts=`) of a VM that runs elsewhere (do it from its host; a plain `fork()` of it works there)"),
    (SnapshotError, ("SNAPSHOT_VMM_UNSUPPORTED",), "the VMM backend cannot save or load machine state (`MACHINEN_VMM=fake`, the test backend: no snapshot, fork, restore or handoff)"),
    (SnapshotError, ("SNAPSHOT_VM_PAUSED",), "the VM is paused by a handoff in progress"),
    (ForkError, ("FORK_CALL_TIMEOUT",), "a sibling's call in `forks.map`/`as_completed`/`first` took longer than its `timeout`"),
    (ForkError, ("FORK_NONE_ACCEPTED",), "`forks.first` found no sibling whose call gave a result `accept` took (each failed or was rejected)"),
    (ForkError, ("FORK_VM_PAUSED",), "the VM is paused by a handoff in progress"),
    (McpServerError, ("MCP_LIMIT_VMS", "MCP_LIMIT_MEMORY"), "`machinen mcp`: starting these VMs would pass the server's `--max-vms`, or their guest memory its `--max-memory` (counted over the VMs it started that still run; retryable once some stop)"),
    (McpServerError, ("MCP_MISSING", "MCP_TOKEN_INVALID", "MCP_ADDRESS_INVALID"), "`machinen mcp` without the `mcp` extra (`pip install 'machinen_async[mcp]'`); a `--token-file` that cannot be read or holds fewer than 16 characters; `--http` not `ADDR:PORT`"),
    (MachinenError, ("MACHINEN_ERROR",), "an error of no other kind (a code another process sent that this version does not know keeps its code)"),
))  # fmt: skip


def _class_of_codes() -> dict[str, type[MachinenError]]:
    classes: dict[str, type[MachinenError]] = {}
    for row in ERRORS:
        for code in row.codes:
            if code in classes:
                raise AssertionError(f"{code} is in the error table twice")
            classes[code] = row.cls
    return classes


_CLASS_OF = _class_of_codes()


def error_from_code(code: str, message: str, *, unknown: type[MachinenError] = MachinenError) -> MachinenError:
    """Rebuild a typed error received from another process; a code this version does not know is
    an ``unknown`` with that code (a hostile guest may send any string)."""
    return _CLASS_OF.get(code, unknown)(message, code=code)


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


def errors_markdown() -> str:
    """docs/errors.md: the table of ``ERRORS`` (``make docs`` writes it)."""
    lines = [
        "# Errors",
        "",
        (
            "<!-- Generated from machinen_async/errors.py (ERRORS) by `make docs`; tests/unit/test_errors.py fails "
            "when they differ. -->"
        ),
        "",
        "Every error is a `MachinenError` subclass with a stable `code` (and `retryable`); the class of each",
        "code is fixed, wherever it was raised (here, in a VM's supervisor, its guest agent or on another",
        "host), so `except ForkError` catches every `FORK_` code.",
        "",
        "| code | class | raised when |",
        "|---|---|---|",
    ]
    for row in ERRORS:
        codes = ", ".join(f"`{code}`" for code in row.codes)
        lines.append(f"| {codes} | `{row.cls.__name__}` | {row.when} |")
    lines += ["", "A failed or cancelled `boot()` leaves nothing behind: no QEMU, no supervisor, no files.", ""]
    return "\n".join(lines)
