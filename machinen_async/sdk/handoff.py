"""Moving a running VM to another host: ``vm.handoff(host)``.

1. (precopy) snapshot while the VM runs and push it: most chunks move
   while the guest still works;
2. snapshot again leaving the VM paused; push: only chunks that changed;
3. the host assembles the bundle, checks every sha256, restores it;
4. only then the source stops.  Any failure in 2-3 resumes the source,
   so there is never a moment where both or neither run; so does a pause
   longer than ``PAUSE_LIMIT_S`` (HANDOFF_TIMEOUT).

The moved VM keeps its lifetime: its deadline is an instant of this host's
clock, so what crosses is the time left to it, taken just before the restore
(the pause counts against it), and its idle_timeout.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from ..errors import HandoffError, MachinenError
from ..hosts.base import TransferReport
from ..hosts.local import LocalDriver
from ..protocol.messages import seconds_left
from ..protocol.netpolicy import NetworkPolicy
from ..protocol.ports import PortSpec
from ..store import chunks, paths
from .network import Secret

if TYPE_CHECKING:
    from .host import Host
    from .mounts import Mount
    from .vm import VM

# The source stays paused while the final state moves and starts there; past this it resumes.
PAUSE_LIMIT_S = 120.0
STOP_DESTINATION_S = 20.0
# The lifetime a VM whose deadline passed during its handoff gets there: it ends as soon as it starts.
MIN_TTL_S = 0.001


@dataclass(frozen=True)
class HandoffReport:
    """``paused_ms``: how long the VM ran nowhere; bytes are what crossed the wire."""

    paused_ms: float
    total_s: float
    bytes_sent: int
    precopy: TransferReport | None
    final: TransferReport


def ttl_until(deadline: float | None, now: float) -> float | None:
    """The ``ttl`` that ends a VM started at ``now`` at ``deadline`` (None: no end).  A deadline
    already past leaves the least positive lifetime, so the moved VM stops at once, as the
    source would have."""
    left = seconds_left(deadline, now)
    return None if left is None else max(left, MIN_TTL_S)


async def handoff(
    vm: VM,
    host: Host,
    *,
    name: str | None,
    ports: Sequence[PortSpec] | None,
    detached: bool | None,
    precopy: bool,
    progress: Callable[[str], None] | None,
    mounts: Sequence[str | Mount] | None = None,
) -> VM:
    if vm.host.driver != LocalDriver():
        raise HandoffError("hand a VM off from the host it runs on", code="HANDOFF_REMOTE_SOURCE")
    if host == vm.host:
        raise HandoffError("the destination is this host", code="HANDOFF_SAME_HOST")
    report = progress or (lambda message: None)
    owned = vm.owned
    started = time.monotonic()
    await host.open()
    workdir = paths.private_dir(chunks.work_path(vm.name))
    try:
        warm = None
        if precopy:
            report("precopy: snapshot while running")
            await vm.snapshot(workdir / "precopy")
            warm = await host.push(workdir / "precopy", progress=report)
            await anyio.to_thread.run_sync(shutil.rmtree, workdir / "precopy")
        report("pausing for the final state")
        paused_at = time.monotonic()
        await vm._snapshot_paused(workdir / "final")
        target_name = name or vm.name
        restoring = False
        try:
            with anyio.fail_after(PAUSE_LIMIT_S):
                final = await host.push(workdir / "final", progress=report)
                lifetime = await vm._supervisor_info()  # fresh: another client may have extended it or set its network
                # Its secrets go along (a bundle keeps no value), bound there to the placeholders its guest holds.
                secrets = {rule.name: Secret(rule.value, hosts=rule.hosts, headers=rule.headers)
                           for rule in await vm.secrets_as_set()}  # fmt: skip
                restoring = True
                moved = await host.restore(
                    final.remote_bundle,
                    name=target_name,
                    ports=ports,
                    detached=(not owned) if detached is None else detached,
                    mounts=mounts,
                    ttl=ttl_until(lifetime["deadline"], time.time()),
                    idle_timeout=lifetime["idle_timeout"],
                    on_idle=lifetime.get("on_idle"),  # its DIR is now a directory of that host
                    network=NetworkPolicy.from_wire(lifetime["network_policy"]),  # as it is now (set_network)
                    secrets=secrets or None,
                )
        except BaseException as exc:
            # A restore that was interrupted (rather than refused) may have started the VM there
            # after all: stop it, so that the source resuming never makes two of it.
            undecided = isinstance(exc, (TimeoutError, anyio.get_cancelled_exc_class())) or (
                isinstance(exc, MachinenError) and exc.code == "HOST_TIMEOUT"
            )
            with anyio.CancelScope(shield=True):
                if restoring and undecided:
                    with anyio.move_on_after(STOP_DESTINATION_S), contextlib.suppress(MachinenError):
                        await host.stop(target_name, force=True)
                await vm._resume()
            if isinstance(exc, TimeoutError):
                raise HandoffError(
                    f"the destination did not take over within {PAUSE_LIMIT_S:g} s; {vm.name} runs on here",
                    code="HANDOFF_TIMEOUT",
                    retryable=True,
                ) from None
            raise
        paused_ms = round((time.monotonic() - paused_at) * 1000, 1)
        # The destination runs: now, and only now, the source goes.
        with anyio.CancelScope(shield=True):
            await (vm.aclose() if owned else vm.stop())
            try:
                await host.remove_bundle(final.remote_bundle)
            except MachinenError:
                pass  # the bundle is only a leftover now; the chunks stay for the next transfer
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(shutil.rmtree, workdir, True)
    moved.handoff_report = HandoffReport(
        paused_ms=paused_ms,
        total_s=round(time.monotonic() - started, 3),
        bytes_sent=final.bytes_sent + (warm.bytes_sent if warm else 0),
        precopy=warm,
        final=final,
    )
    report(f"handed off to {host.name} as {moved.name}: paused {paused_ms:.0f} ms")
    return moved
