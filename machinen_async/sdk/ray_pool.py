"""A Ray cluster as a pool of hosts: ``async with RayHosts() as pool`` then
``vm.fork(n=64, hosts=pool)``; Ray's scheduler places the siblings (and ``pool.boot(image)`` a VM).

Each node that offers the ``machinen_slots`` custom resource (``ray start
--resources='{"machinen_slots": 8}'``) is a ``Host``, driven through one
``NodeAgent`` actor of this pool on that node (hosts/ray_node.py).  A spread
fork asks Ray for a placement group of one bundle per sibling, each a slot and
the host memory a sibling costs (``hosts.local.sibling_cost_mib``), so Ray decides
which node takes which sibling (``strategy``: Ray's placement strategies); the
group is held until the ``Forks`` close.  The siblings of one node start from
one pushed bundle and share its RAM copy-on-write.

Ray's API is blocking or asyncio-only: blocking calls run in worker threads,
and each node's link runs in an asyncio portal, so callers use any anyio
backend.  VMs live as long as the pool's actors: leaving the ``async with``,
or the end of the driver process (Ray ends the actors of a finished job), or
the loss of a node stops them.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from typing import TYPE_CHECKING, Any, Self, Unpack

import anyio

from ..errors import HostError, MachinenError, plain_errors
from ..hosts.base import Reservation
from ..hosts.local import sibling_cost_mib
from ..protocol.messages import VMRow
from .forks import Launch
from .host import BootOptions, Host

if TYPE_CHECKING:
    from .vm import VM

SLOT_RESOURCE = "machinen_slots"
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Ray Client's proxy starts one server process per client; when that process dies while it starts
# (seen in CI: psutil.ZombieProcess inside the proxier) ray.init fails with this message, and a new
# attempt gets a new server.
_CLIENT_SERVER_START_FAILED = "Initialization failure from server"
_CLIENT_CONNECT_ATTEMPTS = 3

log: logging.Logger = logging.getLogger(__name__)
_warned_insecure = False  # the warning below, once a process


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise HostError(
            "a Ray host pool needs Ray: pip install 'machinen_async[ray]'", code="HOST_RAY_MISSING"
        ) from None
    return ray


def _ray_token_auth() -> bool:
    """Whether this driver uses Ray's token authentication (``RAY_AUTH_MODE=token``, or Ray turned
    it on by itself for a local cluster)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return True
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        return bool(is_token_auth_enabled())
    except Exception:  # a Ray without it (private API)
        return False


def _warn_if_insecure(address: str | None, *, token_auth: bool) -> None:
    """Once a process: a cluster reached without TLS or token authentication (docs/security.md)."""
    global _warned_insecure
    missing = []
    if os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):  # as Ray reads it
        missing.append("without TLS (RAY_USE_TLS=1): bundles and guest I/O cross the network in plaintext")
    if not token_auth:
        missing.append(
            "without token authentication (RAY_AUTH_MODE=token): whoever reaches it runs code on its nodes, "
            "with their VMs and bundle keys"
        )
    if missing and not _warned_insecure:
        _warned_insecure = True
        log.warning("machinen: the Ray cluster at %s is used %s", address or "auto", "; and ".join(missing))


class RayHosts:
    """The nodes of a Ray cluster as hosts that place siblings through Ray."""

    def __init__(
        self,
        address: str | None = "auto",
        *,
        strategy: str = "SPREAD",
        reserve_timeout: float = 60.0,
        namespace: str = "machinen",
        **init_options: object,
    ) -> None:
        """``address`` as ``ray.init`` takes it ("auto", "ray://head:10001", ...); a process that
        already called ``ray.init`` keeps its connection.  ``strategy``: how Ray spreads one fork's
        siblings; ``reserve_timeout``: how long a fork waits for Ray to find room for them."""
        if strategy not in STRATEGIES:
            raise MachinenError(f"strategy must be one of {', '.join(STRATEGIES)}", code="FORK_HOSTS_INVALID")
        self.address = address
        self.strategy = strategy
        self.reserve_timeout = reserve_timeout
        self._init_options = {"namespace": namespace, **init_options}
        self._hosts: dict[str, Host] = {}
        self._lock = threading.Lock()  # hosts are added from worker threads
        # Placement groups held for running siblings: a single sibling's (``await vm.fork(hosts=pool)``)
        # has no ``Forks`` to release it, so whatever is left goes with the pool.
        self._groups: set[Any] = set()
        self._initialized_ray = False
        self._agent_class: Any = None

    async def __aenter__(self) -> Self:
        try:
            await anyio.to_thread.run_sync(self._start)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _start(self) -> None:
        ray = _import_ray()
        from ..hosts.ray_node import NodeAgent

        if not ray.is_initialized():
            # Ray Client advises against sending much data through it; bundles are meant to go.
            warnings.filterwarnings("ignore", message="More than 10MB of messages have been created", module="ray")
            for attempt in range(1, _CLIENT_CONNECT_ATTEMPTS + 1):
                try:
                    ray.init(address=self.address, log_to_driver=False, **self._init_options)
                    break
                except ConnectionError as exc:
                    if _CLIENT_SERVER_START_FAILED in str(exc) and attempt < _CLIENT_CONNECT_ATTEMPTS:
                        log.warning("Ray Client's server for this driver failed to start (attempt %d at %s); "
                                    "trying again", attempt, self.address)  # fmt: skip
                        continue
                    raise HostError(
                        f"cannot reach the Ray cluster at {self.address}: {exc}", code="HOST_UNREACHABLE"
                    ) from None
            self._initialized_ray = True
        _warn_if_insecure(self.address, token_auth=_ray_token_auth())
        # The actor needs no CPU of Ray's: its VMs' QEMUs are what the slots account for.
        self._agent_class = ray.remote(num_cpus=0, max_restarts=0)(NodeAgent)
        for node in ray.nodes():
            if node["Alive"] and node["Resources"].get(SLOT_RESOURCE):
                self._host_for(node["NodeID"])
        if not self._hosts:
            raise HostError(
                f"no node of the Ray cluster offers the {SLOT_RESOURCE!r} resource: start nodes with "
                f"ray start --resources='{{\"{SLOT_RESOURCE}\": N}}' (N siblings each)",
                code="HOST_RAY_NO_NODES",
            )

    def _host_for(self, node_id: str) -> Host:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from ..hosts.ray_node import RayNodeDriver

        with self._lock:
            host = self._hosts.get(node_id)
            if host is None:
                strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
                actor = self._agent_class.options(scheduling_strategy=strategy).remote()
                host = self._hosts[node_id] = Host(RayNodeDriver(node_id, actor))
            return host

    @property
    def hosts(self) -> list[Host]:
        """One ``Host`` per node (named by its Ray node ID)."""
        return list(self._hosts.values())

    def host(self, node_id: str) -> Host:
        """The node with this Ray node ID, e.g. for ``vm.handoff(pool.host(node_id))``."""
        try:
            return self._hosts[node_id]
        except KeyError:
            raise HostError(f"no machinen node {node_id} in this Ray pool", code="HOST_SPEC_INVALID") from None

    async def reserve(self, count: int, memory_mib: int, accel: str) -> Reservation[Host]:
        """Ray's placement of ``count`` siblings of ``memory_mib`` MiB, held until released."""
        from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

        ray = _import_ray()
        bundle = {SLOT_RESOURCE: 1, "memory": int(sibling_cost_mib(accel, memory_mib) * 2**20)}

        def place() -> tuple[Any, list[Host]]:
            group = placement_group([bundle] * count, strategy=self.strategy)
            try:
                ray.get(group.ready(), timeout=self.reserve_timeout)
                nodes = placement_group_table(group)["bundles_to_node_id"]
                return group, [self._host_for(nodes[index]) for index in range(count)]
            except BaseException as exc:
                remove_placement_group(group)
                if isinstance(exc, ray.exceptions.GetTimeoutError):
                    raise MachinenError(
                        f"the Ray cluster found no room for {count} siblings of {memory_mib} MiB within "
                        f"{self.reserve_timeout:g} s (each takes one {SLOT_RESOURCE!r} and "
                        f"{bundle['memory'] / 2**20:.0f} MiB of a node's Ray memory)",
                        code="FORK_MEMORY_BACKPRESSURE",
                        retryable=True,
                    ) from None
                raise

        group, hosts = await anyio.to_thread.run_sync(place)
        self._groups.add(group)

        async def release() -> None:
            if group in self._groups:
                self._groups.discard(group)
                await anyio.to_thread.run_sync(remove_placement_group, group)

        return Reservation(hosts, release)

    def boot(
        self,
        image: str | os.PathLike[str] | None = None,
        **options: Unpack[BootOptions],
    ) -> Launch[VM]:
        """A VM booted on the node Ray picks for one slot and its memory (held until the VM's handle
        closes); the options are ``boot``'s.  The node resumes its own boot template when it has one."""

        async def start() -> VM:
            memory_mib, accel = options.get("memory_mib", 256), options.get("accel")
            reservation = await self.reserve(1, memory_mib, "kvm" if accel == "kvm" else "tcg")
            try:
                vm = await reservation.hosts[0].boot(image, **options)
            except BaseException:
                if reservation.release is not None:
                    with anyio.CancelScope(shield=True):
                        await reservation.release()
                raise
            vm.release = reservation.release
            return vm

        return Launch(start)

    async def list(self) -> list[VMRow]:
        """The VMs of every node, each row with its ``node``."""
        rows: list[VMRow] = []

        async def list_node(host: Host) -> None:
            listed = await host.list()  # what the node's peer sent: any shape
            if not isinstance(listed, list):
                raise HostError(f"node {host.name} sent a {type(listed).__name__} as its VM list", code="HOST_PROTOCOL")
            rows.extend({**(row if isinstance(row, dict) else {"name": row}), "node": host.name} for row in listed)

        with plain_errors():
            async with anyio.create_task_group() as tg:
                for host in self.hosts:
                    tg.start_soon(list_node, host)
        return rows

    async def aclose(self) -> None:
        """Stop this pool's VMs (those not ``detached``) and its actors."""
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for host in self.hosts:
                    tg.start_soon(host.aclose)
            if self._hosts or self._groups or self._initialized_ray:
                await anyio.to_thread.run_sync(self._stop)

    def _stop(self) -> None:
        from ray.util.placement_group import remove_placement_group

        ray = _import_ray()
        for group in self._groups:
            remove_placement_group(group)
        self._groups.clear()
        for host in self._hosts.values():
            ray.kill(host.driver.actor)  # its peer has its EOF already, and stops its VMs
        self._hosts.clear()
        if self._initialized_ray:
            ray.shutdown()
            self._initialized_ray = False
