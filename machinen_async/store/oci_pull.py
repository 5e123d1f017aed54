"""OCI / Docker images pulled into a content-addressed cache (issue 25), from a registry (the
OCI distribution API, which Docker Hub and every other registry speak) or from local sources:
``oci:PATH[:TAG]`` (an OCI image layout directory) and ``docker-archive:PATH[:NAME]`` (what
``docker save`` writes, in its old format or in the newer one that carries an OCI layout).

The cache lives in ``<cache>/oci/`` (each directory 0700, ``paths.private_dir``):

- ``blobs/sha256/<hex>``: manifests, indexes, configs and layers, named by their sha256 and
  shared by every image; stored read-only, and only after their digest was checked, so a file
  there is trusted without hashing it again.
- ``blobs/partial/<hex>``: a layer being downloaded, held with ``flock`` by its downloader. An
  interrupted pull leaves it, and the next pull resumes it with an HTTP ``Range`` request; the
  whole blob (the part from before too) is hashed at the end, and a blob whose digest differs is
  deleted, never kept.
- ``images.json``: reference and platform -> index, manifest, config and layer digests, size,
  last use; replaced whole (temp file + rename) under ``.index.lock``.
- ``.lock``: every pull holds it shared from start to end, ``gc`` exclusively, so the collector
  never deletes a blob that a running pull has stored but not recorded yet.

Transport is the standard library's ``http.client``, not an HTTP package: the functions here
block and run in a worker thread (the SDK's ``anyio.to_thread``), so a blocking client costs
nothing, and it adds no dependency. ``urllib.request`` would do most of it, but the protocol
needs exact control it makes awkward: redirects followed by hand so ``Authorization`` is
dropped when a redirect leaves the registry's host (registries send blobs to storage
elsewhere) and HTTPS never drops to HTTP; ``Range`` resumes; every body read with a bound; 401
and 404 answers read as data, not exceptions. Proxies from the environment (``HTTPS_PROXY``,
``HTTP_PROXY``, ``NO_PROXY``) are honoured, except for loopback registries.

Every function here blocks (network, hashing): call it from a worker thread.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import fcntl
import hashlib
import http.client
import ipaddress
import json
import os
import platform as host_platform
import re
import ssl
import stat
import tarfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, Self

from ..errors import ImageError
from ..version import __version__
from . import paths

Progress = Callable[[str], None]

MiB = 1 << 20
MAX_DOCUMENT = 4 * MiB  # a manifest, index or config larger than this is refused (IMAGE_TOO_LARGE)
MAX_LAYER = 16 << 30  # default bound on one layer
MAX_SMALL_BODY = 64 * 1024  # error answers, redirects
MAX_TOKEN_BODY = 1 * MiB
MAX_NESTING = 4  # index -> index -> ... -> manifest
TIMEOUT = 60.0  # seconds without progress on a socket
MAX_REDIRECTS = 10
PARALLEL_LAYERS = 3  # as many as Docker downloads at once
PROGRESS_INTERVAL = 0.25  # at most 4 reports a second per layer
CHUNK = 256 * 1024
INDEX_VERSION = 1

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
SCHEMA1_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
ACCEPT = f"{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_LIST}, {DOCKER_MANIFEST}"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
CONFIG_TYPES = frozenset({OCI_CONFIG, "application/vnd.docker.container.image.v1+json"})
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
LAYER_TYPES = frozenset(
    {
        OCI_LAYER,
        OCI_LAYER + "+gzip",
        OCI_LAYER + "+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar",
    }
)
UNCOMPRESSED_LAYER_TYPES = frozenset({OCI_LAYER, "application/vnd.docker.image.rootfs.diff.tar"})
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
LOCAL_PREFIXES = ("oci:", "docker-archive:")
USER_AGENT = f"machinen_async/{__version__}"

# --- references (Docker's grammar: github.com/distribution/reference) ---------------------------

_ALNUM = r"[a-z0-9]+"
_PATH_COMPONENT = rf"{_ALNUM}(?:(?:[._]|__|-+){_ALNUM})*"
_PATH = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*", re.ASCII)
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?", re.ASCII)
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", re.ASCII)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)
_ANY_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}", re.ASCII)
_IMAGE_ID = re.compile(r"[0-9a-f]{64}", re.ASCII)
NAME_TOTAL_LENGTH_MAX = 255


@dataclass(frozen=True)
class ImageReference:
    """A registry image: ``registry/repository[:tag][@digest]``, normalised as Docker does."""

    registry: str  # "docker.io", "localhost:5000", "[::1]:5000"
    repository: str  # "library/python"
    tag: str | None  # "latest" when neither a tag nor a digest was given
    digest: str | None  # "sha256:<64 hex>"

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def target(self) -> str:
        """What the manifest endpoint is asked for: the digest if there is one (a tag beside a
        digest only documents it, as in Docker), else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> ImageReference:
    """``text`` read with Docker's rules: ``python:3.12-slim`` is
    ``docker.io/library/python:3.12-slim``, ``team/agent`` is ``docker.io/team/agent:latest``;
    the first component names a registry host when it has a ``.`` or ``:``, is ``localhost``,
    or has an upper-case letter. ImageError (IMAGE_REFERENCE_INVALID) otherwise."""

    def invalid(why: str) -> ImageError:
        return ImageError(f"{text!r} is not an image reference: {why}", code="IMAGE_REFERENCE_INVALID")

    if not isinstance(text, str):
        raise ImageError(f"an image reference is a string, not {type(text).__name__}", code="IMAGE_REFERENCE_INVALID")
    if not text or len(text) > 1024 or not text.isprintable() or text != text.strip():
        raise invalid("invalid reference format")
    if _IMAGE_ID.fullmatch(text):
        raise invalid("a 64-hex string is an image ID, not a repository name")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            if _ANY_DIGEST.fullmatch(digest):
                raise invalid("only sha256 digests (64 lower-case hex digits) are supported")
            raise invalid("invalid digest")
    tag = None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise invalid("invalid tag (letters, digits, '_', '.', '-', at most 128, not starting with '.' or '-')")
    if not rest:
        raise invalid("no repository name")
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        registry, path = first, remainder
        if not _DOMAIN.fullmatch(registry):
            raise invalid(f"invalid registry host {registry!r}")
        port = registry.rpartition("]")[2].rpartition(":")[2] if ":" in registry.rpartition("]")[2] else ""
        if port and not 0 < int(port) < 65536:
            raise invalid(f"invalid port in registry host {registry!r}")
    else:
        registry, path = DOCKER_HUB, rest
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not _PATH.fullmatch(path):
        if _PATH.fullmatch(path.lower()):
            raise invalid("repository name must be lowercase")
        raise invalid("invalid reference format")
    if len(registry) + 1 + len(path) > NAME_TOTAL_LENGTH_MAX:
        raise invalid(f"repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters")
    if tag is None and digest is None:
        tag = "latest"
    return ImageReference(registry, path, tag, digest)


# --- what a pull returns ----------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    digest: str  # "sha256:..." of the blob as stored (compressed, if it is)
    media_type: str
    size: int
    path: Path  # the verified blob in the cache


@dataclass(frozen=True)
class PulledImage:
    reference: str  # normalised: "docker.io/library/python:3.12-slim", "oci:/abs/dir:tag", ...
    manifest_digest: str  # of the platform's image manifest
    config: dict[str, Any] = field(hash=False)  # the image config JSON ("config": Env, Cmd, ...; "rootfs")
    layers: tuple[Layer, ...]  # bottom first
    platform: str = "linux/amd64"


@dataclass(frozen=True)
class ImageRecord:
    reference: str
    platform: str
    manifest_digest: str
    config_digest: str
    layers: tuple[str, ...]
    size: int  # bytes of manifest, config and layers (shared layers counted in every image)
    last_used: float  # time.time()
    index_digest: str | None = None


# --- platforms --------------------------------------------------------------------------------

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm"}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


@dataclass(frozen=True)
class _Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)

    def accepts(self, other: _Platform) -> bool:
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        if not self.variant:
            return True
        default = _DEFAULT_VARIANT.get(self.architecture, "")
        return (self.variant or default) == (other.variant or default)


def default_platform() -> str:
    """``linux/<this machine's architecture>``: linux/amd64 on x86_64, linux/arm64 on aarch64."""
    machine = host_platform.machine().lower()
    if machine.startswith("armv7"):
        return "linux/arm/v7"
    return f"linux/{_ARCH_ALIASES.get(machine, machine)}"


def _parse_platform(text: str) -> _Platform:
    parts = text.strip().lower().split("/") if isinstance(text, str) else []
    if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9_.-]+", part) for part in parts):
        raise ImageError(f"{text!r} is not a platform (os/architecture[/variant], e.g. linux/arm64)",
                         code="IMAGE_PLATFORM_INVALID")  # fmt: skip
    return _Platform(parts[0], _ARCH_ALIASES.get(parts[1], parts[1]), parts[2] if len(parts) == 3 else "")


def _platform_of(value: object) -> _Platform | None:
    if not isinstance(value, dict):
        return None
    os_name, arch, variant = value.get("os"), value.get("architecture"), value.get("variant", "")
    if not (isinstance(os_name, str) and isinstance(arch, str) and isinstance(variant, str)):
        return None
    arch = _ARCH_ALIASES.get(arch.lower(), arch.lower())
    return _Platform(os_name.lower(), arch, variant.lower())


# --- documents --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Descriptor:
    media_type: str
    digest: str
    size: int
    platform: _Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


def _invalid(what: str, why: str) -> ImageError:
    return ImageError(f"{what}: {why}", code="IMAGE_MANIFEST_INVALID")


def _descriptor(value: object, what: str) -> _Descriptor:
    """A descriptor from a document nobody vouches for: its digest names a file in the cache and
    goes into URLs, so it must be exactly ``sha256:<64 hex>``."""
    if not isinstance(value, dict):
        raise _invalid(what, "a descriptor is not an object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str):
        raise _invalid(what, "a descriptor lacks mediaType or digest")
    if not _DIGEST.fullmatch(digest):
        if _ANY_DIGEST.fullmatch(digest):
            raise ImageError(f"{what}: digest {_clean(digest, 90)} uses an algorithm other than sha256",
                             code="IMAGE_FORMAT_UNSUPPORTED")  # fmt: skip
        raise _invalid(what, f"invalid digest {_clean(digest, 90)!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _invalid(what, f"invalid size for {digest}")
    annotations = value.get("annotations")
    if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
        annotations = {}
    return _Descriptor(media_type, digest, size, _platform_of(value.get("platform")), annotations)


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise _invalid(what, f"not JSON ({error})") from None
    if not isinstance(document, dict):
        raise _invalid(what, "not a JSON object")
    return document


def _document_type(document: dict[str, Any], content_type: str | None, what: str) -> str:
    """The kind of a manifest document: its own ``mediaType``, else the HTTP Content-Type, else
    its shape (OCI made ``mediaType`` optional)."""
    declared = document.get("mediaType")
    kind = declared if isinstance(declared, str) and declared else (content_type or "").split(";")[0].strip()
    if kind in SCHEMA1_TYPES or document.get("schemaVersion") == 1:
        raise ImageError(f"{what} is a Docker schema 1 manifest, which is deprecated and not supported; "
                         "push the image again with a current Docker", code="IMAGE_FORMAT_UNSUPPORTED")  # fmt: skip
    if kind in INDEX_TYPES or kind in MANIFEST_TYPES:
        return kind
    if "manifests" in document:
        return OCI_INDEX
    if "layers" in document and "config" in document:
        return OCI_MANIFEST
    raise ImageError(f"{what} is neither an image manifest nor an index (media type {_clean(kind, 100)!r})",
                     code="IMAGE_FORMAT_UNSUPPORTED")  # fmt: skip


@dataclass(frozen=True)
class _Manifest:
    config: _Descriptor
    layers: tuple[_Descriptor, ...]


def _parse_manifest(data: bytes, what: str) -> _Manifest:
    document = _json(data, what)
    _document_type(document, None, what)
    config = _descriptor(document.get("config"), what)
    if config.media_type not in CONFIG_TYPES:
        raise ImageError(f"{what} is not a container image (config media type {_clean(config.media_type, 100)!r})",
                         code="IMAGE_FORMAT_UNSUPPORTED")  # fmt: skip
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise _invalid(what, "no layers list")
    descriptors = tuple(_descriptor(layer, what) for layer in layers)
    for layer in descriptors:
        if layer.media_type not in LAYER_TYPES:
            raise ImageError(f"{what}: layer {layer.digest} has media type {_clean(layer.media_type, 100)!r}, "
                             "which is not a Linux filesystem layer this can use (foreign and non-distributable "
                             "layers are not fetched)", code="IMAGE_FORMAT_UNSUPPORTED")  # fmt: skip
    return _Manifest(config, descriptors)


def _index_entries(document: dict[str, Any], what: str) -> list[_Descriptor]:
    entries = document.get("manifests")
    if not isinstance(entries, list):
        raise _invalid(what, "an index without a manifests list")
    return [_descriptor(entry, what) for entry in entries]


def _select_platform(entries: list[_Descriptor], wanted: _Platform, what: str) -> _Descriptor:
    """The entry for ``wanted``: the first that matches, preferring the architecture's default
    variant when none was asked for. IMAGE_PLATFORM_MISSING lists the platforms there are."""
    usable = [e for e in entries if e.media_type in INDEX_TYPES | MANIFEST_TYPES or not e.media_type]
    matches = [e for e in usable if e.platform is not None and wanted.accepts(e.platform)]
    if matches:
        if not wanted.variant:
            default = _DEFAULT_VARIANT.get(wanted.architecture, "")
            preferred = [e for e in matches if e.platform is not None and e.platform.variant in ("", default)]
            matches = preferred or matches
        return matches[0]
    unplatformed = [e for e in usable if e.platform is None]
    if not any(e.platform for e in usable) and len(unplatformed) == 1:
        return unplatformed[0]  # an index of one image that says nothing about its platform
    available: list[str] = []
    for entry in usable:
        # buildx's attestation manifests are "unknown/unknown": not images
        if entry.platform is not None and entry.platform.os != "unknown" and str(entry.platform) not in available:
            available.append(str(entry.platform))
    raise ImageError(
        f"{what} has no image for {wanted}; it has: {', '.join(available) or 'no platform-specific images'} "
        "(choose one with platform=)",
        code="IMAGE_PLATFORM_MISSING",
        available=available,
    )


def _check_config(config: object, manifest: _Manifest, wanted: _Platform, explicit: bool, what: str) -> dict:
    if not isinstance(config, dict):
        raise _invalid(what, "the image config is not a JSON object")
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(manifest.layers):
        raise _invalid(what, f"the config lists {len(diff_ids) if isinstance(diff_ids, list) else 'no'} layer "
                             f"diff_ids for {len(manifest.layers)} layers")  # fmt: skip
    for layer, diff_id in zip(manifest.layers, diff_ids):
        if layer.media_type in UNCOMPRESSED_LAYER_TYPES and layer.digest != diff_id:  # such a layer is its diff
            raise ImageError(f"{what}: layer {layer.digest} is uncompressed, but the config says its content has "
                             f"digest {_clean(str(diff_id), 80)}", code="IMAGE_DIGEST_MISMATCH")  # fmt: skip
    actual = _platform_of(config)
    if explicit and actual is not None and not wanted.accepts(actual):
        raise ImageError(f"{what} is an image for {actual}, not {wanted}", code="IMAGE_PLATFORM_MISSING",
                         available=[str(actual)])  # fmt: skip
    return config


# --- the cache --------------------------------------------------------------------------------


def oci_dir() -> Path:
    return paths.private_dir(paths.private_dir(paths.cache_dir()) / "oci")


def _blobs() -> Path:
    return paths.private_dir(paths.private_dir(oci_dir() / "blobs") / "sha256")


def _partials() -> Path:
    return paths.private_dir(paths.private_dir(oci_dir() / "blobs") / "partial")


def _blob_path(digest: str) -> Path:
    if not _DIGEST.fullmatch(digest):
        raise ImageError(f"{digest!r} is not a sha256 digest", code="IMAGE_CACHE_CORRUPT")
    return _blobs() / digest.split(":", 1)[1]


def _present(descriptor: _Descriptor) -> bool:
    try:
        return _blob_path(descriptor.digest).stat().st_size == descriptor.size
    except FileNotFoundError:
        return False


def _read_cached(digest: str, limit: int = MAX_DOCUMENT) -> bytes | None:
    try:
        fd = paths.open_regular(_blob_path(digest))
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as blob:
        return blob.read(limit + 1)[:limit]


@contextlib.contextmanager
def _flock(path: Path, kind: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, kind)
        yield
    finally:
        os.close(fd)  # releases the lock


def _pull_lock() -> contextlib.AbstractContextManager[None]:
    return _flock(oci_dir() / ".lock", fcntl.LOCK_SH)


def _gc_lock() -> contextlib.AbstractContextManager[None]:
    return _flock(oci_dir() / ".lock", fcntl.LOCK_EX)


def _index_lock() -> contextlib.AbstractContextManager[None]:
    return _flock(oci_dir() / ".index.lock", fcntl.LOCK_EX)


def _index_path() -> Path:
    return oci_dir() / "images.json"


def _read_records() -> list[dict[str, Any]]:
    path = _index_path()
    try:
        fd = paths.open_regular(path)
    except FileNotFoundError:
        return []
    with os.fdopen(fd, "rb") as file:
        data = file.read()
    try:
        document = json.loads(data)
        records = document["images"]
        if document.get("version") != INDEX_VERSION or not isinstance(records, list):
            raise ValueError("unknown version")
        for record in records:
            if not (isinstance(record["reference"], str) and isinstance(record["platform"], str)):
                raise TypeError("bad record")
            for digest in [record["manifest_digest"], record["config_digest"], *record["layers"]]:
                if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
                    raise ValueError("bad digest")
    except (ValueError, KeyError, TypeError) as error:
        raise ImageError(f"{path} is damaged ({error}); delete it (and pull again) to start afresh",
                         code="IMAGE_CACHE_CORRUPT") from None  # fmt: skip
    return records


def _write_records(records: list[dict[str, Any]]) -> None:
    path = _index_path()
    temporary = path.with_name(f".images.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = paths.create_file(temporary)
    with os.fdopen(fd, "wb") as file:
        file.write(json.dumps({"version": INDEX_VERSION, "images": records}, indent=1, sort_keys=True).encode())
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _record(reference: str, wanted: _Platform, index_digest: str | None, manifest_digest: str,
            manifest_size: int, manifest: _Manifest) -> None:  # fmt: skip
    now = time.time()
    record = {
        "reference": reference,
        "platform": str(wanted),
        "index_digest": index_digest,
        "manifest_digest": manifest_digest,
        "config_digest": manifest.config.digest,
        "layers": [layer.digest for layer in manifest.layers],
        "size": manifest_size + manifest.config.size + sum(layer.size for layer in manifest.layers),
        "pulled": now,
        "last_used": now,
    }
    with _index_lock():
        records = [r for r in _read_records() if (r["reference"], r["platform"]) != (reference, str(wanted))]
        _write_records([*records, record])


def _touch(reference: str, wanted: _Platform) -> None:
    with _index_lock():
        records = _read_records()
        for record in records:
            if (record["reference"], record["platform"]) == (reference, str(wanted)):
                record["last_used"] = time.time()
        _write_records(records)


def _image(reference: str, wanted: _Platform, manifest_digest: str) -> PulledImage:
    """The cached image whose manifest is ``manifest_digest`` (all its blobs present)."""
    what = f"{reference} (cached manifest {manifest_digest})"
    manifest_bytes = _read_cached(manifest_digest)
    if manifest_bytes is None:
        raise ImageError(f"{what} is missing from the cache", code="IMAGE_CACHE_CORRUPT")
    manifest = _parse_manifest(manifest_bytes, what)
    config_bytes = _read_cached(manifest.config.digest)
    if config_bytes is None:
        raise ImageError(f"{what}: config missing from the cache", code="IMAGE_CACHE_CORRUPT")
    config = _json(config_bytes, what)
    return PulledImage(
        reference=reference,
        manifest_digest=manifest_digest,
        config=config,
        layers=tuple(Layer(d.digest, d.media_type, d.size, _blob_path(d.digest)) for d in manifest.layers),
        platform=str(wanted),
    )


def _complete_in_cache(manifest_digest: str) -> bool:
    data = _read_cached(manifest_digest)
    if data is None:
        return False
    try:
        manifest = _parse_manifest(data, manifest_digest)
    except ImageError:
        return False
    return all(_present(d) for d in (manifest.config, *manifest.layers))


def _cached(reference: ImageReference, wanted: _Platform, explicit: bool) -> PulledImage | None:
    """The image from the cache alone, or None: a reference recorded with every blob still
    there; or a digest reference whose manifest (or index, resolved to ``wanted``) and blobs
    are cached, from whatever reference pulled them."""
    key = str(reference)
    for record in _read_records():
        same = (record["reference"], record["platform"]) == (key, str(wanted))
        if same and _complete_in_cache(record["manifest_digest"]):
            _touch(key, wanted)
            return _image(key, wanted, record["manifest_digest"])
    if reference.digest is None:
        return None
    digest, index_digest = reference.digest, None
    for _depth in range(MAX_NESTING):
        data = _read_cached(digest)
        if data is None:
            return None
        document = _json(data, f"{key} (cached)")
        if _document_type(document, None, key) in MANIFEST_TYPES:
            break
        index_digest = index_digest or digest
        digest = _select_platform(_index_entries(document, key), wanted, key).digest
    else:
        return None
    if not _complete_in_cache(digest):
        return None
    manifest = _parse_manifest(_read_cached(digest) or b"", key)
    _check_config(_json(_read_cached(manifest.config.digest) or b"", key), manifest, wanted,
                  explicit and index_digest is None, key)  # fmt: skip
    _record(key, wanted, index_digest, digest, len(data), manifest)
    return _image(key, wanted, digest)


def _store_document(digest: str, data: bytes) -> None:
    """A verified small blob (manifest, index, config) into the cache."""
    final = _blob_path(digest)
    if final.exists():
        return
    temporary = _partials() / f"{final.name}.{os.getpid()}.{threading.get_ident()}.doc"
    fd = paths.create_file(temporary)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        temporary.chmod(0o444)
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)


def _verified(data: bytes, descriptor: _Descriptor | str, what: str) -> bytes:
    expected = descriptor if isinstance(descriptor, str) else descriptor.digest
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ImageError(f"{what}: content has digest {actual}, not {expected}; nothing of it was kept",
                         code="IMAGE_DIGEST_MISMATCH")  # fmt: skip
    return data


@contextlib.contextmanager
def _locked_partial(descriptor: _Descriptor) -> Iterator[int | None]:
    """The partial file of a layer, open read-write and held with ``flock`` (another process
    or thread downloading the same blob waits for it); None when the blob is in the cache by
    then. The file at the partial path must be the one locked: a finished download renames it
    into ``sha256/`` while a waiter holds a descriptor of it."""
    partial, final = _partials() / descriptor.hex, _blob_path(descriptor.digest)
    while True:
        if final.exists():
            yield None
            return
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if final.exists():
                yield None
                return
            try:
                same = os.stat(partial, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                try:
                    yield fd
                finally:
                    with contextlib.suppress(FileNotFoundError):  # an empty file resumes nothing
                        info = os.stat(partial, follow_symlinks=False)
                        if info.st_ino == os.fstat(fd).st_ino and info.st_size == 0:
                            os.unlink(partial)
                return
        finally:
            os.close(fd)


def _finish_partial(fd: int, descriptor: _Descriptor) -> None:
    os.fsync(fd)
    os.fchmod(fd, 0o444)
    os.rename(_partials() / descriptor.hex, _blob_path(descriptor.digest))


def _hash_prefix(fd: int, length: int) -> hashlib._Hash:
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    remaining = length
    while remaining:
        chunk = os.read(fd, min(CHUNK * 4, remaining))
        if not chunk:
            break
        digest.update(chunk)
        remaining -= len(chunk)
    return digest


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --- progress ---------------------------------------------------------------------------------


class _Cancelled(Exception):
    """A layer download stopped because another one failed (its partial file stays)."""


@dataclass
class _LayerState:
    descriptor: _Descriptor
    done: int = 0
    reported: int = -1
    reported_at: float = 0.0


class _Progress:
    """``progress(f"{short digest}: {done}/{total} bytes")`` per layer, at most every
    PROGRESS_INTERVAL, and once more when a layer is complete; always on the caller's thread
    (so the callback may use ``anyio.from_thread``)."""

    def __init__(self, report: Progress | None, descriptors: Sequence[_Descriptor]) -> None:
        self.report = report
        self.states = [_LayerState(d) for d in descriptors]

    def tick(self, force: bool = False) -> None:
        if self.report is None:
            return
        now = time.monotonic()
        for state in self.states:
            done, total = state.done, state.descriptor.size
            due = force or done == total or now - state.reported_at >= PROGRESS_INTERVAL
            if done != state.reported and due:
                state.reported, state.reported_at = done, now
                self.report(f"{state.descriptor.hex[:12]}: {done}/{total} bytes")


# --- HTTP -------------------------------------------------------------------------------------


def _clean(text: str, limit: int = 300) -> str:
    """Text a server chose, fit for an error message: printable, bounded."""
    text = "".join(c if c.isprintable() else " " for c in str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _host_of(netloc: str) -> str:
    parsed = urllib.parse.urlsplit(f"//{netloc}")
    return (parsed.hostname or netloc).lower()


def _plain_http(netloc: str, insecure: Sequence[str]) -> bool:
    """HTTP rather than HTTPS: loopback registries (as Docker allows) and those the caller
    listed (``host``, ``host:port`` or an IP network such as ``10.0.0.0/8``)."""
    host = _host_of(netloc)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if host == "localhost" or (address is not None and address.is_loopback):
        return True
    for entry in insecure:
        entry = entry.strip().lower()
        if entry in (netloc.lower(), host):
            return True
        if address is not None and "/" in entry:
            with contextlib.suppress(ValueError):
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
    return False


def _origin(url: str) -> tuple[str, str, int]:
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # out of range: _open refuses such a URL
        port = -1
    return parts.scheme, (parts.hostname or "").lower(), port or (443 if parts.scheme == "https" else 80)


class _Response:
    """One HTTP response and its connection (one connection per request: a pull makes few)."""

    def __init__(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse, url: str):
        self.connection, self.response, self.url = connection, response, url
        self.status = response.status

    def header(self, name: str) -> str | None:
        return self.response.getheader(name)

    def read(self, amount: int) -> bytes:
        return self.response.read(amount)

    def read_bounded(self, limit: int, what: str) -> bytes:
        length = self.header("Content-Length")
        if length and length.isdigit() and int(length) > limit:
            raise _too_large(what, int(length), limit)
        data = self.response.read(limit + 1)
        if len(data) > limit:
            raise _too_large(what, None, limit)
        return data

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.connection.close()


def _too_large(what: str, size: int | None, limit: int) -> ImageError:
    told = f"{size} bytes" if size is not None else "more"
    return ImageError(f"{what} is {told}, over the limit of {limit} bytes", code="IMAGE_TOO_LARGE")


def _proxy_for(parts: urllib.parse.SplitResult) -> urllib.parse.SplitResult | None:
    host = parts.hostname or ""
    if _plain_http(host, ()):  # loopback: never through a proxy
        return None
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    if "://" not in proxy:
        proxy = f"http://{proxy}"
    return urllib.parse.urlsplit(proxy)


def _proxy_authorization(proxy: urllib.parse.SplitResult) -> dict[str, str]:
    if proxy.username is None:
        return {}
    user = urllib.parse.unquote(proxy.username)
    password = urllib.parse.unquote(proxy.password or "")
    return {"Proxy-Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _connect(url: str, context: ssl.SSLContext) -> tuple[http.client.HTTPConnection, str, dict[str, str]]:
    """A connection for ``url`` (through a proxy if the environment names one), the request
    target to send, and headers the proxy needs."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    proxy = _proxy_for(parts)
    if parts.scheme == "https":
        if proxy is None:
            return http.client.HTTPSConnection(host, port, timeout=TIMEOUT, context=context), target, {}
        tunnel = http.client.HTTPSConnection(proxy.hostname or "", proxy.port or 80, timeout=TIMEOUT, context=context)
        tunnel.set_tunnel(host, port or 443, headers=_proxy_authorization(proxy))
        return tunnel, target, {}
    if proxy is None:
        return http.client.HTTPConnection(host, port, timeout=TIMEOUT), target, {}
    absolute = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/", parts.query, ""))
    return (http.client.HTTPConnection(proxy.hostname or "", proxy.port or 80, timeout=TIMEOUT), absolute,
            _proxy_authorization(proxy))  # fmt: skip


@contextlib.contextmanager
def _network(registry: str, url: str) -> Iterator[None]:
    """Transport failures as IMAGE_PULL_FAILED naming the registry (retryable, except a TLS
    certificate nobody vouches for and a registry without TLS)."""
    where = registry if _origin(url)[1] == _host_of(registry) else f"{registry} (at {_origin(url)[1]})"
    try:
        yield
    except ssl.SSLCertVerificationError as error:
        raise ImageError(f"registry {where}: its TLS certificate is not trusted ({error.verify_message}); "
                         "a registry without TLS must be listed in insecure=", code="IMAGE_PULL_FAILED",
                         retryable=False) from None  # fmt: skip
    except ssl.SSLError as error:
        if error.reason != "WRONG_VERSION_NUMBER":  # what OpenSSL says of an HTTP answer to its hello
            raise _unreachable(where, error) from None
        raise ImageError(f"registry {where} answered without TLS: a registry without TLS must be listed in "
                         "insecure=", code="IMAGE_PULL_FAILED", retryable=False) from None  # fmt: skip
    except (OSError, http.client.HTTPException) as error:
        raise _unreachable(where, error) from None


def _unreachable(where: str, error: Exception) -> ImageError:
    described = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return ImageError(f"registry {where} could not be reached or broke off: {_clean(described)}",
                      code="IMAGE_PULL_FAILED", retryable=True)  # fmt: skip


def _open(url: str, headers: dict[str, str], *, registry: str, insecure: Sequence[str],
          context: ssl.SSLContext) -> _Response:  # fmt: skip
    """GET ``url``, following redirects: ``Authorization`` goes only to the host it was meant
    for, and a redirect never leads from HTTPS to plain HTTP (except to a host that is HTTP
    anyway: loopback or insecure)."""
    headers = {"User-Agent": USER_AGENT, **headers}
    for _hop in range(MAX_REDIRECTS + 1):
        connection, target, extra = _connect(url, context)
        with _network(registry, url):
            try:
                connection.request("GET", target, headers={**headers, **extra})
                response = connection.getresponse()
            except BaseException:
                connection.close()
                raise
        location = response.getheader("Location")
        if response.status not in (301, 302, 303, 307, 308) or not location:
            return _Response(connection, response, url)
        connection.close()
        following = urllib.parse.urljoin(url, location)
        scheme = urllib.parse.urlsplit(following).scheme
        if scheme not in ("http", "https") or _origin(following)[2] == -1 or not _origin(following)[1] or (
            scheme == "http" and urllib.parse.urlsplit(url).scheme == "https"
            and not _plain_http(urllib.parse.urlsplit(following).netloc, insecure)
        ):  # fmt: skip
            raise ImageError(f"registry {registry} redirected to {_clean(following, 200)}, which is not HTTPS",
                             code="IMAGE_PULL_FAILED")  # fmt: skip
        if _origin(following) != _origin(url):
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        url = following
    raise ImageError(f"registry {registry}: more than {MAX_REDIRECTS} redirects", code="IMAGE_PULL_FAILED")


def _registry_message(data: bytes) -> tuple[list[str], str]:
    """The error codes and messages of a registry's ``{"errors": [...]}`` answer."""
    try:
        errors = json.loads(data)["errors"]
        codes = [str(e.get("code", "")) for e in errors if isinstance(e, dict)]
        messages = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors if isinstance(e, dict)]
        return codes, _clean("; ".join(messages))
    except (ValueError, KeyError, TypeError, AttributeError):
        return [], _clean(data.decode("utf-8", "replace"), 200)


_CHALLENGE = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*,?')


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="...",scope="..."`` -> ("bearer", {realm, service, scope})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for match in _CHALLENGE.finditer(rest):
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[match.group(1).lower()] = value
    return scheme.lower(), params


def _basic(credentials: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()


def docker_config_credentials(registry: str) -> tuple[str, str] | None:
    """``(user, password)`` for ``registry`` from ``$DOCKER_CONFIG/config.json`` (default
    ``~/.docker/config.json``): its ``auths`` entry's ``auth`` (base64 ``user:password``).
    Credential helpers (``credsStore``) are not run."""
    directory = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    try:
        with open(Path(directory) / "config.json", "rb") as file:
            auths = json.loads(file.read(MiB)).get("auths")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(auths, dict):
        return None
    names = {registry.lower()}
    if registry == DOCKER_HUB:
        names |= {"index.docker.io", DOCKER_HUB_API}  # docker login writes https://index.docker.io/v1/
    for key, entry in auths.items():
        if not isinstance(key, str) or not isinstance(entry, dict):
            continue
        if key.split("://", 1)[-1].split("/", 1)[0].lower() not in names:
            continue
        encoded = entry.get("auth")
        if isinstance(encoded, str) and encoded:
            try:
                user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
            return user, password
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return entry["username"], entry["password"]
    return None


class _Registry:
    """One pull's conversation with a registry: scheme, credentials, the token it was given."""

    def __init__(self, reference: ImageReference, credentials: tuple[str, str] | None,
                 insecure: Sequence[str]) -> None:  # fmt: skip
        self.reference = reference
        self.registry = reference.registry
        self.insecure = tuple(insecure)
        api_host = DOCKER_HUB_API if reference.registry == DOCKER_HUB else reference.registry
        self.scheme = "http" if _plain_http(api_host, self.insecure) else "https"
        self.base = f"{self.scheme}://{api_host}/v2/{reference.repository}"
        self.credentials = credentials if credentials is not None else docker_config_credentials(self.registry)
        self.context = ssl.create_default_context()
        self.authorization: str | None = None
        self.lock = threading.Lock()

    def open(self, url: str, headers: dict[str, str], what: str) -> _Response:
        return _open(url, headers, registry=self.registry, insecure=self.insecure, context=self.context)

    def get(self, path: str, headers: dict[str, str], what: str) -> _Response:
        """GET ``<base>/<path>``, answering one authentication challenge."""
        url = f"{self.base}/{path}"
        sent = self.authorization
        response = self.open(url, {**headers, **({"Authorization": sent} if sent else {})}, what)
        if response.status != 401:
            return response
        with response, _network(self.registry, url):
            challenge = response.header("WWW-Authenticate") or ""
            _codes, message = _registry_message(response.read(MAX_SMALL_BODY))
        with self.lock:
            if self.authorization == sent:  # nobody else answered a challenge meanwhile
                self.authorization = self._authenticate(challenge, sent, message, what)
            authorization = self.authorization
        response = self.open(url, {**headers, "Authorization": authorization or ""}, what)
        if response.status == 401:
            with response, _network(self.registry, url):
                _codes, message = _registry_message(response.read(MAX_SMALL_BODY))
            if (authorization or "").startswith("Basic "):
                raise self._auth_failed(what, f"wrong user or password ({message})")
            if self.credentials is None:
                raise self._auth_failed(what, f"it needs credentials (credentials=, or docker login): an anonymous "
                                              f"token gives no access ({message})")  # fmt: skip
            raise self._auth_failed(what, f"the token its token service gave grants no access ({message})")
        return response

    def _auth_failed(self, what: str, why: str) -> ImageError:
        who = f" as {self.credentials[0]!r}" if self.credentials else " anonymously"
        return ImageError(f"{what}: cannot pull from {self.registry}{who}: {why}", code="IMAGE_AUTH_FAILED")

    def _authenticate(self, challenge: str, sent: str | None, message: str, what: str) -> str:
        scheme, params = _parse_challenge(challenge)
        if scheme == "basic":
            if self.credentials is None:
                raise self._auth_failed(what, f"it needs credentials (credentials=, or docker login) ({message})")
            if sent is not None and sent.startswith("Basic "):
                raise self._auth_failed(what, f"wrong user or password ({message})")
            return _basic(self.credentials)
        if scheme == "bearer" and params.get("realm"):
            return self._token(params, what)
        raise self._auth_failed(what, f"unsupported authentication challenge {_clean(challenge, 120)!r} ({message})")

    def _token(self, params: dict[str, str], what: str) -> str:
        """The token flow: GET the realm with service and scope (with the basic credentials,
        if any) and use the ``token`` (or ``access_token``) it answers as a Bearer token."""
        realm = params["realm"]
        parts = urllib.parse.urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self._auth_failed(what, f"the registry named an invalid token service {_clean(realm, 120)!r}")
        headers = {}
        if self.credentials is not None:
            if parts.scheme == "http" and not _plain_http(parts.netloc, self.insecure):
                raise self._auth_failed(what, f"its token service {_clean(realm, 120)} is plain HTTP; "
                                              "credentials are sent there only over HTTPS")  # fmt: skip
            headers["Authorization"] = _basic(self.credentials)
        query = [("service", params["service"])] if params.get("service") else []
        scopes = params.get("scope", "").split() or [f"repository:{self.reference.repository}:pull"]
        query += [("scope", scope) for scope in scopes]
        url = realm + ("&" if parts.query else "?") + urllib.parse.urlencode(query)
        with self.open(url, headers, what) as response, _network(self.registry, url):
            if response.status in (401, 403):
                _codes, message = _registry_message(response.read(MAX_SMALL_BODY))
                why = "wrong user or password" if self.credentials else "it needs credentials"
                raise self._auth_failed(what, f"{why}: the token service answered {response.status} ({message})")
            if response.status != 200:
                raise ImageError(f"{what}: the token service of {self.registry} answered HTTP {response.status}",
                                 code="IMAGE_PULL_FAILED", retryable=response.status >= 500)  # fmt: skip
            body = response.read_bounded(MAX_TOKEN_BODY, "a token answer")
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token or not token.isascii() or not token.isprintable():
            raise self._auth_failed(what, "the token service answered no usable token")
        return f"Bearer {token}"

    def fail(self, response: _Response, what: str) -> ImageError:
        """The error for an answer that is not the one wanted."""
        with _network(self.registry, response.url):
            codes, message = _registry_message(response.read(MAX_SMALL_BODY))
        status = response.status
        told = f"{message} (HTTP {status} from {self.registry})" if message else f"HTTP {status} from {self.registry}"
        if status == 404 or {"NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN"} & set(codes):
            return ImageError(f"{what}: not found: {told}", code="IMAGE_NOT_FOUND")
        if status in (401, 403) or {"UNAUTHORIZED", "DENIED"} & set(codes):
            return self._auth_failed(
                what, f"access denied (the repository may not exist, or needs credentials): {told}"
            )
        return ImageError(f"{what}: {told}", code="IMAGE_PULL_FAILED", retryable=status >= 500 or status == 429)

    # --- what a pull fetches ---

    def manifest(self, target: str, expected: _Descriptor | None, what: str) -> tuple[bytes, str, str]:
        """A manifest or index by tag or digest: (bytes, content type, verified digest)."""
        with self.get(f"manifests/{target}", {"Accept": ACCEPT}, what) as response:
            if response.status != 200:
                raise self.fail(response, what)
            with _network(self.registry, response.url):
                data = response.read_bounded(MAX_DOCUMENT, what)
            content_type = response.header("Content-Type") or ""
            told = response.header("Docker-Content-Digest")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        wanted = expected.digest if expected is not None else target if _DIGEST.fullmatch(target) else None
        if wanted is not None:
            _verified(data, wanted, what)
        elif told and _DIGEST.fullmatch(told.strip()) and told.strip() != digest:
            raise ImageError(f"{what}: the registry said its digest is {told.strip()}, the content's is {digest}; "
                             "nothing of it was kept", code="IMAGE_DIGEST_MISMATCH")  # fmt: skip
        return data, content_type, digest

    def document(self, descriptor: _Descriptor, what: str) -> bytes:
        """A small blob (the config), verified."""
        with self.get(f"blobs/{descriptor.digest}", {}, what) as response:
            if response.status != 200:
                raise self.fail(response, what)
            with _network(self.registry, response.url):
                data = response.read_bounded(MAX_DOCUMENT, what)
        return _verified(data, descriptor, what)

    def download(self, descriptor: _Descriptor, state: _LayerState, cancel: threading.Event, what: str) -> None:
        """A layer into the cache, resuming its partial file; hashed whole at the end."""
        with _locked_partial(descriptor) as fd:
            if fd is None:
                state.done = descriptor.size
                return
            resumed = os.fstat(fd).st_size > 0
            complete = self._download_into(fd, descriptor, state, cancel, what)
            if not complete and resumed:
                # what was kept from before did not add up (a registry that changed the blob, a
                # damaged disk): once more from the start before calling the blob corrupt
                os.ftruncate(fd, 0)
                complete = self._download_into(fd, descriptor, state, cancel, what)
            if complete:
                return _finish_partial(fd, descriptor)
            os.unlink(_partials() / descriptor.hex)
            raise ImageError(f"{what}: the registry's content does not have digest {descriptor.digest} "
                             f"(size {descriptor.size}); nothing of it was kept", code="IMAGE_DIGEST_MISMATCH")  # fmt: skip

    def _download_into(self, fd: int, descriptor: _Descriptor, state: _LayerState, cancel: threading.Event,
                       what: str) -> bool:  # fmt: skip
        """Fetch what the partial file lacks; True when it then has ``descriptor``'s content."""
        size = descriptor.size
        offset = os.fstat(fd).st_size
        if offset > size:
            os.ftruncate(fd, 0)
            offset = 0
        state.done = offset
        if offset < size:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            with self.get(f"blobs/{descriptor.digest}", headers, what) as response:
                if response.status == 206 and offset:
                    told = response.header("Content-Range") or ""
                    if not told.replace(" ", "").startswith(f"bytes{offset}-"):
                        raise ImageError(f"{what}: the registry answered range {_clean(told, 80)!r} for bytes "
                                         f"{offset}-", code="IMAGE_PULL_FAILED", retryable=True)  # fmt: skip
                elif response.status == 200:
                    os.ftruncate(fd, 0)  # the whole blob after all
                    offset = state.done = 0
                elif response.status == 416 and offset:
                    os.ftruncate(fd, 0)  # the partial file is not a prefix of this blob
                    return False
                else:
                    raise self.fail(response, what)
                length = response.header("Content-Length")
                if length and length.isdigit() and int(length) != size - offset:
                    return False
                os.lseek(fd, offset, os.SEEK_SET)
                while True:
                    if cancel.is_set():
                        raise _Cancelled()
                    with _network(self.registry, response.url):  # only the reads: a full disk is no network error
                        chunk = response.read(min(CHUNK, size - state.done + 1))
                    if not chunk:
                        break
                    if state.done + len(chunk) > size:
                        return False  # longer than the manifest says: never written
                    _write_all(fd, chunk)
                    state.done += len(chunk)
                if state.done < size:  # http.client reads a cut connection as a short body
                    raise ImageError(f"{what}: registry {self.registry} broke off after {state.done} of {size} "
                                     "bytes; pull again to resume", code="IMAGE_PULL_FAILED", retryable=True)  # fmt: skip
        return _hash_matches(fd, descriptor)


def _hash_matches(fd: int, descriptor: _Descriptor) -> bool:
    return os.fstat(fd).st_size == descriptor.size and _hash_prefix(fd, descriptor.size).hexdigest() == descriptor.hex


# --- a pull -----------------------------------------------------------------------------------


class _Source(Protocol):
    """Where a pull's content comes from: a registry, or a local layout or archive."""

    name: str

    def fetch_document(self, descriptor: _Descriptor, what: str) -> bytes: ...

    def fetch_layer(self, descriptor: _Descriptor, state: _LayerState, cancel: threading.Event, what: str) -> None: ...


def _resolve(source: _Source, data: bytes, content_type: str, digest: str, wanted: _Platform,
             what: str) -> tuple[str | None, bytes, str]:  # fmt: skip
    """From the document a reference names down to the platform's manifest:
    (top index digest or None, manifest bytes, manifest digest). Indexes are cached too."""
    index_digest = None
    for _depth in range(MAX_NESTING):
        document = _json(data, what)
        if _document_type(document, content_type, what) in MANIFEST_TYPES:
            return index_digest, data, digest
        _store_document(digest, data)
        index_digest = index_digest or digest
        chosen = _select_platform(_index_entries(document, what), wanted, what)
        if chosen.size > MAX_DOCUMENT:
            raise _too_large(f"{what}: manifest {chosen.digest}", chosen.size, MAX_DOCUMENT)
        data = _read_cached(chosen.digest) or source.fetch_document(chosen, f"{what} ({chosen.platform or 'manifest'})")
        content_type, digest = chosen.media_type, chosen.digest
    raise _invalid(what, f"indexes nested more than {MAX_NESTING} deep")


def _fetch_layers(source: _Source, layers: Sequence[_Descriptor], progress: Progress | None, what: str,
                  parallel: int) -> None:  # fmt: skip
    """The layers not cached yet, ``parallel`` at a time on worker threads; progress is reported
    from this thread. The first failure (in layer order) stops the others and is raised."""
    report = _Progress(progress, layers)
    missing = []
    for state in report.states:
        if _present(state.descriptor):
            state.done = state.descriptor.size
        else:
            missing.append(state)
    cancel = threading.Event()
    if parallel <= 1:
        for state in missing:
            source.fetch_layer(state.descriptor, state, cancel, f"{what}: layer {state.descriptor.digest}")
            report.tick()
        report.tick(force=True)
        return
    with concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="machinen-oci-pull") as pool:
        futures = [
            pool.submit(source.fetch_layer, s.descriptor, s, cancel, f"{what}: layer {s.descriptor.digest}")
            for s in missing
        ]
        try:
            pending = set(futures)
            while pending:
                finished, pending = concurrent.futures.wait(
                    pending, timeout=PROGRESS_INTERVAL, return_when=concurrent.futures.FIRST_EXCEPTION
                )
                report.tick()
                if any(f.exception() is not None for f in finished):
                    break
        finally:
            cancel.set()
            for future in futures:
                future.cancel()
    report.tick(force=True)
    for future in futures:  # the first failure in layer order; _Cancelled only follows one
        error = None if future.cancelled() else future.exception()
        if error is not None and not isinstance(error, _Cancelled):
            raise error


def _complete(source: _Source, key: str, wanted: _Platform, explicit: bool, index_digest: str | None,
              manifest_bytes: bytes, manifest_digest: str, progress: Progress | None, max_layer_size: int,
              parallel: int) -> PulledImage:  # fmt: skip
    what = key
    manifest = _parse_manifest(manifest_bytes, what)
    if manifest.config.size > MAX_DOCUMENT:
        raise _too_large(f"{what}: config", manifest.config.size, MAX_DOCUMENT)
    for layer in manifest.layers:
        if layer.size > max_layer_size:
            raise _too_large(f"{what}: layer {layer.digest}", layer.size, max_layer_size)
    config_bytes = _read_cached(manifest.config.digest)
    if config_bytes is None:
        config_bytes = source.fetch_document(manifest.config, f"{what}: config {manifest.config.digest}")
    _check_config(_json(config_bytes, what), manifest, wanted, explicit and index_digest is None, what)
    _store_document(manifest.config.digest, config_bytes)
    _fetch_layers(source, manifest.layers, progress, what, parallel)
    _store_document(manifest_digest, manifest_bytes)
    _record(key, wanted, index_digest, manifest_digest, len(manifest_bytes), manifest)
    return _image(key, wanted, manifest_digest)


class _RegistrySource:
    def __init__(self, session: _Registry) -> None:
        self.session = session
        self.name = session.registry

    def fetch_document(self, descriptor: _Descriptor, what: str) -> bytes:
        if descriptor.media_type in INDEX_TYPES | MANIFEST_TYPES:
            return self.session.manifest(descriptor.digest, descriptor, what)[0]
        return self.session.document(descriptor, what)

    def fetch_layer(self, descriptor: _Descriptor, state: _LayerState, cancel: threading.Event, what: str) -> None:
        self.session.download(descriptor, state, cancel, what)


def pull(
    reference: str,
    *,
    policy: str = "missing",
    credentials: tuple[str, str] | None = None,
    insecure: Sequence[str] = (),
    progress: Progress | None = None,
    platform: str | None = None,
    max_layer_size: int = MAX_LAYER,
) -> PulledImage:
    """The image ``reference`` names, with every blob verified in the cache.

    ``reference``: a registry image (``python:3.12-slim``, ``localhost:5000/x:1``,
    ``host/team/agent@sha256:...``; ``docker://`` may precede it), ``oci:PATH[:TAG]`` or
    ``docker-archive:PATH[:NAME]``. ``policy``: "missing" returns a cached reference without
    contacting the registry (a digest whose manifest is cached likewise), "always" asks the
    registry what the tag names now (cached blobs are not fetched again), "never" uses only the
    cache. Local sources are read every time (blobs already cached are not copied again).
    ``credentials``: (user, password), else ``docker_config_credentials``. ``insecure``:
    registries reached over plain HTTP (loopback ones always are). ``platform``:
    "os/arch[/variant]", default ``default_platform()``. ``progress`` is called on this thread."""
    if policy not in ("missing", "always", "never"):
        raise ValueError(f"policy must be 'missing', 'always' or 'never', not {policy!r}")
    if credentials is not None and not (
        isinstance(credentials, tuple) and len(credentials) == 2 and all(isinstance(c, str) for c in credentials)
    ):  # fmt: skip
        raise ValueError("credentials must be a (user, password) tuple of strings")
    if isinstance(insecure, str):
        insecure = (insecure,)
    explicit = platform is not None
    wanted = _parse_platform(platform if platform is not None else default_platform())
    local = _local_source(reference)
    with _pull_lock():
        if local is not None:
            return _pull_local(local, wanted, explicit, progress, max_layer_size)
        parsed = parse_reference(reference.removeprefix("docker://"))
        key = str(parsed)
        if policy != "always":
            cached = _cached(parsed, wanted, explicit)
            if cached is not None:
                return cached
            if policy == "never":
                raise ImageError(f"{key} ({wanted}) is not in the cache, and the pull policy is 'never'",
                                 code="IMAGE_NOT_FOUND")  # fmt: skip
        session = _Registry(parsed, credentials, insecure)
        data, content_type, digest = session.manifest(parsed.target, None, key)
        source = _RegistrySource(session)
        index_digest, manifest_bytes, manifest_digest = _resolve(source, data, content_type, digest, wanted, key)
        return _complete(source, key, wanted, explicit, index_digest, manifest_bytes, manifest_digest, progress,
                         max_layer_size, PARALLEL_LAYERS)  # fmt: skip


# --- local sources ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Local:
    kind: str  # "oci" or "docker-archive"
    path: Path
    name: str | None  # the tag (oci) or image name (docker-archive) chosen, if any

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" + (f":{self.name}" if self.name else "")


def _local_source(reference: str) -> _Local | None:
    """``oci:PATH[:TAG]`` or ``docker-archive:PATH[:NAME]``; the path is the longest prefix that
    exists (paths may contain ':'). A Docker Hub image named ``oci`` is ``docker.io/library/oci``."""
    prefix = next((p for p in LOCAL_PREFIXES if reference.startswith(p)), None)
    if prefix is None:
        return None
    kind, rest = prefix[:-1], reference[len(prefix) :]
    candidates = [(rest, None)] + [(rest[:i], rest[i + 1 :]) for i in range(len(rest) - 1, 0, -1) if rest[i] == ":"]
    for path, name in candidates:
        if path and (Path(path).is_dir() if kind == "oci" else Path(path).is_file()):
            return _Local(kind, Path(path).resolve(), name or None)
    raise ImageError(f"{reference}: {rest or 'nothing'} is not an existing "
                     f"{'OCI layout directory' if kind == 'oci' else 'docker save archive'}",
                     code="IMAGE_NOT_FOUND")  # fmt: skip


class _Files(Protocol):
    """The files of a layout: a directory or a tar archive."""

    def open(self, name: str) -> IO[bytes] | None: ...


class _DirectoryFiles:
    """A layout directory the caller named: its names are fixed or ``blobs/sha256/<hex>``, and
    only regular files are read (a FIFO put there would block)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, name: str) -> IO[bytes] | None:
        try:
            fd = os.open(self.root / name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")


class _TarFiles:
    def __init__(self, archive: tarfile.TarFile) -> None:
        self.archive = archive
        self.members = {}
        for member in archive.getmembers():
            self.members.setdefault(member.name.removeprefix("./").lstrip("/"), member)

    def open(self, name: str) -> IO[bytes] | None:
        member = self.members.get(name)
        if member is None or not (member.isfile() or member.issym() or member.islnk()):
            return None
        try:
            return self.archive.extractfile(member)
        except KeyError:  # a link to nothing in the archive
            return None


def _has(files: _Files, name: str) -> bool:
    file = files.open(name)
    if file is None:
        return False
    file.close()
    return True


def _read_file(files: _Files, name: str, what: str, limit: int = MAX_DOCUMENT) -> bytes:
    file = files.open(name)
    if file is None:
        raise ImageError(f"{what}: {name} is missing", code="IMAGE_MANIFEST_INVALID")
    with file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise _too_large(f"{what}: {name}", None, limit)
    return data


class _LayoutSource:
    """An OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``)."""

    def __init__(self, files: _Files, name: str) -> None:
        self.files, self.name = files, name

    def blob(self, descriptor: _Descriptor) -> IO[bytes]:
        file = self.files.open(f"blobs/sha256/{descriptor.hex}")
        if file is None:
            raise ImageError(f"{self.name}: blob {descriptor.digest} is missing", code="IMAGE_NOT_FOUND")
        return file

    def fetch_document(self, descriptor: _Descriptor, what: str) -> bytes:
        with self.blob(descriptor) as file:
            data = file.read(MAX_DOCUMENT + 1)
        if len(data) > MAX_DOCUMENT:
            raise _too_large(what, None, MAX_DOCUMENT)
        return _verified(data, descriptor, what)

    def fetch_layer(self, descriptor: _Descriptor, state: _LayerState, cancel: threading.Event, what: str) -> None:
        with self.blob(descriptor) as file:
            _copy_in(file, descriptor, state, what)


def _copy_in(file: IO[bytes], descriptor: _Descriptor, state: _LayerState, what: str) -> None:
    """A local blob copied into the cache while hashed; kept only if its digest is right."""
    with _locked_partial(descriptor) as fd:
        if fd is None:
            state.done = descriptor.size
            return
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        digest, state.done = hashlib.sha256(), 0
        while chunk := file.read(min(CHUNK, descriptor.size - state.done + 1)):
            if state.done + len(chunk) > descriptor.size:
                break
            _write_all(fd, chunk)
            digest.update(chunk)
            state.done += len(chunk)
        else:
            if state.done == descriptor.size and digest.hexdigest() == descriptor.hex:
                return _finish_partial(fd, descriptor)
        os.unlink(_partials() / descriptor.hex)
        raise ImageError(f"{what}: the content does not have digest {descriptor.digest} (size {descriptor.size}); "
                         "nothing of it was kept", code="IMAGE_DIGEST_MISMATCH")  # fmt: skip


def _store_unknown(
    file: IO[bytes], limit: int, what: str, check: Callable[[str, bytes], None]
) -> tuple[str, int, bytes]:
    """A blob whose digest nobody told us (the old ``docker save`` format) into the cache:
    (digest, size, its first bytes). ``check(digest, first bytes)`` may refuse it first."""
    temporary = _partials() / f"import.{os.getpid()}.{threading.get_ident()}.{time.monotonic_ns()}"
    fd = paths.create_file(temporary)
    try:
        digest, size, head = hashlib.sha256(), 0, b""
        while chunk := file.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise _too_large(what, None, limit)
            head = head or chunk[:8]
            _write_all(fd, chunk)
            digest.update(chunk)
        check(f"sha256:{digest.hexdigest()}", head)
        final = _blobs() / digest.hexdigest()
        if not final.exists():
            os.fsync(fd)
            os.fchmod(fd, 0o444)
            os.rename(temporary, final)
        return f"sha256:{digest.hexdigest()}", size, head
    finally:
        os.close(fd)
        temporary.unlink(missing_ok=True)


def _layer_type(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return OCI_LAYER + "+gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return OCI_LAYER + "+zstd"
    return OCI_LAYER


def _name_matches(candidate: str, wanted: str) -> bool:
    if candidate == wanted:
        return True
    with contextlib.suppress(ImageError):
        return str(parse_reference(candidate)) == str(parse_reference(wanted))
    return False


def _choose_in_layout(files: _Files, source: _Local, wanted: _Platform) -> tuple[bytes, str, str]:
    """The document a layout's ``index.json`` names for ``source.name``: (bytes, media type, digest).
    With no name, the only image in it, or index.json itself when it is a platform index."""
    what = str(source)
    index_bytes = _read_file(files, "index.json", what)
    index = _json(index_bytes, f"{what}: index.json")
    entries = _index_entries(index, f"{what}: index.json")

    def names(entry: _Descriptor) -> list[str]:
        return [n for n in (entry.annotations.get(REF_NAME), entry.annotations.get(CONTAINERD_NAME)) if n]

    if source.name is not None:
        chosen = [e for e in entries if any(_name_matches(n, source.name) for n in names(e))]
        if not chosen:
            known = sorted({n for e in entries for n in names(e)})
            raise ImageError(f"{what}: no image named {source.name!r} in the layout; it has: "
                             f"{', '.join(known) or 'no named images'}", code="IMAGE_NOT_FOUND")  # fmt: skip
        entries = chosen
    if len(entries) == 1:
        entry = entries[0]
    elif entries and all(e.platform is not None for e in entries):
        entry = _select_platform(entries, wanted, what)  # index.json is the multi-platform index
    else:
        known = sorted({n for e in entries for n in names(e)})
        raise ImageError(f"{what}: the layout holds {len(entries)} images; name one "
                         f"({', '.join(known) or 'they have no names'})", code="IMAGE_NOT_FOUND")  # fmt: skip
    layout = _LayoutSource(files, what)
    if entry.size > MAX_DOCUMENT:
        raise _too_large(f"{what}: manifest {entry.digest}", entry.size, MAX_DOCUMENT)
    return layout.fetch_document(entry, what), entry.media_type, entry.digest


def _pull_local(source: _Local, wanted: _Platform, explicit: bool, progress: Progress | None,
                max_layer_size: int) -> PulledImage:  # fmt: skip
    key = str(source)
    if source.kind == "oci":
        files: _Files = _DirectoryFiles(source.path)
        if not _has(files, "oci-layout"):
            raise ImageError(f"{key}: not an OCI image layout (no oci-layout file)", code="IMAGE_NOT_FOUND")
        return _pull_layout(files, source, wanted, explicit, progress, max_layer_size)
    try:
        with tarfile.open(source.path, "r:*") as archive:
            files = _TarFiles(archive)
            if _has(files, "index.json") and _has(files, "oci-layout"):
                return _pull_layout(files, source, wanted, explicit, progress, max_layer_size)
            return _pull_legacy_archive(files, source, wanted, explicit, progress, max_layer_size)
    except (tarfile.TarError, EOFError) as error:
        raise ImageError(f"{key}: not a tar archive, or a damaged one ({_clean(str(error), 200)})",
                         code="IMAGE_MANIFEST_INVALID") from None  # fmt: skip


def _pull_layout(files: _Files, source: _Local, wanted: _Platform, explicit: bool, progress: Progress | None,
                 max_layer_size: int) -> PulledImage:  # fmt: skip
    key = str(source)
    layout = _LayoutSource(files, key)
    data, media_type, digest = _choose_in_layout(files, source, wanted)
    index_digest, manifest_bytes, manifest_digest = _resolve(layout, data, media_type, digest, wanted, key)
    # one file at a time: a tar archive is read by one reader
    return _complete(layout, key, wanted, explicit, index_digest, manifest_bytes, manifest_digest, progress,
                     max_layer_size, 1)  # fmt: skip


def _pull_legacy_archive(files: _TarFiles, source: _Local, wanted: _Platform, explicit: bool,
                         progress: Progress | None, max_layer_size: int) -> PulledImage:  # fmt: skip
    """The old ``docker save`` format: ``manifest.json`` names a config file and layer tars,
    which carry no digests; they are hashed as they are stored, each uncompressed layer is
    checked against the config's ``diff_ids``, and an OCI manifest is written for them."""
    key = str(source)
    try:
        entries = json.loads(_read_file(files, "manifest.json", key))
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError("not a list of images")
    except (ValueError, UnicodeDecodeError) as error:
        raise _invalid(key, f"manifest.json is not a docker save manifest ({error})") from None
    tags = [[t for t in e.get("RepoTags") or [] if isinstance(t, str)] for e in entries]
    if source.name is not None:
        entries = [e for e, names in zip(entries, tags) if any(_name_matches(n, source.name) for n in names)]
    if len(entries) != 1:
        known = sorted({t for names in tags for t in names})
        raise ImageError(f"{key}: the archive holds {len(entries)} images{' by that name' if source.name else ''}; "
                         f"name one ({', '.join(known) or 'they have no names'})", code="IMAGE_NOT_FOUND")  # fmt: skip
    entry = entries[0]
    config_name, layer_names = entry.get("Config"), entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list) or not all(
        isinstance(n, str) for n in layer_names
    ):  # fmt: skip
        raise _invalid(key, "manifest.json lacks Config or Layers")
    config_bytes = _read_file(files, config_name.removeprefix("./"), key)
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    config = _json(config_bytes, f"{key}: config")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config.get("rootfs"), dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layer_names):
        raise _invalid(key, "the config's rootfs.diff_ids do not list the archive's layers")
    _store_document(config_digest, config_bytes)
    layers = []
    for name, diff_id in zip(layer_names, diff_ids):

        def check(digest: str, head: bytes, name: str = name, diff_id: object = diff_id) -> None:
            if _layer_type(head) == OCI_LAYER and digest != diff_id:  # an uncompressed layer is its diff
                raise ImageError(f"{key}: layer {name} has digest {digest}, but the config says "
                                 f"{_clean(str(diff_id), 80)}; nothing of it was kept", code="IMAGE_DIGEST_MISMATCH")  # fmt: skip

        file = files.open(name.removeprefix("./"))
        if file is None:
            raise _invalid(key, f"layer {name} is missing from the archive")
        with file:
            digest, size, head = _store_unknown(file, max_layer_size, f"{key}: layer {name}", check)
        layers.append({"mediaType": _layer_type(head), "digest": digest, "size": size})
        if progress is not None:
            progress(f"{digest.split(':', 1)[1][:12]}: {size}/{size} bytes")
    manifest_bytes = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
            "layers": layers,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    manifest = _parse_manifest(manifest_bytes, key)
    _check_config(config, manifest, wanted, explicit, key)
    _store_document(manifest_digest, manifest_bytes)
    _record(key, wanted, None, manifest_digest, len(manifest_bytes), manifest)
    return _image(key, wanted, manifest_digest)


# --- listing and collecting -------------------------------------------------------------------


def list_images() -> list[ImageRecord]:
    """The cached references, most recently used first."""
    records = _read_records()
    images = [
        ImageRecord(
            reference=r["reference"],
            platform=r["platform"],
            manifest_digest=r["manifest_digest"],
            config_digest=r["config_digest"],
            layers=tuple(r["layers"]),
            size=int(r.get("size", 0)),
            last_used=float(r.get("last_used", 0.0)),
            index_digest=r.get("index_digest"),
        )
        for r in records
    ]
    return sorted(images, key=lambda image: image.last_used, reverse=True)


def remove(reference: str, platform: str | None = None) -> int:
    """Forget a cached reference (every platform, or one): how many records went. The blobs
    stay until ``gc``."""
    if reference.startswith(LOCAL_PREFIXES):
        keys = {reference}
        with contextlib.suppress(ImageError):  # the file may be gone by now
            keys.add(str(_local_source(reference)))
    else:
        keys = {str(parse_reference(reference.removeprefix("docker://")))}
    only = str(_parse_platform(platform)) if platform is not None else None
    with _index_lock():
        records = _read_records()
        kept = [r for r in records if not (r["reference"] in keys and only in (None, r["platform"]))]
        if len(kept) != len(records):
            _write_records(kept)
    return len(records) - len(kept)


def gc(keep: Callable[[str], bool] | None = None) -> int:
    """Drop the references ``keep`` says no to (with None, every reference stays), then every
    blob no remaining reference uses, and leftover partial downloads: the bytes freed. Waits
    for running pulls to end first."""
    with _gc_lock(), _index_lock():
        records = _read_records()
        if keep is not None:
            kept = [r for r in records if keep(r["reference"])]
            if len(kept) != len(records):
                _write_records(kept)
            records = kept
        used = set()
        for record in records:
            digests = [record["manifest_digest"], record["config_digest"], *record["layers"]]
            if record.get("index_digest"):
                digests.append(record["index_digest"])
            used.update(d.split(":", 1)[1] for d in digests if isinstance(d, str))
        freed = 0
        for directory, keep_used in ((_blobs(), True), (_partials(), False)):
            for entry in os.scandir(directory):
                if keep_used and entry.name in used:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    size = entry.stat(follow_symlinks=False).st_size
                    os.unlink(entry.path)
                    freed += size
        return freed
