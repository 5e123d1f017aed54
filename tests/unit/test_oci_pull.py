"""Pulling OCI / Docker images into the cache (issue 25): references, a real registry
(Debian's docker-registry) anonymous, with htpasswd and with token auth, platforms, shared
blobs, offline use, corruption, resumed downloads, local layouts and archives, gc.

No VM. Every server is started here, on 127.0.0.1, and stopped by the fixtures."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import ssl
import threading
from pathlib import Path

import pytest
from oci_registry import (
    HTPASSWD,
    REGISTRY_BINARY,
    BlobStorage,
    ForwardProxy,
    RecordingProxy,
    Registry,
    TokenServer,
    canonical,
    htpasswd_auth,
    image_config,
    make_certificate,
    manifest_for,
    push_image,
    sha256,
    tar_layer,
    write_docker_archive,
    write_oci_layout,
)

from machinen_async.errors import ImageError
from machinen_async.store import oci_pull
from machinen_async.store.oci_pull import ImageReference, parse_reference

needs_registry = pytest.mark.skipif(
    not (Path(REGISTRY_BINARY).exists() and Path(HTPASSWD).exists()),
    reason="needs Debian's docker-registry and apache2-utils (make test-deps)",
)
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
HEX = "a" * 64


# --- references -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "normalised"),
    [
        ("python:3.12-slim", "docker.io", "library/python", "3.12-slim", None, "docker.io/library/python:3.12-slim"),
        ("python", "docker.io", "library/python", "latest", None, "docker.io/library/python:latest"),
        ("team/agent", "docker.io", "team/agent", "latest", None, "docker.io/team/agent:latest"),
        ("docker.io/python", "docker.io", "library/python", "latest", None, "docker.io/library/python:latest"),
        ("index.docker.io/team/a:1", "docker.io", "team/a", "1", None, "docker.io/team/a:1"),
        ("localhost:5000/x:1", "localhost:5000", "x", "1", None, "localhost:5000/x:1"),
        ("localhost/x", "localhost", "x", "latest", None, "localhost/x:latest"),
        (
            f"registry.example:5000/team/agent@sha256:{HEX}",
            "registry.example:5000",
            "team/agent",
            None,
            f"sha256:{HEX}",
            f"registry.example:5000/team/agent@sha256:{HEX}",
        ),
        (
            f"ghcr.io/o/r/deep:v1.2@sha256:{HEX}",
            "ghcr.io",
            "o/r/deep",
            "v1.2",
            f"sha256:{HEX}",
            f"ghcr.io/o/r/deep:v1.2@sha256:{HEX}",
        ),
        ("127.0.0.1:5000/a_b/c__d/e-f.g:T_1.x-y", "127.0.0.1:5000", "a_b/c__d/e-f.g", "T_1.x-y", None, None),
        ("[::1]:5000/x:1", "[::1]:5000", "x", "1", None, "[::1]:5000/x:1"),
        ("Registry/x", "Registry", "x", "latest", None, "Registry/x:latest"),  # upper case: a host
        ("a--b/c", "docker.io", "a--b/c", "latest", None, "docker.io/a--b/c:latest"),
        ("localhost:5000", "docker.io", "library/localhost", "5000", None, None),  # as Docker reads it
    ],
)
def test_parse_reference(text, registry, repository, tag, digest, normalised):
    parsed = parse_reference(text)
    assert parsed == ImageReference(registry, repository, tag, digest)
    assert str(parsed) == (normalised or f"{registry}/{repository}" + (f":{tag}" if tag else ""))
    assert parse_reference(str(parsed)) == parsed  # normalised text reads back the same


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "invalid reference format"),
        (" python", "invalid reference format"),
        ("Python", "must be lowercase"),
        ("team/Agent:1", "must be lowercase"),
        ("python:", "invalid tag"),
        ("python:-x", "invalid tag"),
        ("python:" + "x" * 129, "invalid tag"),
        ("python@sha256:abc", "invalid digest"),
        (f"python@sha256:{HEX.upper()}", "only sha256"),
        (f"python@sha512:{'a' * 128}", "only sha256"),
        ("a//b", "invalid reference format"),
        ("/a", "invalid reference format"),
        ("a/", "invalid reference format"),
        ("a/.b", "invalid reference format"),
        ("-a", "invalid reference format"),
        ("a_-b", "invalid reference format"),
        ("a___b", "invalid reference format"),
        ("host:99999/x", "invalid port"),
        ("-bad.host/x", "invalid registry host"),
        ("a b", "invalid reference format"),
        ("a\nb", "invalid reference format"),
        (HEX, "image ID"),
        ("x/" + "a" * 300, "not be more than 255"),
        ("a@b@c", "invalid digest"),
    ],
)
def test_parse_reference_refuses(text, why):
    with pytest.raises(ImageError) as refused:
        parse_reference(text)
    assert refused.value.code == "IMAGE_REFERENCE_INVALID"
    assert why in refused.value.message


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache, no docker config of the user's, no proxies from the environment."""
    monkeypatch.setenv("MACHINEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return tmp_path / "cache" / "oci"


class Lab:
    """Registries, token services and proxies of one test; all stopped at its end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.closers: list = []

    def registry(self, **kwargs) -> Registry:
        registry = Registry(self.root / f"registry{len(self.closers)}", **kwargs)
        self.closers.append(registry.stop)
        return registry

    def token_server(self, users: dict[str, str], **kwargs) -> TokenServer:
        server = TokenServer(self.root / f"token{len(self.closers)}", users, **kwargs)
        self.closers.append(server.close)
        return server

    def proxy(self, registry: Registry) -> RecordingProxy:
        proxy = RecordingProxy(registry.port)
        self.closers.append(proxy.close)
        return proxy

    def forward_proxy(self, registry: Registry) -> ForwardProxy:
        proxy = ForwardProxy(registry.port)
        self.closers.append(proxy.close)
        return proxy

    def storage(self, registry: Registry) -> BlobStorage:
        storage = BlobStorage(registry)
        self.closers.append(storage.close)
        return storage

    def close(self) -> None:
        for close in reversed(self.closers):
            close()


@pytest.fixture
def lab(tmp_path, cache):
    lab = Lab(tmp_path / "lab")
    yield lab
    lab.close()
    for closer in lab.closers:  # every registry process ended
        owner = getattr(closer, "__self__", None)
        if isinstance(owner, Registry):
            assert owner.process is None


def small_image(marker: str, *, base: bytes | None = None) -> tuple[list[bytes], dict]:
    layers = ([base] if base else []) + [tar_layer({f"etc/{marker}": marker.encode() * 100})]
    return layers, image_config(
        layers, env=["PATH=/usr/bin:/bin", f"IMAGE={marker}"], cmd=["serve"], entrypoint=["/entry"],
        workdir="/srv", user="app",
    )  # fmt: skip


def blob_files(cache: Path) -> dict[str, int]:
    directory = cache / "blobs" / "sha256"
    return {f"sha256:{p.name}": p.stat().st_size for p in directory.iterdir()} if directory.exists() else {}


def partial_files(cache: Path) -> list[Path]:
    directory = cache / "blobs" / "partial"
    return sorted(directory.iterdir()) if directory.exists() else []


def assert_cache_consistent(cache: Path) -> None:
    """Every cached blob is what its name says."""
    for path in (cache / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name


# --- registries -------------------------------------------------------------------------------


@needs_registry
@pytest.mark.parametrize("media", ["oci", "docker"])
def test_pull_anonymous(lab, cache, media):
    registry = lab.registry()
    layers, config = small_image("one", base=tar_layer({"bin/sh": os.urandom(3000)}))
    pushed = push_image(registry, "team/app", "1", layers, config, media=media)
    lines: list[str] = []
    callers: set[int] = set()

    def progress(line: str) -> None:
        lines.append(line)
        callers.add(threading.get_ident())

    image = oci_pull.pull(f"{registry.host}/team/app:1", progress=progress)

    assert image.reference == f"{registry.host}/team/app:1"
    assert image.manifest_digest == pushed.digest
    assert image.config == pushed.configs["linux/amd64"]
    assert image.config["config"]["Env"] == ["PATH=/usr/bin:/bin", "IMAGE=one"]
    assert image.config["config"]["WorkingDir"] == "/srv" and image.config["config"]["User"] == "app"
    assert [layer.digest for layer in image.layers] == [sha256(layer) for layer in layers]  # bottom first
    for layer, data in zip(image.layers, layers):
        assert layer.path.read_bytes() == data and layer.size == len(data)
        assert layer.media_type.endswith("gzip")
        assert layer.path.parent == cache / "blobs" / "sha256"
        assert f"{layer.digest[7:19]}: {len(data)}/{len(data)} bytes" in lines
    assert all(re.fullmatch(r"[0-9a-f]{12}: \d+/\d+ bytes", line) for line in lines)
    assert callers == {threading.get_ident()}  # on the caller's thread (anyio.from_thread works there)
    assert partial_files(cache) == []
    assert_cache_consistent(cache)
    (record,) = oci_pull.list_images()
    assert record.reference == image.reference and record.manifest_digest == pushed.digest
    assert record.layers == tuple(sha256(layer) for layer in layers)
    assert record.size > sum(len(layer) for layer in layers) and record.platform == oci_pull.default_platform()
    assert oci_pull.pull(f"docker://{registry.host}/team/app:1") == image

    with pytest.raises(ImageError) as missing:
        oci_pull.pull(f"{registry.host}/team/app:2")
    assert missing.value.code == "IMAGE_NOT_FOUND" and "manifest unknown" in missing.value.message
    with pytest.raises(ImageError) as missing:
        oci_pull.pull(f"{registry.host}/team/other@sha256:{HEX}")
    assert missing.value.code == "IMAGE_NOT_FOUND" and "HTTP 404" in missing.value.message


@needs_registry
def test_basic_auth(lab, cache, tmp_path):
    registry = lab.registry(auth=htpasswd_auth(tmp_path / "auth", {"alice": "s3cret"}), credentials=("alice", "s3cret"))
    layers, config = small_image("basic")
    pushed = push_image(registry, "team/private", "1", layers, config)
    reference = f"{registry.host}/team/private:1"

    for credentials, why in ((("alice", "wrong"), "wrong user or password"), (None, "needs credentials")):
        with pytest.raises(ImageError) as refused:
            oci_pull.pull(reference, credentials=credentials)
        assert refused.value.code == "IMAGE_AUTH_FAILED" and why in refused.value.message
    assert blob_files(cache) == {}

    assert oci_pull.pull(reference, credentials=("alice", "s3cret")).manifest_digest == pushed.digest
    # credentials from docker's config file, as `docker login` writes them
    config_dir = tmp_path / "docker-config"
    config_dir.mkdir()
    auth = base64.b64encode(b"alice:s3cret").decode()
    (config_dir / "config.json").write_text(json.dumps({"auths": {f"http://{registry.host}": {"auth": auth}}}))
    assert oci_pull.pull(reference, policy="always").manifest_digest == pushed.digest
    (config_dir / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": "YWxpY2U6eA=="}}}))
    with pytest.raises(ImageError) as refused:
        oci_pull.pull(reference, policy="always")
    assert refused.value.code == "IMAGE_AUTH_FAILED" and "as 'alice'" in refused.value.message


@needs_registry
def test_bearer_token_flow(lab, cache):
    tokens = lab.token_server({"bob": "pw"})
    registry = lab.registry(auth=tokens.registry_auth(), credentials=("bob", "pw"))
    layers, config = small_image("token")
    pushed = push_image(registry, "team/app", "1", layers, config)
    reference = f"{registry.host}/team/app:1"
    tokens.requests.clear()

    image = oci_pull.pull(reference, credentials=("bob", "pw"))

    assert image.manifest_digest == pushed.digest
    (asked,) = tokens.requests  # one token, reused for the config and every layer
    assert asked["user"] == "bob"
    assert asked["query"] == {"service": [tokens.service], "scope": ["repository:team/app:pull"]}

    tokens.field = "access_token"  # the OAuth spelling some services answer with
    assert oci_pull.pull(reference, credentials=("bob", "pw"), policy="always").manifest_digest == pushed.digest

    with pytest.raises(ImageError) as refused:
        oci_pull.pull(reference, credentials=("bob", "nope"), policy="always")
    assert refused.value.code == "IMAGE_AUTH_FAILED" and "wrong user or password" in refused.value.message
    with pytest.raises(ImageError) as refused:  # an anonymous token that grants nothing
        oci_pull.pull(reference, policy="always")
    assert refused.value.code == "IMAGE_AUTH_FAILED" and "needs credentials" in refused.value.message


@needs_registry
@pytest.mark.parametrize("media", ["oci", "docker"])
def test_multi_platform_index(lab, cache, media):
    registry = lab.registry()
    layers, config = small_image("multi")
    platforms = ["linux/amd64", "linux/arm64/v8", "linux/arm/v7"]
    pushed = push_image(registry, "team/multi", "1", layers, config, index_of=platforms, media=media,
                        attestation=media == "oci")  # fmt: skip
    reference = f"{registry.host}/team/multi:1"

    image = oci_pull.pull(reference)
    default = oci_pull.default_platform()
    expected = next(digest for platform, digest in pushed.manifests.items() if platform.startswith(default))
    assert image.manifest_digest == expected
    assert image.config["architecture"] == default.split("/")[1]

    arm64 = oci_pull.pull(reference, platform="linux/arm64")
    assert arm64.manifest_digest == pushed.manifests["linux/arm64/v8"] and arm64.platform == "linux/arm64"
    assert oci_pull.pull(reference, platform="linux/aarch64/v8").manifest_digest == arm64.manifest_digest
    assert oci_pull.pull(reference, platform="linux/arm/v7").manifest_digest == pushed.manifests["linux/arm/v7"]
    records = {(r.reference, r.platform): r for r in oci_pull.list_images()}
    assert records[(reference, "linux/arm64")].index_digest == pushed.digest

    with pytest.raises(ImageError) as missing:
        oci_pull.pull(reference, platform="linux/s390x")
    assert missing.value.code == "IMAGE_PLATFORM_MISSING"
    assert missing.value.details["available"] == platforms  # not buildx's "unknown/unknown" attestation
    assert "linux/amd64, linux/arm64/v8, linux/arm/v7" in missing.value.message
    with pytest.raises(ImageError) as invalid:
        oci_pull.pull(reference, platform="amd64")
    assert invalid.value.code == "IMAGE_PLATFORM_INVALID"


@needs_registry
def test_shared_blobs_are_downloaded_once(lab, cache):
    registry = lab.registry()
    base = tar_layer({"usr/lib/big": os.urandom(200_000)})
    layers_a, config_a = small_image("a", base=base)
    layers_b, config_b = small_image("b", base=base)
    push_image(registry, "team/a", "1", layers_a, config_a)
    push_image(registry, "team/b", "1", layers_b, config_b)
    proxy = lab.proxy(registry)

    first = oci_pull.pull(f"{proxy.host}/team/a:1")
    fetched_a = {r.path.rsplit("/", 1)[1] for r in proxy.blob_requests()}
    assert fetched_a == {sha256(layers_a[0]), sha256(layers_a[1]), sha256(canonical(config_a))}
    proxy.requests.clear()

    second = oci_pull.pull(f"{proxy.host}/team/b:1")

    fetched_b = [r.path.rsplit("/", 1)[1] for r in proxy.blob_requests()]
    assert sorted(fetched_b) == sorted([sha256(layers_b[1]), sha256(canonical(config_b))])  # not the base
    assert first.layers[0].path == second.layers[0].path  # one file, shared
    proxy.requests.clear()
    assert oci_pull.pull(f"{proxy.host}/team/a:1", policy="always") == first
    assert [r.path for r in proxy.requests] == ["/v2/team/a/manifests/1"]  # the tag asked again, nothing else


@needs_registry
def test_a_cached_tag_pulls_with_the_registry_stopped(lab, cache):
    registry = lab.registry()
    layers, config = small_image("offline")
    pushed = push_image(registry, "team/app", "1", layers, config, index_of=["linux/amd64", "linux/arm64/v8"])
    reference = f"{registry.host}/team/app:1"
    image = oci_pull.pull(reference)
    registry.stop()

    again = oci_pull.pull(reference)  # policy "missing": the registry is not asked
    assert again == image
    by_digest = oci_pull.pull(f"{registry.host}/team/app@{pushed.digest}")  # the cached index, resolved here
    assert by_digest.manifest_digest == image.manifest_digest
    assert oci_pull.pull(reference, policy="never") == image

    with pytest.raises(ImageError) as failed:
        oci_pull.pull(reference, policy="always")
    assert failed.value.code == "IMAGE_PULL_FAILED" and failed.value.retryable
    assert registry.host in failed.value.message
    other = "linux/arm/v7" if image.platform != "linux/arm/v7" else "linux/amd64"
    with pytest.raises(ImageError) as missing:  # a platform not cached: only the registry could say
        oci_pull.pull(reference, platform=other, policy="never")
    assert missing.value.code == "IMAGE_NOT_FOUND"

    registry.start()
    assert oci_pull.pull(reference, policy="always") == image


@needs_registry
def test_corrupted_content_is_refused_and_not_kept(lab, cache):
    registry = lab.registry()
    layers, config = small_image("corrupt", base=tar_layer({"data": os.urandom(50_000)}))
    pushed = push_image(registry, "team/app", "1", layers, config)
    stored = registry.blob_file(sha256(layers[0]))
    stored.write_bytes(bytes(b ^ 0xFF for b in stored.read_bytes()))  # same size, other bytes

    with pytest.raises(ImageError) as refused:
        oci_pull.pull(f"{registry.host}/team/app:1")

    assert refused.value.code == "IMAGE_DIGEST_MISMATCH" and sha256(layers[0]) in refused.value.message
    assert sha256(layers[0]) not in blob_files(cache)
    # (the other layer's download may have been stopped half-way: kept, to resume)
    assert sha256(layers[0]).split(":", 1)[1] not in [p.name for p in partial_files(cache)]
    assert oci_pull.list_images() == []
    assert_cache_consistent(cache)

    # a manifest whose bytes are not what its tag's digest says (nor what a digest reference says)
    layers2, config2 = small_image("manifest")
    pushed2 = push_image(registry, "team/app", "2", layers2, config2)
    manifest_file = registry.blob_file(pushed2.digest)
    manifest_file.write_bytes(manifest_file.read_bytes().replace(b'"schemaVersion":2', b'"schemaVersion":2 '))
    before = blob_files(cache)
    for reference in (f"{registry.host}/team/app:2", f"{registry.host}/team/app@{pushed2.digest}"):
        with pytest.raises(ImageError) as refused:
            oci_pull.pull(reference)
        assert refused.value.code == "IMAGE_DIGEST_MISMATCH"
    assert blob_files(cache) == before and oci_pull.list_images() == []
    assert pushed.digest not in blob_files(cache)


@needs_registry
def test_an_interrupted_pull_resumes_with_a_range_request(lab, cache):
    registry = lab.registry()
    big = tar_layer({"blob": os.urandom(4 << 20)})
    layers, config = small_image("resume", base=big)
    push_image(registry, "team/app", "1", layers, config)
    proxy = lab.proxy(registry)
    proxy.cut_after(sha256(big), 1 << 20)  # the connection breaks after 1 MiB

    with pytest.raises(ImageError) as broken:
        oci_pull.pull(f"{proxy.host}/team/app:1")

    assert broken.value.code == "IMAGE_PULL_FAILED" and broken.value.retryable
    (partial,) = partial_files(cache)
    assert partial.name == sha256(big).split(":", 1)[1]
    kept = partial.stat().st_size
    assert 0 < kept < 1 << 20
    proxy.requests.clear()

    image = oci_pull.pull(f"{proxy.host}/team/app:1")

    (resumed,) = [r for r in proxy.blob_requests() if r.path.endswith(sha256(big))]
    assert resumed.headers["range"] == f"bytes={kept}-"
    assert hashlib.sha256(image.layers[0].path.read_bytes()).hexdigest() == sha256(big).split(":", 1)[1]
    assert partial_files(cache) == []


@needs_registry
def test_a_resumed_part_that_does_not_add_up_is_fetched_again(lab, cache):
    registry = lab.registry()
    layers, config = small_image("stale", base=tar_layer({"blob": os.urandom(100_000)}))
    push_image(registry, "team/app", "1", layers, config)
    partial_dir = cache / "blobs" / "partial"
    partial_dir.mkdir(parents=True, mode=0o700)
    (partial_dir / sha256(layers[0]).split(":", 1)[1]).write_bytes(b"not the start of this blob")
    proxy = lab.proxy(registry)

    image = oci_pull.pull(f"{proxy.host}/team/app:1")

    assert image.layers[0].path.read_bytes() == layers[0]
    ranges = [r.headers.get("range") for r in proxy.blob_requests() if r.path.endswith(sha256(layers[0]))]
    assert ranges == ["bytes=26-", None]  # resumed, did not match, fetched whole
    assert partial_files(cache) == []


@needs_registry
def test_size_limits(lab, cache):
    registry = lab.registry()
    layers, config = small_image("limits")
    push_image(registry, "team/app", "1", layers, config)
    with pytest.raises(ImageError) as refused:
        oci_pull.pull(f"{registry.host}/team/app:1", max_layer_size=len(layers[0]) - 1)
    assert refused.value.code == "IMAGE_TOO_LARGE"
    assert sha256(layers[0]) not in blob_files(cache)

    huge = {**config, "padding": "x" * (4 << 20)}  # a config over 4 MiB
    push_image(registry, "team/huge", "1", layers, huge)
    with pytest.raises(ImageError) as refused:
        oci_pull.pull(f"{registry.host}/team/huge:1")
    assert refused.value.code == "IMAGE_TOO_LARGE" and "config" in refused.value.message


@needs_registry
def test_concurrent_pulls_download_each_layer_once(lab, cache):
    registry = lab.registry()
    layers, config = small_image("together", base=tar_layer({"blob": os.urandom(1 << 20)}))
    push_image(registry, "team/app", "1", layers, config)
    proxy = lab.proxy(registry)
    results: list = []

    def pull() -> None:
        try:
            results.append(oci_pull.pull(f"{proxy.host}/team/app:1"))
        except Exception as error:  # noqa: BLE001 (reported below)
            results.append(error)

    threads = [threading.Thread(target=pull) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(results) == 3 and all(isinstance(r, oci_pull.PulledImage) for r in results), results
    for layer in layers:
        assert sum(r.path.endswith(sha256(layer)) for r in proxy.blob_requests()) == 1
    assert len(oci_pull.list_images()) == 1


@needs_registry
def test_https_through_a_proxy(lab, cache, tmp_path, monkeypatch):
    """A registry by a name that resolves nowhere, over HTTPS through a CONNECT proxy; and a
    plain-HTTP one listed in insecure= through an HTTP proxy (absolute-form requests)."""
    ca = make_certificate(tmp_path / "pki", "test-ca")
    leaf = make_certificate(tmp_path / "pki", "registry", issuer=ca, dns=["registry.test"], ips=["127.0.0.1"])
    secure = lab.registry(tls=leaf)
    layers, config = small_image("tls")
    pushed = push_image(secure, "team/app", "1", layers, config,
                        ssl_context=ssl.create_default_context(cafile=str(ca.cert_path)))  # fmt: skip
    tunnel = lab.forward_proxy(secure)
    monkeypatch.setenv("HTTPS_PROXY", tunnel.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert_path))

    reference = f"registry.test:{secure.port}/team/app:1"
    assert oci_pull.pull(reference).manifest_digest == pushed.digest
    assert ("CONNECT", f"registry.test:{secure.port}") in tunnel.seen

    monkeypatch.delenv("SSL_CERT_FILE")  # the system's CAs do not know the test CA
    with pytest.raises(ImageError) as untrusted:
        oci_pull.pull(reference, policy="always")
    assert untrusted.value.code == "IMAGE_PULL_FAILED" and not untrusted.value.retryable
    assert "certificate" in untrusted.value.message

    plain = lab.registry()
    pushed = push_image(plain, "team/app", "1", layers, config)
    forward = lab.forward_proxy(plain)
    monkeypatch.setenv("HTTP_PROXY", forward.url)
    reference = f"registry.test:{plain.port}/team/app:1"
    assert oci_pull.pull(reference, insecure=[f"registry.test:{plain.port}"]).manifest_digest == pushed.digest
    assert ("GET", f"http://registry.test:{plain.port}/v2/team/app/manifests/1") in forward.seen


@needs_registry
def test_a_redirect_to_another_host_drops_authorization(lab, cache, tmp_path):
    registry = lab.registry(auth=htpasswd_auth(tmp_path / "auth", {"alice": "s3cret"}), credentials=("alice", "s3cret"))
    layers, config = small_image("redirect")
    pushed = push_image(registry, "team/app", "1", layers, config)
    storage = lab.storage(registry)
    proxy = lab.proxy(registry)
    proxy.redirect = lambda path: (
        f"http://localhost:{storage.port}/blobs/sha256/{path.rsplit(':', 1)[1]}" if "/blobs/" in path else None
    )

    image = oci_pull.pull(f"{proxy.host}/team/app:1", credentials=("alice", "s3cret"))

    assert image.manifest_digest == pushed.digest
    assert [layer.path.read_bytes() for layer in image.layers] == layers
    assert len(storage.requests) == 2  # the config and the layer
    assert all("authorization" not in headers for headers in storage.requests)
    assert all(r.headers.get("authorization", "").startswith("Basic ") for r in proxy.blob_requests())


# --- local sources ----------------------------------------------------------------------------


def test_oci_layout_source(cache, tmp_path):
    layers_a, config_a = small_image("a")
    layers_b, config_b = small_image("b")
    layout = tmp_path / "lay:out"  # a ':' in the path, too
    digests = write_oci_layout(layout, [("1", layers_a, config_a), ("2", layers_b, config_b)])

    image = oci_pull.pull(f"oci:{layout}:1")

    assert image.reference == f"oci:{layout.resolve()}:1"
    assert image.manifest_digest == digests["1"] and image.config == config_a
    assert [layer.path.read_bytes() for layer in image.layers] == layers_a
    assert oci_pull.pull(f"oci:{layout}:2").config == config_b
    for reference, why in ((f"oci:{layout}", "name one (1, 2)"), (f"oci:{layout}:3", "no image named '3'"),
                           (f"oci:{tmp_path}/nowhere", "not an existing OCI layout")):  # fmt: skip
        with pytest.raises(ImageError) as missing:
            oci_pull.pull(reference)
        assert missing.value.code == "IMAGE_NOT_FOUND" and why in missing.value.message

    single = tmp_path / "single"
    layers_c, config_c = small_image("c")
    digests = write_oci_layout(single, [(None, layers_c, config_c)])
    assert oci_pull.pull(f"oci:{single}").manifest_digest == digests[None]

    damaged = tmp_path / "damaged"
    layers_d, config_d = small_image("d")
    write_oci_layout(damaged, [("1", layers_d, config_d)])
    blob = damaged / "blobs" / "sha256" / sha256(layers_d[0]).split(":", 1)[1]
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    with pytest.raises(ImageError) as refused:
        oci_pull.pull(f"oci:{damaged}:1")
    assert refused.value.code == "IMAGE_DIGEST_MISMATCH"
    assert sha256(layers_d[0]) not in blob_files(cache) and partial_files(cache) == []
    assert_cache_consistent(cache)


@pytest.mark.parametrize("oci", [False, True], ids=["docker-save-legacy", "docker-save-oci"])
def test_docker_archive_source(cache, tmp_path, oci):
    first = tar_layer({"bin/tool": b"tool" * 500}, compress=False)
    second = tar_layer({"etc/conf": b"conf"}, compress=False)
    layers = [first, second, first]  # docker saves a repeated layer as a symlink to the first
    config = image_config(layers, env=["A=1"], cmd=["tool"])
    archive = tmp_path / "app.tar"
    write_docker_archive(archive, layers, config, ["team/app:1", "team/app:latest"], oci=oci)

    image = oci_pull.pull(f"docker-archive:{archive}")

    assert image.reference == f"docker-archive:{archive.resolve()}"
    assert image.config == config
    assert [layer.digest for layer in image.layers] == [sha256(layer) for layer in layers]
    assert [layer.path.read_bytes() for layer in image.layers] == layers
    assert {layer.media_type for layer in image.layers} == {"application/vnd.oci.image.layer.v1.tar"}
    if oci:
        assert image.manifest_digest == sha256(manifest_for(canonical(config), layers)[0])
    assert oci_pull.pull(f"docker-archive:{archive}:team/app:1").manifest_digest == image.manifest_digest
    with pytest.raises(ImageError) as missing:
        oci_pull.pull(f"docker-archive:{archive}:team/other:1")
    assert missing.value.code == "IMAGE_NOT_FOUND"

    tampered = tmp_path / "tampered.tar"
    other = tar_layer({"etc/conf": b"CONF"}, compress=False)
    write_docker_archive(tampered, [first, other], {**config, "rootfs": {"type": "layers",
                         "diff_ids": [sha256(first), sha256(second)]}}, ["team/app:2"], oci=oci)  # fmt: skip
    with pytest.raises(ImageError) as refused:
        oci_pull.pull(f"docker-archive:{tampered}")
    assert refused.value.code == "IMAGE_DIGEST_MISMATCH"
    assert sha256(other) not in blob_files(cache) and partial_files(cache) == []
    assert_cache_consistent(cache)


# --- gc ---------------------------------------------------------------------------------------


@needs_registry
def test_gc_frees_the_blobs_of_a_removed_reference_only(lab, cache):
    registry = lab.registry()
    base = tar_layer({"usr/lib/shared": os.urandom(20_000)})
    layers_a, config_a = small_image("a", base=base)
    layers_b, config_b = small_image("b", base=base)
    pushed_a = push_image(registry, "team/a", "1", layers_a, config_a)
    pushed_b = push_image(registry, "team/b", "1", layers_b, config_b)
    a = oci_pull.pull(f"{registry.host}/team/a:1")
    b = oci_pull.pull(f"{registry.host}/team/b:1")
    leftover = cache / "blobs" / "partial" / ("0" * 64)
    leftover.write_bytes(b"an abandoned download")

    assert oci_pull.gc() == len(b"an abandoned download")  # every reference kept: only the leftover
    before = blob_files(cache)
    only_a = {pushed_a.digest, sha256(canonical(config_a)), sha256(layers_a[1])}
    assert only_a <= set(before)

    freed = oci_pull.gc(keep=lambda reference: reference != a.reference)

    after = blob_files(cache)
    assert freed == sum(before[digest] for digest in only_a)
    assert set(before) - set(after) == only_a
    assert {pushed_b.digest, sha256(base), sha256(layers_b[1])} <= set(after)
    assert [r.reference for r in oci_pull.list_images()] == [b.reference]
    registry.stop()
    assert oci_pull.pull(b.reference, policy="never") == b

    assert oci_pull.remove(b.reference) == 1 and oci_pull.list_images() == []
    oci_pull.gc()
    assert blob_files(cache) == {}
