"""Bake images: boot a base, run an install hook with network, save the root filesystem.

The result is a rootfs tarball that ``boot(image=...)`` (and ``machinen boot
IMAGE``) takes; it carries its default cmd, env and cwd in
/etc/machinen/image.json, which the guest agent starts as the VM's workload.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import anyio

from ..errors import ExecError, ProvisionError, plain_errors
from ..protocol.guest_abi import IMAGE_CONFIG, ROOT_USER
from ..store import assets
from .boot import boot
from .process import Command, argv_of
from .vm import VM

DEFAULT_TIMEOUT_S = 600.0
# The export is a stream the guest writes: without a bound, a guest could fill the host's disk.
DEFAULT_MAX_SIZE = 16 << 30
ERROR_TAIL_BYTES = 64 << 10
# Mount points stay (as empty directories); their contents and the agent (re-added per image) do not.
EXPORT_EXCLUDES = ("./proc/*", "./sys/*", "./dev/*", "./run/*", "./tmp/*", f"./{assets.GUEST_LIB}")
# Where the image has no GNU tar (busybox, distroless), the agent's own interpreter writes the same
# stream (guest/export.py).
EXPORTER = (
    f"import sys; sys.path.insert(0, '/{assets.GUEST_LIB}'); from machinen_async.guest.export import main; main()"
)


async def provision(
    *,
    out: str | os.PathLike[str],
    install: Callable[[VM], Awaitable[object]] | None = None,
    cmd: Command | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    base: str | os.PathLike[str] | None = None,
    memory_mib: int = 512,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_size: int = DEFAULT_MAX_SIZE,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a rootfs tarball (``.tar`` or gzip ``.tar.gz``/``.tgz``) to ``out``.

    ``install(vm)`` runs in a VM booted from ``base`` (default: the Debian
    base image) with outbound network, so ``apt-get install``/``pip install``
    work.  If it fails, PROVISION_INSTALL_HOOK_FAILED carries the failing
    command's output and no tarball is written.  A root filesystem whose
    (uncompressed) tar stream exceeds ``max_size`` bytes (default 16 GiB)
    fails with PROVISION_TOO_LARGE, also without a tarball.
    """
    target = Path(out).expanduser().resolve()
    if not target.parent.is_dir():
        raise ProvisionError(f"directory {target.parent} does not exist", code="PROVISION_OUT_INVALID")
    partial = target.with_name(f".{target.name}.partial")
    report = progress or (lambda message: None)
    try:
        async with boot(image=base, memory_mib=memory_mib, network=True, progress=progress) as vm:
            if install is not None:
                report("running the install hook")
                await _run_install(install, vm, timeout)
            config = {"cmd": argv_of(cmd) if cmd is not None else None, "env": dict(env or {}), "cwd": cwd or "/"}
            await vm.write_file(IMAGE_CONFIG, json.dumps(config).encode(), parents=True)
            await vm.exec(["sh", "-c", "apt-get clean 2>/dev/null; sync"], check=True, timeout=timeout, user=ROOT_USER)
            report(f"saving the root filesystem to {target.name}")
            await _export_rootfs(vm, partial, timeout, max_size)
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


async def debian_rootfs(
    *,
    suite: str = assets.SUITE,
    packages: Sequence[str] = (),
    run: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> Path:
    """A Debian rootfs tarball built on this host with mmdebstrap, cached by recipe.

    It always has what the guest agent needs (python3, msgpack); ``packages``
    come from ``suite`` (``bookworm``, ``trixie``, ...), and ``run`` are shell
    commands run inside it afterwards, natively, with this host's network
    (``npm install -g ...`` takes seconds here, minutes in an emulated
    guest).  Boot it with ``boot(image=...)`` or use it as ``provision(base=...)``.
    As root, or as a user with Debian's ``uidmap`` and subordinate ids (mmdebstrap's unshare mode).
    """
    report = progress or (lambda message: None)
    return await anyio.to_thread.run_sync(
        functools.partial(assets.debian_rootfs, suite, tuple(packages), tuple(run), report)
    )


async def _run_install(install: Callable[[VM], Awaitable[object]], vm: VM, timeout: float) -> None:
    try:
        with anyio.fail_after(timeout):
            await install(vm)
    except TimeoutError:
        raise ProvisionError(
            f"the install hook did not finish within {timeout:g} s", code="PROVISION_TIMEOUT"
        ) from None
    except ExecError as exc:
        output = b""
        if exc.result is not None:
            output = (exc.result.stdout[-2000:] + b"\n" + exc.result.stderr[-2000:]).strip()
        raise ProvisionError(
            f"the install hook failed: {exc}\n{output.decode(errors='replace')}",
            code="PROVISION_INSTALL_HOOK_FAILED",
        ) from exc
    except Exception as exc:
        raise ProvisionError(f"the install hook raised {exc!r}", code="PROVISION_INSTALL_HOOK_FAILED") from exc


async def _exporter(vm: VM) -> list[str]:
    """GNU tar where the image has it, else ``EXPORTER``."""
    try:
        version = await vm.exec(["tar", "--version"], timeout=60, user=ROOT_USER)
    except ExecError as exc:
        if exc.code != "EXEC_COMMAND_NOT_FOUND":
            raise
    else:
        if version.exit_code == 0 and version.stdout.startswith(b"tar (GNU tar)"):
            argv = ["tar", "-C", "/", "-c", "-f", "-", "--one-file-system", "--numeric-owner", "--xattrs",
                    "--xattrs-include=*"]  # fmt: skip
            return argv + [f"--exclude={pattern}" for pattern in EXPORT_EXCLUDES] + ["."]
    python = (await vm.describe())["agent"]["python_executable"]
    return [python, "-I", "-c", EXPORTER, *EXPORT_EXCLUDES]


async def _export_rootfs(vm: VM, partial: Path, timeout: float, max_size: int) -> None:
    argv = await _exporter(vm)
    opener = gzip.open if partial.name.endswith((".tar.gz.partial", ".tgz.partial")) else open
    with opener(partial, "wb") as out:  # type: ignore[operator]
        os.chmod(partial, 0o600)
        async with vm.process(argv, stdin=False, timeout=timeout, user=ROOT_USER) as tar:  # all of it, whoever owns it
            errors = bytearray()

            async def collect_errors() -> None:
                async for chunk in tar.stderr:
                    errors.extend(chunk)
                    del errors[:-ERROR_TAIL_BYTES]

            size = 0
            with plain_errors():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(collect_errors)
                    async for chunk in tar.stdout:
                        size += len(chunk)
                        if size > max_size:
                            raise ProvisionError(
                                f"the root filesystem is larger than max_size ({max_size} bytes)",
                                code="PROVISION_TOO_LARGE",
                            )
                        await anyio.to_thread.run_sync(out.write, chunk)
            code = await tar.wait()
    if code not in (0, 1):  # 1: a file changed while being read, harmless here
        raise ProvisionError(
            f"{argv[0]} exited {code}: {errors[-2000:].decode(errors='replace')}", code="PROVISION_EXPORT_FAILED"
        )
