"""RayHosts' connect: a Ray Client server that dies while it starts is retried, a few times only.

The fake stands in for the ``ray`` module only where the cluster answers ``ray.init``; the real
cluster path is tests/vm/test_ray.py."""

from __future__ import annotations

from typing import Any

import pytest

from machinen_async import MachinenError, RayHosts
from machinen_async.sdk import ray_pool

pytestmark = pytest.mark.anyio

START_FAILED = ConnectionAbortedError("Initialization failure from server:\npsutil.ZombieProcess: ...")


class FlakyRay:
    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.inits = 0

    def is_initialized(self) -> bool:
        return False

    def init(self, **_: Any) -> None:
        self.inits += 1
        if self.failures:
            raise self.failures.pop(0)

    def remote(self, **_: Any) -> Any:
        return lambda cls: cls

    def nodes(self) -> list[dict[str, Any]]:
        return []  # connected, but no node offers slots: the error after a connect

    def shutdown(self) -> None:
        pass


@pytest.fixture
def flaky_ray(monkeypatch: pytest.MonkeyPatch):
    def install(failures: list[BaseException]) -> FlakyRay:
        fake = FlakyRay(failures)
        monkeypatch.setattr(ray_pool, "_import_ray", lambda: fake)
        return fake

    return install


async def test_a_server_that_failed_to_start_is_tried_again(flaky_ray):
    ray = flaky_ray([START_FAILED, START_FAILED])
    with pytest.raises(MachinenError) as raised:
        async with RayHosts("ray://127.0.0.1:1"):
            pass
    assert ray.inits == 3 and raised.value.code == "HOST_RAY_NO_NODES"  # the third attempt connected


async def test_retries_are_bounded_and_other_failures_are_not_retried(flaky_ray):
    ray = flaky_ray([START_FAILED] * 5)
    with pytest.raises(MachinenError) as raised:
        async with RayHosts("ray://127.0.0.1:1"):
            pass
    assert ray.inits == 3 and raised.value.code == "HOST_UNREACHABLE"
    ray = flaky_ray([ConnectionError("connection refused")])
    with pytest.raises(MachinenError) as raised:
        async with RayHosts("ray://127.0.0.1:1"):
            pass
    assert ray.inits == 1 and raised.value.code == "HOST_UNREACHABLE"
