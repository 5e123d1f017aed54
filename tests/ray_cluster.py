"""A real multi-node Ray cluster on this machine: ``ray start --head`` plus more ``ray start
--address`` nodes, each with its own machinen home, runtime and cache directories (set in the
environment of its ``ray start``, which its raylet and so its workers inherit) and
``machinen_slots`` sibling slots.  Its caches start empty, so the kernel, initrd and image
really travel to each node on a first push.

Each ``ray start`` runs in a session of its own, and every process of the cluster stays in one
of those sessions or has the cluster's temp directory in its command line: that is how ``stop``
finds them all (``ray stop`` would stop every Ray on the machine; Ray renames its agents, and
Ray Client's servers do not name the temp directory).

The cluster uses Ray's token authentication with a token of its own, set in this process's
environment too (the driver's): Ray >= 2.59 turns tokens on by itself for some local
clusters and reads ``~/.ray/auth_token`` when there is one, and nodes that disagree on the
mode cannot join.  Ray reads that environment once, when it is imported: conftest.py calls
``use_own_auth_token`` before any test module imports Ray.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from net import free_port

RAY = str(Path(sys.executable).with_name("ray"))
SLOTS_PER_NODE = 4


@dataclass
class RayNode:
    label: str
    home: Path
    runtime: Path
    cache: Path

    def env(self) -> dict[str, str]:
        return {"MACHINEN_HOME": str(self.home), "MACHINEN_RUNTIME_DIR": str(self.runtime),
                "MACHINEN_CACHE_DIR": str(self.cache)}  # fmt: skip


def use_own_auth_token(directory: Path) -> None:
    """Make this process, and the clusters it starts, use a token of its own (once per process)."""
    if os.environ.get("RAY_AUTH_MODE") == "token" and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    token = directory / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})


class RayCluster:
    def __init__(self, root: Path, runtime_prefix: str) -> None:
        self.root = root
        self.runtime_prefix = runtime_prefix
        self.temp_dir = root / "t"  # short: Ray's unix socket paths live under it
        self.temp_dir.mkdir(mode=0o700, parents=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.client_address = f"ray://127.0.0.1:{free_port()}"  # Ray Client, as from another machine
        self.nodes: list[RayNode] = []
        self.sessions: set[int] = set()
        use_own_auth_token(root)

    def add(self, label: str) -> RayNode:
        """Start one more node (the first is the head)."""
        base = self.root / label
        node = RayNode(label, base / "home", Path(f"{self.runtime_prefix}-ray-{label}"), base / "cache")
        resources = f'{{"machinen_slots": {SLOTS_PER_NODE}, "machinen_test_node_{label}": 1}}'
        # A port of our choosing, so that its raylet is found by its command line (raylet_pid).
        common = ["--node-ip-address=127.0.0.1", f"--node-manager-port={free_port()}", "--num-cpus=1", "--object-store-memory=200000000",
                  f"--resources={resources}", "--disable-usage-stats"]  # fmt: skip
        if not self.nodes:
            args = ["start", "--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
                    f"--ray-client-server-port={self.client_address.rsplit(':', 1)[1]}",
                    "--include-dashboard=false", *common]  # fmt: skip
        else:
            args = ["start", f"--address={self.address}", *common]
        env = {**os.environ, **node.env(), "RAY_USAGE_STATS_ENABLED": "0"}
        starting = subprocess.Popen([RAY, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)  # fmt: skip
        self.sessions.add(starting.pid)
        stdout, stderr = starting.communicate(timeout=120)
        if starting.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed:\n{stdout[-2000:]}\n{stderr[-3000:]}")
        self.nodes.append(node)
        return node

    def raylet_pid(self, node_id: str) -> int:
        """The raylet serving Ray node ``node_id`` (found by its node manager port)."""
        import ray

        port = next(n["NodeManagerPort"] for n in ray.nodes() if n["NodeID"] == node_id)
        for pid, _, cmdline in _processes():
            if str(self.temp_dir) in cmdline and "/raylet " in cmdline and f"--node_manager_port={port} " in cmdline:
                return pid
        raise LookupError(f"no raylet for node {node_id}")

    def stop(self) -> None:
        for _ in range(20):
            pids = [pid for pid, session, cmdline in _processes()
                    if session in self.sessions or str(self.temp_dir) in cmdline]  # fmt: skip
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)


def _processes() -> list[tuple[int, int, str]]:
    """(pid, session id, command line) of every process but this one."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,sid=,args="], capture_output=True, text=True, check=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines() if line.strip()]
    return [(int(row[0]), int(row[1]), row[2] if len(row) > 2 else "") for row in rows if int(row[0]) != os.getpid()]
