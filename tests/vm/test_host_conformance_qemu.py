"""The HostDriver contract (tests/host_conformance.py) on real QEMU VMs, once: the same check the
unit tier runs on the fake VMM (tests/unit/test_host_conformance.py) holds for the real backend."""

from __future__ import annotations

import pytest
from host_conformance import check_host_driver

from machinen_async.hosts.local import LocalDriver


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_local_driver_on_qemu(anyio_backend: str) -> None:
    await check_host_driver(LocalDriver(), "conf-qemu")
