"""Fixtures: real VMs under the host's accelerator (TCG on CI), both anyio backends.

One detached VM, booted through the CLI in a subprocess, is shared by the
tests that only need *a* VM: that also proves a detached VM is usable from
other processes.  Tests about lifecycle boot VMs of their own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from ray_cluster import use_own_auth_token
from ssh_hosts import FakeHost, SSHHosts

# Short paths: unix socket paths are limited to 108 bytes.
_HOME = Path(tempfile.mkdtemp(prefix="mn-", dir="/tmp"))
os.environ["MACHINEN_HOME"] = str(_HOME)
os.environ.setdefault("MACHINEN_RUNTIME_DIR", f"/dev/shm/machinen-test-{os.getpid()}")
use_own_auth_token(_HOME)  # before any test module imports Ray, which reads it then

SHARED_VM = "shared"


def machinen(*args: str, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run the CLI in a separate process, exactly as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "machinen_async", *args],
        capture_output=True,
        timeout=timeout,
        check=check,
        **kwargs,
    )


def qemu_processes() -> list[str]:
    """QEMU processes started by this test session (their paths contain our home), and
    whatever started them for a supervisor (setpriv, the network guard's shim, bwrap)."""
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True, check=False).stdout
    return [
        line
        for line in out.splitlines()
        if str(_HOME) in line and "<defunct>" not in line and "machinen_async.supervisor" not in line
    ]


def fake_machines() -> list[str]:
    """Fake VMs (``MACHINEN_VMM=fake``) of this session still running: bubblewrap and the agent
    in it, whose sandbox is in this session's RAM directory."""
    out = subprocess.run(["pgrep", "-af", "guest.server import Agent"], capture_output=True, text=True, check=False)
    runtime = os.environ["MACHINEN_RUNTIME_DIR"]
    return [line for line in out.stdout.splitlines() if runtime in line and "<defunct>" not in line]


def qemu_of(name: str) -> list[str]:
    """The QEMU processes (and what started them) of the VM named ``name``: by its hostname on
    the kernel command line, since QEMU sees no path of the VM's own directory."""
    pattern = re.compile(rf"machinen\.hostname={re.escape(name)}(\s|$)")
    return [line for line in qemu_processes() if pattern.search(line)]


def runtime_leftovers(runtime: Path | None = None) -> list[str]:
    """Per-VM RAM directories and fork templates still on tmpfs."""
    runtime = runtime or Path(os.environ["MACHINEN_RUNTIME_DIR"])
    if not runtime.exists():
        return []
    found = [p for p in runtime.iterdir() if p.name != "templates"]
    found += list((runtime / "templates").glob("*"))
    return sorted(str(p.relative_to(runtime)) for p in found)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


# The fast tier (`make test-unit`, `pytest -m unit`): every test under tests/unit/, which starts no
# VM and no QEMU (that target runs them with MACHINEN_VMM naming no backend, so one that tried
# would fail). Tests that boot a real VM go under tests/vm/.
UNIT_TESTS = Path(__file__).parent / "unit"


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A session that ran nothing (all deselected) never set up ``no_qemu_survives``, which clears its home."""
    if not session.items:
        shutil.rmtree(_HOME, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if UNIT_TESTS in item.path.parents:
            item.add_marker(pytest.mark.unit)


@pytest.fixture
def fake_vmm(monkeypatch: pytest.MonkeyPatch) -> None:
    """VMs of the fake VMM (vmm/fake: the real agent, no VM).  They boot the base assets' paths
    without reading them, which `make test` builds and `make test-unit` alone does not."""
    from machinen_async.store import assets

    if assets.find_base() is None:
        pytest.skip("no base assets yet: `make deps` (or `machinen install`) builds them once")
    monkeypatch.setenv("MACHINEN_VMM", "fake")


@pytest.fixture(scope="session")
def shared_vm() -> str:
    """Name of a detached VM booted by `machinen boot --detach` in another process."""
    machinen("boot", "--name", SHARED_VM, "--detach", "--json", timeout=600)
    yield SHARED_VM
    machinen("stop", SHARED_VM, check=False)


@pytest.fixture(scope="session", autouse=True)
def no_qemu_survives():
    yield
    leftovers = qemu_processes()
    assert not leftovers, f"QEMU processes survived the test session: {leftovers}"
    assert not fake_machines(), f"fake VMs survived the test session: {fake_machines()}"
    assert not runtime_leftovers(), f"RAM files survived: {runtime_leftovers()}"
    # Clean: remove the session's own (now empty) directories.
    shutil.rmtree(os.environ["MACHINEN_RUNTIME_DIR"], ignore_errors=True)
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def boot_templates_of_the_session(request: pytest.FixtureRequest):
    """The suite boots dozens of distinct start keys (images, memory sizes, network or not), each
    a boot template of ~130 MiB in the shared cache: those it made go when it ends, and so do the
    images it built.  A session of
    the unit tier boots no VM and makes none: it must not take those another session (CI beside a
    quick loop) made meanwhile for its own, and remove them under that session's VMs."""
    from machinen_async.store import assets, boot_templates

    if all(item.get_closest_marker("unit") for item in request.session.items):
        yield
        return
    before = set(boot_templates.templates_dir().iterdir())
    images_before = set(assets.images_dir().iterdir())
    yield
    for path in set(boot_templates.templates_dir().iterdir()) - before:
        # Not a capture in progress (".partial-"): another session on this machine may be writing it.
        if path.is_dir() and not path.name.startswith("."):
            boot_templates.discard(path)
    # So do the images it built from its tarballs (up to 800 MiB each): a CI run builds dozens.
    for path in set(assets.images_dir().iterdir()) - images_before:
        if path.is_file() and path.suffix == ".ext4":
            path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def ssh_hosts():
    """Start fresh "remote hosts" (real sshd servers on loopback): ``ssh_hosts.add(alias)``.

    Their state lives under this session's home, so the session check also
    sees their QEMU processes.
    """
    hosts = SSHHosts(_HOME / "ssh", os.environ["MACHINEN_RUNTIME_DIR"])
    os.environ["MACHINEN_SSH_CONFIG"] = str(hosts.config)
    os.environ["MACHINEN_REMOTE_COMMAND"] = f"{sys.executable} -m machinen_async"
    yield hosts
    hosts.close()
    for host in hosts.hosts:
        leftovers = runtime_leftovers(host.runtime)
        shutil.rmtree(host.runtime, ignore_errors=True)
        assert not leftovers, f"RAM files survived on {host.alias}: {leftovers}"


@pytest.fixture
def remote_host(ssh_hosts) -> FakeHost:
    """A fresh host of its own for one test (empty cache: everything has to travel).  Its cache
    (the images and boot files sent to it, a GiB or more) goes with the test: the disk is finite."""
    host = ssh_hosts.add(f"h{len(ssh_hosts.hosts)}")
    yield host
    shutil.rmtree(host.cache, ignore_errors=True)


@pytest.fixture
def cli():
    return machinen


def ls_json() -> list[dict]:
    return json.loads(machinen("ls", "--json").stdout)
