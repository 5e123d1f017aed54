"""Another machine as a host, reached over SSH: asyncssh runs ``machinen _peer`` there and
forwards supervisor sockets (hosts/transport.py); hosts/remote.py does the rest."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .remote import RemoteDriver
from .transport import SSHTransport

KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 15.0, 4


def ssh_settings(
    *,
    port: int | None,
    username: str | None,
    client_keys: Sequence[str] | None,
    known_hosts: Any,
    config: Sequence[str] | None,
    connect_timeout: float,
    options: dict[str, Any],
) -> dict[str, Any]:
    """asyncssh ``connect`` options, with the ssh config of ``$MACHINEN_SSH_CONFIG`` and keepalives."""
    extra_config = os.environ.get("MACHINEN_SSH_CONFIG")
    # Keepalives: a host that vanished (no FIN: power, network) fails calls within a minute
    # instead of leaving them waiting for TCP's own timeout, which is hours.
    settings: dict[str, Any] = {"known_hosts": known_hosts, "connect_timeout": connect_timeout,
                                "keepalive_interval": KEEPALIVE_INTERVAL_S, "keepalive_count_max": KEEPALIVE_COUNT,
                                **options}  # fmt: skip
    if port is not None:
        settings["port"] = port
    if username is not None:
        settings["username"] = username
    if client_keys is not None:
        settings["client_keys"] = list(client_keys)
    if config is not None or extra_config:
        settings["config"] = [*(config or ()), *([extra_config] if extra_config else [])]
    return settings


class SSHDriver(RemoteDriver):
    def __init__(self, destination: str, settings: dict[str, Any], command: str) -> None:
        super().__init__(destination)
        self._settings = settings
        self._command = command

    def new_transport(self) -> SSHTransport:
        return SSHTransport(self.name, self._settings, self._command)
