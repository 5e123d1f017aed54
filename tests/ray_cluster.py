"""A real multi-node Ray cluster on this machine: ``ray start --head`` plus more ``ray start
--address`` nodes, each with its own machinen home, runtime and cache directories (set in the
environment of its ``ray start``, which its raylet and so its workers inherit) and
``machinen_slots`` sibling slots.  Its caches start empty, so the kernel, initrd and image
really travel to each node on a first push.

Every process of the cluster has the cluster's own temp directory in its command line, which
is how ``stop`` finds them (``ray stop`` would stop every Ray on the machine).

The cluster uses Ray's token authentication with a token of its own, set in this process's
environment too (the driver's): Ray >= 2.59 turns tokens on by itself for some local
clusters and reads ``~/.ray/auth_token`` when there is one, and nodes that disagree on the
mode cannot join.
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


class RayCluster:
    def __init__(self, root: Path, runtime_prefix: str) -> None:
        self.root = root
        self.runtime_prefix = runtime_prefix
        self.temp_dir = root / "t"  # short: Ray's unix socket paths live under it
        self.temp_dir.mkdir(mode=0o700, parents=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[RayNode] = []
        token = root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        self._saved_env = {name: os.environ.get(name) for name in self.auth}
        os.environ.update(self.auth)

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
                    "--include-dashboard=false", *common]  # fmt: skip
        else:
            args = ["start", f"--address={self.address}", *common]
        env = {**os.environ, **node.env(), "RAY_USAGE_STATS_ENABLED": "0"}
        started = subprocess.run([RAY, *args], check=False, env=env, capture_output=True, text=True, timeout=120)
        if started.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed:\n{started.stdout[-2000:]}\n{started.stderr[-3000:]}")
        self.nodes.append(node)
        return node

    def raylet_pid(self, node_id: str) -> int:
        """The raylet serving Ray node ``node_id`` (found by its node manager port)."""
        import ray

        port = next(n["NodeManagerPort"] for n in ray.nodes() if n["NodeID"] == node_id)
        for line in _processes(str(self.temp_dir)):
            pid, cmdline = line.split(" ", 1)
            if "/raylet " in cmdline and f"--node_manager_port={port} " in cmdline:
                return int(pid)
        raise LookupError(f"no raylet for node {node_id}")

    def stop(self) -> None:
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for _ in range(20):
            pids = [int(line.split(" ", 1)[0]) for line in _processes(str(self.temp_dir))]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)


def _processes(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if line.strip()]
