"""What a type checker sees of the public API: checked by tests/unit/test_typing.py with mypy --strict (never run)."""

from typing import assert_type

from machinen_async import VM, Forks, Host, HostFacts, VMDescription, VMInfo, VMRow, boot, restore


async def main() -> None:
    async with boot() as vm:
        assert_type(vm, VM)
        async with vm.fork(n=2) as forks:
            assert_type(forks, Forks)
        child = await vm.fork()
        assert_type(child, VM)
    restored = await restore("x")
    assert_type(restored, VM)
    many = await restore("x", n=2)
    assert_type(many, Forks)
    named = await restore("x", names=["a"])
    assert_type(named, Forks)
    async with Host.local() as here, here.boot() as there:
        assert_type(there, VM)


async def facts(vm: VM, host: Host) -> None:
    assert_type((await vm.describe())["start"], str)
    assert_type((await vm.describe())["agent"]["workload"]["running"], bool)
    assert_type(vm.info["memory_mib"], int)
    assert_type((await host.info())["mem_available_mib"], int)
    rows = await host.list()
    assert_type(rows[0].get("forked_from"), str | None)


async def exported_shapes(vm: VM, host: Host) -> None:
    """The typed dicts exported for annotations are what the calls return."""
    assert_type(vm.info, VMInfo)
    assert_type(await vm.describe(), VMDescription)
    assert_type(await host.info(), HostFacts)
    assert_type(await host.list(), list[VMRow])
