"""Real OpenSSH servers on loopback standing in for other hosts.

Each "host" is an sshd of its own with its own machinen state (home,
runtime and cache directories, set for every session by sshd's SetEnv).
Its cache starts empty, so the kernel, initrd and image really travel on a
first push.  Clients find the hosts by alias through an ssh config file
(``MACHINEN_SSH_CONFIG``), with their host keys pinned in a known_hosts file.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from net import free_port

SSHD = "/usr/sbin/sshd"


@dataclass
class FakeHost:
    alias: str
    port: int
    home: Path
    runtime: Path
    cache: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        return {"MACHINEN_HOME": str(self.home), "MACHINEN_RUNTIME_DIR": str(self.runtime),
                "MACHINEN_CACHE_DIR": str(self.cache)}  # fmt: skip


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    key_type, key = Path(f"{path}.pub").read_text().split()[:2]
    return f"{key_type} {key}"


class SSHHosts:
    """Starts sshd hosts on demand under ``root``; ``config`` is the client's ssh config."""

    def __init__(self, root: Path, runtime_prefix: str) -> None:
        self.root = root
        self.runtime_prefix = runtime_prefix
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        self.client_key = root / "client_key"
        _keygen(self.client_key)
        self.authorized = root / "authorized_keys"
        shutil.copy(f"{self.client_key}.pub", self.authorized)
        self.authorized.chmod(0o600)
        self.known_hosts = root / "known_hosts"
        self.config = root / "ssh_config"
        self.config.touch()
        self.hosts: list[FakeHost] = []

    def add(self, alias: str, extra_env: dict[str, str] | None = None) -> FakeHost:
        base = self.root / alias
        base.mkdir(mode=0o700)
        public_key = _keygen(base / "host_key")
        port = free_port()
        host = FakeHost(alias, port, base / "home", Path(f"{self.runtime_prefix}-{alias}"), base / "cache")
        # The far end runs the machinen under test, also when that is a checkout on PYTHONPATH.
        passed_on = {key: os.environ[key] for key in ("PYTHONPATH",) if key in os.environ}
        env = " ".join(f"{k}={v}" for k, v in {**host.env(), **passed_on, **(extra_env or {})}.items())
        (base / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {base / 'host_key'}\n"
            f"AuthorizedKeysFile {self.authorized}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nPidFile none\nLogLevel QUIET\n"
            f"SetEnv {env}\n"
        )
        host.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(base / "sshd_config")])
        with self.known_hosts.open("a") as known:
            known.write(f"[127.0.0.1]:{port} {public_key}\n")
        with self.config.open("a") as config:
            config.write(
                f"Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User root\n"
                f"  IdentityFile {self.client_key}\n  UserKnownHostsFile {self.known_hosts}\n"
            )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                    probe.sendall(b"SSH-2.0-probe\r\n")  # a polite client: sshd logs nothing
                    probe.recv(64)
                break
            except OSError:
                if time.monotonic() > deadline or host.process.poll() is not None:
                    raise RuntimeError(f"sshd for {alias} did not start") from None
                time.sleep(0.05)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in self.hosts:
            host.process.terminate()
            host.process.wait(10)
