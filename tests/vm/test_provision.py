"""Provisioned images, workloads and the quickstart example (real VMs, real network)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from test_oci_boot import CAPABILITY, busybox_layers, write_layout
from test_ports import free_port

from machinen_async import BootError, ProvisionError, boot, provision
from machinen_async.guest import export
from machinen_async.sdk.provisioning import EXPORT_EXCLUDES

pytestmark = pytest.mark.anyio
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def anyio_backend():
    return "asyncio"  # each of these boots several VMs; the protocol is covered on trio elsewhere


async def test_provision_installs_with_network_and_carries_its_cmd(tmp_path):
    image = tmp_path / "jq.tar.gz"

    async def install(vm):
        await vm.exec("apt-get update -q && apt-get install -y -q --no-install-recommends jq", check=True, timeout=600)
        await vm.write_file("/opt/greet.sh", b"#!/bin/sh\necho \"hello $WHO\" > /tmp/greeting\nexec sleep 100000\n",
                            mode=0o755, parents=True)  # fmt: skip

    assert await provision(install=install, cmd=["/opt/greet.sh"], env={"WHO": "image"}, out=image) == image
    assert image.stat().st_size > 10_000_000 and image.stat().st_mode & 0o077 == 0
    async with boot(image, name="provisioned") as vm:
        assert (await vm.exec(["jq", "--version"], check=True)).stdout.startswith(b"jq-")
        workload = (await vm.describe())["agent"]["workload"]
        assert workload["running"] and workload["argv"] == ["/opt/greet.sh"]
        assert (await vm.exec(["sh", "-c", "sleep 0.5; cat /tmp/greeting"])).stdout == b"hello image\n"
    async with boot(image, name="provisioned-override", cmd=["sleep", "1000"]) as vm:
        assert (await vm.describe())["agent"]["workload"]["argv"] == ["sleep", "1000"]


async def test_failing_install_hook_writes_no_tarball(tmp_path):
    async def install(vm):
        await vm.exec(["sh", "-c", "echo about-to-fail; echo details >&2; exit 3"], check=True)

    with pytest.raises(ProvisionError) as failed:
        await provision(install=install, out=tmp_path / "never.tar")
    assert failed.value.code == "PROVISION_INSTALL_HOOK_FAILED"
    assert "about-to-fail" in failed.value.message and "details" in failed.value.message
    assert list(tmp_path.iterdir()) == []


async def test_workload_on_the_base_image_and_errors():
    async with boot(name="adhoc", cmd="echo ran > /tmp/ran; exit 7", network=False) as vm:
        status = await vm.exec(["sh", "-c", "sleep 1; cat /tmp/ran"])
        assert status.stdout == b"ran\n"
        workload = (await vm.describe())["agent"]["workload"]
        assert workload["exit_code"] == 7 and workload["restarts"] >= 1  # non-zero exits are restarted
        assert b"/tmp/ran" not in await vm.read_file("/var/log/machinen/workload.log")
    with pytest.raises(BootError) as missing:
        async with boot(cmd=["/no/such/program"]):
            pass
    assert missing.value.code == "BOOT_CMD_NOT_FOUND"


def test_cli_detached_workload_and_logs(cli):
    cli("boot", "--name", "cli-workload", "--detach", "--", "sh", "-c", "echo from-workload; sleep 1000")
    try:
        logs = cli("logs", "cli-workload", "--workload")
        assert logs.stdout.strip() == b"from-workload"
    finally:
        cli("stop", "cli-workload", check=False)


def test_quickstart_example():
    port = free_port()
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart" / "run.py"), "--port", str(port)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    counts = json.dumps(lines)
    booted = next(line for line in lines if line.startswith("2. booted"))
    first, second = (int(word) for word in booted.replace(",", "").split() if word.isdigit())
    assert second == first + 1, counts
    restored = next(line for line in lines if "restored;" in line)
    assert f"count {second + 1}" in restored, counts  # the same process, continued
    forked = next(line for line in lines if line.startswith("4. forked"))
    n = second + 2
    assert forked == f"4. forked: counter -> {n}, counter-b -> {n}, counter-b -> {n + 1}, counter -> {n + 1}"


async def test_an_export_larger_than_max_size_writes_no_tarball(tmp_path):
    with pytest.raises(ProvisionError) as too_large:
        await provision(out=tmp_path / "big.tar", max_size=1 << 20)
    assert too_large.value.code == "PROVISION_TOO_LARGE"
    assert list(tmp_path.iterdir()) == []


def test_the_exporter_writes_what_gnu_tar_does(tmp_path):
    """guest/export.py on a tree of every kind of entry, read back by tarfile (no VM)."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "file").write_bytes(b"content")
    os.link(root / "etc" / "file", root / "etc" / "again")
    (root / "etc" / "link").symlink_to("file")
    os.mkfifo(root / "fifo")
    (root / "proc" / "1").mkdir(parents=True)
    (root / "usr" / "lib" / "machinen").mkdir(parents=True)
    os.chown(root / "etc" / "file", 1000, 1000)  # before the capability, which a chown drops
    os.setxattr(root / "etc" / "file", "security.capability", CAPABILITY)
    out, errors = io.BytesIO(), io.StringIO()
    assert export.export(str(root), list(EXPORT_EXCLUDES), out, errors) == 0
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        entries = {entry.name: entry for entry in tar.getmembers()}
        assert sorted(entries) == [".", "./etc", "./etc/again", "./etc/file", "./etc/link", "./fifo", "./proc",
                                   "./usr", "./usr/lib"]  # fmt: skip
        first, second = entries["./etc/again"], entries["./etc/file"]  # in name order: the first has the data
        assert (first.uid, first.gid, first.uname, tar.extractfile(first).read()) == (1000, 1000, "", b"content")
        assert second.islnk() and second.linkname == "./etc/again"
        assert entries["./etc/link"].issym() and entries["./fifo"].isfifo()
        xattr = first.pax_headers["SCHILY.xattr.security.capability"]
        assert xattr.encode("utf-8", "surrogateescape") == CAPABILITY


async def test_an_image_without_gnu_tar_provisions_and_keeps_its_config(tmp_path):
    """A busybox-only OCI image as the base: its tar is not GNU tar, so the agent's interpreter
    exports it; the result boots, with what the hook wrote and the image's config."""
    layout = tmp_path / "layout"
    write_layout(layout, busybox_layers(), {"config": {"Env": ["PATH=/bin", "GREETING=provisioned"], "User": "app"}})
    out = tmp_path / "busybox.tar.gz"

    async def install(vm):
        await vm.exec("mkdir -p /opt && echo made > /opt/made && chown app /opt/made", check=True, user="0")

    await provision(base=f"oci:{layout}:1", install=install, out=out)
    async with boot(out, network=False) as vm:
        seen = await vm.exec(["sh", "-c", 'cat /opt/made; echo "$GREETING"; id -u; stat -c %u /opt/made'], check=True)
        assert seen.stdout == b"made\nprovisioned\n1000\n1000\n"
