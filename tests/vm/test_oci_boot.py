"""Booting OCI images (issue 25): an image with no Python and no libc (busybox only) boots, its
config applies to every command, and fork, snapshot and restore work on it (real VMs)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import machinen
from oci_registry import ForwardProxy, Registry, image_config, push_image

from machinen_async import ExecError, ImageError, Mount, boot, restore
from machinen_async.store import assets, oci_image, paths
from machinen_async.store.assets import sha256_file

BUSYBOX = "/bin/busybox"  # busybox-static: no libc needed
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
PLAIN_LAYER = "application/vnd.oci.image.layer.v1.tar"
# security.capability v2: cap_net_bind_service + cap_setuid permitted (a byte > 0x7f: binary-safe)
CAPABILITY = bytes([1, 0, 0, 2, 0x80, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])


def _entry(name: str, kind: bytes = tarfile.REGTYPE, *, mode: int = 0o644, **fields) -> tarfile.TarInfo:
    entry = tarfile.TarInfo(name)
    entry.type, entry.mode = kind, mode
    for key, value in fields.items():
        setattr(entry, key, value)
    return entry


def _layer(build) -> bytes:
    """A gzip layer made by ``build(add)``, ``add(entry, data=None)``."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(entry: tarfile.TarInfo, data: bytes | None = None) -> None:
            if data is not None:
                entry.size = len(data)
            tar.addfile(entry, io.BytesIO(data) if data is not None else None)

        build(add)
    return gzip.compress(raw.getvalue(), mtime=0)


def busybox_layers() -> list[bytes]:
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()

    def base(add) -> None:
        add(_entry("bin", tarfile.DIRTYPE, mode=0o755))
        add(_entry("bin/busybox", mode=0o755), Path(BUSYBOX).read_bytes())
        for applet in applets:
            if applet != "busybox":
                add(_entry(f"bin/{applet}", tarfile.SYMTYPE, mode=0o777, linkname="busybox"))
        add(_entry("etc", tarfile.DIRTYPE, mode=0o755))
        add(_entry("etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n")
        add(_entry("etc/group"), b"root:x:0:\napp:x:1000:\n")
        add(_entry("home", tarfile.DIRTYPE, mode=0o755))
        add(_entry("home/app", tarfile.DIRTYPE, mode=0o755, uid=1000, gid=1000))
        add(_entry("doomed"), b"deleted by the next layer\n")
        add(_entry("cache", tarfile.DIRTYPE, mode=0o755))
        add(_entry("cache/old"), b"hidden by an opaque directory\n")

    def upper(add) -> None:
        add(_entry(".wh.doomed"))
        add(_entry("cache", tarfile.DIRTYPE, mode=0o755))
        add(_entry("cache/.wh..wh..opq"))
        add(_entry("cache/new"), b"fresh\n")
        add(_entry("cache/linked", tarfile.LNKTYPE, linkname="cache/new"))

    return [_layer(base), _layer(upper)]


def write_layout(directory: Path, layers: list[bytes | Path], config: dict, tag: str = "1") -> None:
    """An OCI image layout (what `skopeo copy ... oci:DIR:TAG` writes) holding one image; a layer is
    gzip bytes, or the path of a plain tar (linked in, not read into memory)."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, media_type: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    def layer_blob(layer: bytes | Path) -> tuple[dict, str]:
        if isinstance(layer, bytes):
            return blob(layer, LAYER), f"sha256:{hashlib.sha256(gzip.decompress(layer)).hexdigest()}"
        digest = sha256_file(layer)
        (blobs / digest).symlink_to(layer)
        plain = {"mediaType": PLAIN_LAYER, "digest": f"sha256:{digest}", "size": layer.stat().st_size}
        return plain, f"sha256:{digest}"

    described = [layer_blob(layer) for layer in layers]
    rootfs = {"type": "layers", "diff_ids": [diff for _, diff in described]}
    config = {"architecture": "amd64", "os": "linux", "rootfs": rootfs, **config}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [descriptor for descriptor, _ in described],
    }
    entry = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


@pytest.fixture(scope="module")
def busybox_image(tmp_path_factory) -> str:
    layout = tmp_path_factory.mktemp("busybox-layout")
    config = {
        "config": {
            "Env": ["PATH=/bin", "GREETING=from the image"],
            "WorkingDir": "/srv/app",
            "User": "app",
            "Entrypoint": ["sh", "-c"],
            "Cmd": ['echo "$GREETING as $(id -u)" > /tmp/image-cmd-ran'],
        }
    }
    write_layout(layout, busybox_layers(), config)
    return f"oci:{layout}:1"


async def sh(vm, script: str) -> str:
    result = await vm.exec(["sh", "-c", script], timeout=120)
    assert result.exit_code == 0, (result.stdout + result.stderr).decode(errors="replace")
    return result.stdout.decode()


@pytest.mark.anyio
async def test_an_image_without_python_or_libc_boots_with_its_config(busybox_image, anyio_backend):
    async with boot(busybox_image, network=False) as vm:
        assert await sh(vm, 'echo "$GREETING"; pwd; id -u; id -g') == "from the image\n/srv/app\n1000\n1000\n"
        # Nothing the agent could have used: no libc, no Python (it runs on its own, in /.machinen).
        found = "ls /lib* /usr/lib/*-linux-gnu* 2>/dev/null | grep -c libc; command -v python3 || echo none"
        assert await sh(vm, found) == "0\nnone\n"
        assert await sh(vm, "test -e /doomed || echo gone") == "gone\n"  # a whiteout
        assert (await sh(vm, "ls /cache")).split() == ["linked", "new"]  # opaque: the lower entry is hidden
        assert await sh(vm, "cat /cache/linked") == "fresh\n"
        assert (await vm.exec(["pwd"], cwd="/tmp")).stdout == b"/tmp\n"  # a call's own cwd wins
        assert (await vm.exec(["id", "-u"], user="0")).stdout == b"0\n"  # and its own user (docker exec -u)
        assert (await vm.exec(["id"], user="app:0")).stdout.startswith(b"uid=1000(app) gid=0(root)")
        with pytest.raises(ExecError) as unknown:
            await vm.exec(["true"], user="nobody-here")
        assert unknown.value.code == "EXEC_SPAWN_FAILED" and "nobody-here" in unknown.value.message
        assert await vm.read_file("/etc/passwd") == (b"root:x:0:0:root:/root:/bin/sh\n"
                                                      b"app:x:1000:1000:app:/home/app:/bin/sh\n")  # fmt: skip


@pytest.mark.anyio
async def test_fork_snapshot_and_restore_work_on_an_image(busybox_image, tmp_path, anyio_backend):
    async with boot(busybox_image, network=False) as vm:
        await sh(vm, "echo shared > /tmp/state")
        async with vm.fork(n=2) as forks:
            await forks.map(lambda sibling, i: sh(sibling, f"echo {i} > /tmp/state"))
            assert [await sh(sibling, "cat /tmp/state") for sibling in forks] == ["0\n", "1\n"]
        assert await sh(vm, "cat /tmp/state") == "shared\n"
        await vm.snapshot(tmp_path / "image.snap")
    async with restore(tmp_path / "image.snap") as restored:
        assert await sh(restored, 'cat /tmp/state; echo "$GREETING"') == "shared\nfrom the image\n"


@pytest.mark.anyio
async def test_live_and_copied_mounts_work_on_an_image(busybox_image, tmp_path, anyio_backend):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "from-host").write_text("host\n")
    async with boot(busybox_image, network=False, mounts=[Mount(str(shared), "/work", live=True),
                                                          f"{shared}:/copied"]) as vm:  # fmt: skip
        assert await sh(vm, "cat /work/from-host /copied/from-host") == "host\nhost\n"
        await sh(vm, "echo guest > /work/from-guest")  # as the image's user (1000), onto the host's files
        assert (shared / "from-guest").read_text() == "guest\n"


def test_the_cli_boots_an_image_and_runs_a_command_in_it(busybox_image):
    done = machinen("boot", "--no-network", busybox_image, "--", "sh", "-c", 'echo "$GREETING" in $(pwd)', timeout=600)
    assert done.stdout == b"from the image in /srv/app\n"
    machinen("boot", "--no-network", "--detach", "--name", "cli-image", busybox_image, timeout=600)
    try:
        assert machinen("exec", "cli-image", "--", "id", "-u").stdout == b"1000\n"  # the image's User
        assert machinen("exec", "-u", "0", "cli-image", "--", "id", "-u").stdout == b"0\n"
    finally:
        machinen("stop", "cli-image")


@pytest.mark.anyio
async def test_an_image_from_a_registry_boots_and_boots_again_with_the_registry_stopped(tmp_path, anyio_backend):
    registry = Registry(tmp_path / "registry")
    try:
        layers = busybox_layers()
        config = image_config(layers, env=["PATH=/bin", "GREETING=pulled"], workdir="/srv", user="1000")
        push_image(registry, "team/busybox", "1", layers, config)
        reference = f"{registry.host}/team/busybox:1"
        async with boot(reference, network=False) as vm:
            assert await sh(vm, 'echo "$GREETING" $(pwd) $(id -u)') == "pulled /srv 1000\n"
    finally:
        registry.stop()
    async with boot(reference, network=False) as vm:  # cached: the registry is not asked
        assert await sh(vm, 'echo "$GREETING"') == "pulled\n"
    with pytest.raises(ImageError) as unreachable:  # "always" asks what the tag names now
        async with boot(reference, network=False, pull="always"):
            pass
    assert unreachable.value.code == "IMAGE_PULL_FAILED" and unreachable.value.retryable
    listed = json.loads(machinen("images", "--json").stdout)
    assert any(image["reference"] == reference for image in listed)


@pytest.mark.anyio
async def test_a_registry_listed_as_insecure_is_reached_over_plain_http(tmp_path, monkeypatch, anyio_backend):
    """A registry by a name (not loopback) without TLS, behind a proxy as on a company network:
    refused, naming insecure=, until the caller lists it; then boot and the CLI's pull reach it."""
    registry = Registry(tmp_path / "registry")
    proxy = ForwardProxy(registry.port)  # every name leads to the test registry: nothing leaves the host
    for variable in ("HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(variable, proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    try:
        layers = busybox_layers()
        config = image_config(layers, env=["PATH=/bin", "GREETING=over http"])
        push_image(registry, "team/busybox", "1", layers, config)
        named = f"registry.test:{registry.port}"
        reference = f"{named}/team/busybox:1"
        with pytest.raises(ImageError) as refused:
            async with boot(reference, network=False):
                pass
        assert refused.value.code == "IMAGE_PULL_FAILED" and "insecure" in refused.value.message
        async with boot(reference, network=False, insecure=[named]) as vm:
            assert await sh(vm, 'echo "$GREETING"') == "over http\n"
        pulled = machinen("pull", "--always", "--insecure-registry", "registry.test", "--json", reference)
        assert json.loads(pulled.stdout)["reference"] == reference
        assert ("GET", f"http://{named}/v2/team/busybox/manifests/1") in proxy.seen
    finally:
        proxy.close()
        registry.stop()


def test_an_image_whose_files_exceed_the_bound_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    """A layer of 100 MiB of zeros is 100 KiB compressed: the flattened size is what is bounded."""

    def bomb(add) -> None:
        add(_entry("zeros"), bytes(100 << 20))

    write_layout(tmp_path / "layout", [_layer(bomb)], {})
    monkeypatch.setattr(oci_image, "MAX_IMAGE_BYTES", 16 << 20)
    rootfs = paths.cache_dir() / "oci" / "rootfs"
    before = {path.name for path in rootfs.glob("*.tar")}
    with pytest.raises(ImageError) as refused:
        oci_image.rootfs_of(f"oci:{tmp_path / 'layout'}:1")
    assert refused.value.code == "IMAGE_TOO_LARGE"
    left = {path.name for path in rootfs.iterdir() if not path.name.endswith(".lock")}
    assert left == before  # no tarball, no partial one, no layer unpacked


@pytest.mark.anyio
async def test_the_image_cmd_runs_only_when_asked(busybox_image, anyio_backend):
    async with boot(busybox_image, network=False) as vm:
        assert await sh(vm, "test -e /tmp/image-cmd-ran || echo not-run") == "not-run\n"
    async with boot(busybox_image, network=False, cmd="image") as vm:
        wait = "for i in $(seq 100); do [ -s /tmp/image-cmd-ran ] && break; sleep 0.1; done"
        assert await sh(vm, f"{wait}; cat /tmp/image-cmd-ran") == "from the image as 1000\n"


@pytest.mark.anyio
async def test_the_debian_base_as_an_image_keeps_deletions_hard_links_and_capabilities(tmp_path, anyio_backend):
    base = assets.find_base()
    assert base is not None  # the shared VM and every other test built it

    def upper(add) -> None:
        add(_entry("etc/.wh.debian_version"))
        add(_entry("usr/local/bin/capped", mode=0o755,
                   pax_headers={"SCHILY.xattr.security.capability": CAPABILITY.decode("utf-8", "surrogateescape")}),
            b"#!/bin/sh\necho capped\n")  # fmt: skip
        add(_entry("usr/local/bin/also-capped", tarfile.LNKTYPE, linkname="usr/local/bin/capped"))

    write_layout(tmp_path / "layout", [base.rootfs_tarball, _layer(upper)], {"config": {"Env": ["PATH=/usr/bin:/bin"]}})
    async with boot(f"oci:{tmp_path / 'layout'}:1", network=False) as vm:
        assert await sh(vm, "test -e /etc/debian_version || echo gone; python3 -c 'print(1 + 1)'") == "gone\n2\n"
        check = ("import os; p = '/usr/local/bin/capped'; "
                 "print(os.getxattr(p, 'security.capability').hex(), os.stat(p).st_nlink)")  # fmt: skip
        assert await sh(vm, f'python3 -c "{check}"') == f"{CAPABILITY.hex()} 2\n"
        assert await sh(vm, "tail -1 /usr/local/bin/also-capped") == "echo capped\n"
