"""The supervisor process: ``python -m machinen_async.supervisor CONFIG_JSON``.

It always runs on asyncio (``qemu.qmp`` is asyncio-only), whatever event
loop its clients use.  Startup result is one JSON line on stdout:
``{"ready": {...}}`` or ``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Mapping

import anyio
import structlog

from ..errors import BootError, MachinenError, plain_errors
from ..store import registry
from ..vmm import capped_log
from .config import DETACH, SupervisorConfig
from .server import Supervisor

log: structlog.typing.FilteringBoundLogger = structlog.get_logger("machinen.supervisor")


async def _owner_lets_go() -> bool:
    """Wait on the launcher's pipe: True on EOF (owner gone), False on DETACH."""
    await anyio.wait_readable(0)
    return os.read(0, 1) != DETACH


async def amain(config: SupervisorConfig) -> int:
    ready_out = os.fdopen(os.dup(1), "w")

    def report(payload: Mapping[str, object]) -> None:
        ready_out.write(json.dumps(payload) + "\n")
        ready_out.flush()
        ready_out.close()

    def report_ready(meta: Mapping[str, object]) -> None:
        report({"ready": meta})
        # From here on nobody reads our stdout/stderr: log to the entry instead, capped (a guest can
        # provoke log lines) and rotated once, as QEMU's console is.
        capped = capped_log.ProcessLog(entry.supervisor_log, capped_log.SUPERVISOR_LOG_LIMIT)
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(capped))

    try:
        with plain_errors(), registry.claim(config.name) as entry:
            supervisor = Supervisor(config, entry)
            async with anyio.create_task_group() as tg:

                def request_stop() -> None:
                    if supervisor.meta:
                        supervisor.stop_requested.set()
                    else:
                        tg.cancel_scope.cancel()  # still booting: abandon the boot

                async def signals() -> None:
                    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as received:
                        async for signum in received:
                            log.info("signal", signum=int(signum))
                            request_stop()

                async def watch_owner() -> None:
                    if await _owner_lets_go():
                        log.info("owner process gone")
                        request_stop()
                    else:
                        log.info("detached")

                tg.start_soon(signals)
                tg.start_soon(watch_owner)
                await supervisor.run(report_ready)
                tg.cancel_scope.cancel()
            if not supervisor.meta:
                raise BootError("boot cancelled", code="BOOT_CANCELLED")
    except MachinenError as exc:
        if not ready_out.closed:
            report({"error": exc.to_dict()})
        log.error("failed", code=exc.code, message=exc.message)
        return 1
    return 0


def run(config_json: str) -> int:
    """Supervise one VM until it stops; the process exit code."""
    config = SupervisorConfig.from_json(config_json)
    structlog.configure(
        processors=[structlog.processors.TimeStamper(fmt="iso"), structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    os.umask(0o077)
    return anyio.run(amain, config, backend="asyncio")


def main() -> None:
    sys.exit(run(sys.argv[1]))
