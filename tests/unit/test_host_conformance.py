"""The HostDriver contract (tests/host_conformance.py) on the local driver and on a remote one
over a loopback peer, each booting fake VMs (``MACHINEN_VMM=fake``: the real agent, no VM)."""

from __future__ import annotations

import pytest
from host_conformance import LoopbackDriver, check_host_driver

from machinen_async.hosts.local import LocalDriver

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("fake_vmm")]


async def test_local_driver(anyio_backend: str) -> None:
    await check_host_driver(LocalDriver(), f"conf-local-{anyio_backend}")


async def test_loopback_remote_driver(anyio_backend: str) -> None:
    await check_host_driver(LoopbackDriver(), f"conf-loop-{anyio_backend}")
