"""Every image path as an ordinary user (issue 25): a user made for these tests, not root and with
no sudo, installs the guest assets, builds a Debian rootfs, provisions an image from it, boots
that tarball and an OCI image from a registry, and forks both; each step in a process of its own
running as that user, with that user's own cache, home and runtime directory (real VMs)."""

from __future__ import annotations

import grp
import json
import os
import pwd
import site
import subprocess
import sys
import tarfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from egress_hosts import test_network, unavailable
from oci_registry import Registry, image_config, push_image
from test_egress_qemu import PROBE
from test_oci_boot import busybox_layers

import machinen_async

REPOSITORY = Path(machinen_async.__file__).resolve().parents[1]
USER_PATH = "/usr/local/bin:/usr/bin:/bin"  # what login gives an ordinary user: no sbin


@dataclass(frozen=True)
class OrdinaryUser:
    name: str
    uid: int
    home: Path
    python: str

    def run(self, code: str, *args: str, timeout: float = 900, env: dict[str, str] | None = None) -> dict:
        """Run ``code`` (Python that prints one JSON line last; ``args`` are its ``sys.argv[1:]``)
        as this user, in a clean login environment (plus ``env``); returns that JSON."""
        extra = [f"{key}={value}" for key, value in (env or {}).items()]
        done = subprocess.run(
            ["runuser", "-u", self.name, "--", "env", "-i", f"HOME={self.home}", f"USER={self.name}",
             f"PATH={USER_PATH}", "LANG=C.UTF-8", f"PYTHONPATH={_python_path()}", *extra, self.python, "-c",
             textwrap.dedent(code), *args],
            cwd=self.home, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        output = f"{done.stdout[-3000:]}{done.stderr[-5000:]}"
        assert done.returncode == 0, f"as {self.name}: exit {done.returncode}\n{output}"
        return json.loads(done.stdout.strip().splitlines()[-1])

    def processes(self, pattern: str) -> list[str]:
        found = subprocess.run(["pgrep", "-u", self.name, "-af", pattern], capture_output=True, text=True, check=False)
        return found.stdout.splitlines()


def _python_path() -> str:
    """This checkout and the packages of the interpreter running the tests: the user runs the
    code under test, not a copy of it."""
    return os.pathsep.join([str(REPOSITORY), *site.getsitepackages()])


def _interpreter_for(user: str) -> str | None:
    """An interpreter the user may run with the same minor version as this one (so the compiled
    packages on the path load): this one, or the system's when this one is private (pyenv in
    root's home)."""
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        probe = subprocess.run(
            ["runuser", "-u", user, "--", candidate, "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if probe.returncode == 0 and probe.stdout.strip() == want:
            return candidate
    return None


@pytest.fixture(scope="module")
def ordinary_user():
    if os.geteuid() != 0:
        pytest.skip("making a user for the test needs root (CI runs as root)")
    name = f"mn-plain-{os.getpid()}"
    groups = ["-G", "kvm"] if any(group.gr_name == "kvm" for group in grp.getgrall()) else []  # how users run VMs
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", *groups, name], check=True)
    entry = pwd.getpwnam(name)
    try:
        python = _interpreter_for(name)
        if python is None:
            pytest.skip(f"no Python {sys.version_info[0]}.{sys.version_info[1]} that {name} may run")
        yield OrdinaryUser(name, entry.pw_uid, Path(entry.pw_dir), python)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], check=False)
        subprocess.run(["userdel", "--remove", name], capture_output=True, check=False)
        subprocess.run(["rm", "-rf", f"/dev/shm/machinen-{entry.pw_uid}"], check=False)


@pytest.fixture(scope="module")
def user_rootfs(ordinary_user) -> Path:
    """``machinen install`` and then ``debian_rootfs(run=...)``, as the user: mmdebstrap in its
    unshare mode, the kernel and initramfs fetched and packed, the base ext4 built from the tarball."""
    made = ordinary_user.run(
        """
        import json, subprocess, sys, anyio
        from machinen_async import debian_rootfs

        subprocess.run([sys.executable, "-m", "machinen_async", "install"], check=True)
        tarball = anyio.run(lambda: debian_rootfs(run=["echo built as $(id -u) > /etc/made-here"]))
        print(json.dumps({"tarball": str(tarball)}))
        """
    )
    return Path(made["tarball"])


def test_install_and_a_debian_rootfs_build_as_an_ordinary_user(ordinary_user, user_rootfs):
    assert user_rootfs.is_relative_to(ordinary_user.home / ".cache" / "machinen")
    assert user_rootfs.stat().st_uid == ordinary_user.uid
    with tarfile.open(user_rootfs) as tar:
        null = tar.getmember("./dev/null")
        made = tar.getmember("./etc/made-here")
        assert null.ischr() and (null.uid, null.devmajor, null.devminor) == (0, 1, 3)  # no mknod was needed
        assert (made.uid, tar.extractfile(made).read()) == (0, b"built as 0\n")  # root inside its namespace
    cache = ordinary_user.home / ".cache" / "machinen"
    assert list((cache / "images").glob("*.ext4")), "install built the base image"


def test_provision_and_a_tarball_boot_and_fork_as_an_ordinary_user(ordinary_user, user_rootfs):
    result = ordinary_user.run(
        """
        import json, sys, anyio
        from machinen_async import boot, provision

        async def main():
            out = await provision(out="provisioned.tar.gz", base=sys.argv[1],
                                  install=lambda vm: vm.exec("echo provisioned > /etc/provisioned", check=True))
            async with boot(image=str(out), network=False) as vm:
                seen = (await vm.exec("cat /etc/made-here /etc/provisioned; id -u", check=True)).stdout.decode()
                await vm.exec("echo parent > /tmp/who", check=True)
                async with vm.fork(n=2) as forks:
                    await forks.map(lambda f, i: f.exec(f"echo {i} > /tmp/who", check=True))
                    siblings = [(await f.exec("cat /tmp/who")).stdout.decode() for f in forks]
                parent = (await vm.exec("cat /tmp/who")).stdout.decode()
            return {"seen": seen, "siblings": siblings, "parent": parent}

        print(json.dumps(anyio.run(main, backend="asyncio")))
        """,
        str(user_rootfs),
    )
    assert result == {"seen": "built as 0\nprovisioned\n0\n", "siblings": ["0\n", "1\n"], "parent": "parent\n"}
    assert not ordinary_user.processes("qemu-system")


def test_an_image_from_a_registry_boots_and_forks_as_an_ordinary_user(ordinary_user, user_rootfs, tmp_path):
    registry = Registry(tmp_path / "registry")  # root's registry on loopback, as a team's would be
    try:
        layers = busybox_layers()
        config = image_config(layers, env=["PATH=/bin", "GREETING=pulled"], workdir="/srv", user="1000")
        push_image(registry, "team/busybox", "1", layers, config)
        reference = f"{registry.host}/team/busybox:1"
        result = ordinary_user.run(
            """
            import json, subprocess, sys, trio
            from machinen_async import boot

            async def main():
                async with boot(sys.argv[1], network=False) as vm:
                    seen = (await vm.exec("echo $GREETING $(pwd) $(id -u)", check=True)).stdout.decode()
                    async with vm.fork(n=2) as forks:
                        await forks.map(lambda f, i: f.exec(f"echo {i} > /tmp/who", check=True))
                        siblings = [(await f.exec("cat /tmp/who")).stdout.decode() for f in forks]
                return {"seen": seen, "siblings": siblings}

            result = trio.run(main)
            listed = subprocess.run([sys.executable, "-m", "machinen_async", "images", "--json"],
                                    check=True, capture_output=True).stdout
            print(json.dumps({**result, "images": [image["reference"] for image in json.loads(listed)]}))
            """,
            reference,
        )
    finally:
        registry.stop()
    assert result == {"seen": "pulled /srv 1000\n", "siblings": ["0\n", "1\n"], "images": [reference]}
    assert not ordinary_user.processes("qemu-system")


def test_egress_by_name_as_an_ordinary_user(ordinary_user, user_rootfs, tmp_path):
    """The VM's resolver and proxy take QEMU's connections over (pidfd_getfd) with no privilege:
    an allowed name resolves and its HTTP request goes through; another name does not resolve."""
    if reason := unavailable():
        pytest.skip(reason)
    with test_network(tmp_path / "net", records={"allowed.test": ".3", "other.test": ".5"}) as net:
        results = ordinary_user.run(
            """
            import json, sys, anyio
            from machinen_async import NetworkPolicy, boot

            async def main():
                async with boot(network=NetworkPolicy(allow=["allowed.test"])) as vm:
                    await vm.write_file("/tmp/probe.py", sys.argv[1].encode())
                    done = await vm.exec(["python3", "/tmp/probe.py", *sys.argv[2:]], check=True, timeout=120)
                    return [json.loads(line) for line in done.stdout.decode().splitlines()]

            print(json.dumps(anyio.run(main)))
            """,
            PROBE,
            *map(json.dumps, [["resolve", "allowed.test"], ["request", "allowed.test", 80, None, "allowed.test"],
                              ["resolve", "other.test"]]),
            env={"MACHINEN_DNS_SERVERS": net.dns_server},
        )  # fmt: skip
        assert results == [[net.address("allowed.test")], "HTTP/1.1 200 OK", "gaierror -2"]
        assert "allowed.test" in net.queries() and "other.test" not in net.queries()
    assert not ordinary_user.processes("qemu-system")
