"""Real OCI registries on loopback for the image-pull tests, and what feeds them.

- ``Registry``: Debian's ``docker-registry`` (CNCF distribution 2.8) serving a temporary
  directory on 127.0.0.1, anonymous, with ``htpasswd`` (bcrypt, made by apache2-utils'
  ``htpasswd -Bbn``) or ``token`` auth, optionally over TLS.
- ``TokenServer``: the token service of the Docker token protocol, issuing JWTs signed with an
  RSA key whose self-signed certificate is the registry's ``rootcertbundle``.
- ``push_image``: pushes an image (or a multi-platform index of it) with the registry HTTP API
  (``POST /v2/<name>/blobs/uploads/``, ``PUT ?digest=``, ``PUT /v2/<name>/manifests/<tag>``),
  building OCI or Docker schema 2 manifests in Python; no docker anywhere.
- ``RecordingProxy``: a TCP front of a registry that records each request, and can cut a
  response after N bytes or answer blob requests with a redirect; ``ForwardProxy``: an HTTP
  proxy (CONNECT and absolute-form) that sends every connection to one loopback port whatever
  host it names; ``BlobStorage``: the "storage elsewhere" a redirect leads to.
- ``tar_layer``, ``image_config``, ``write_oci_layout``, ``write_docker_archive``: images on disk.

Nothing here connects anywhere but 127.0.0.1.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import http.server
import io
import json
import re
import socket
import ssl
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from net import free_port

REGISTRY_BINARY = "/usr/bin/docker-registry"
HTPASSWD = "/usr/bin/htpasswd"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


# --- keys and certificates --------------------------------------------------------------------


@dataclass
class Certificate:
    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    cert_path: Path
    key_path: Path


def make_certificate(
    directory: Path, name: str, *, issuer: Certificate | None = None, dns: Sequence[str] = (), ips: Sequence[str] = ()
) -> Certificate:
    """A certificate for ``name``: a CA of its own (self-signed) without ``issuer``, else a
    server certificate for ``dns``/``ips`` signed by it."""
    import ipaddress

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        names = [x509.DNSName(n) for n in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
        )
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return Certificate(key, cert, cert_path, key_path)


# --- the registry -----------------------------------------------------------------------------


def htpasswd_auth(directory: Path, users: dict[str, str]) -> dict:
    """The registry's ``auth`` section for ``htpasswd`` with bcrypt entries for ``users``."""
    lines = [
        subprocess.run([HTPASSWD, "-Bbn", user, password], capture_output=True, text=True, check=True).stdout.strip()
        for user, password in users.items()
    ]
    path = directory / "htpasswd"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return {"htpasswd": {"realm": "machinen-test", "path": str(path)}}


class Registry:
    """``docker-registry serve`` on 127.0.0.1:<free port>, storing under ``root/storage``."""

    def __init__(
        self,
        root: Path,
        *,
        auth: dict | None = None,
        tls: Certificate | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.storage = root / "storage"
        self.auth, self.tls, self.credentials = auth, tls, credentials
        self.port = free_port()
        self.log_path = root / "registry.log"
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def host(self) -> str:
        """How a reference names it: ``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def config(self) -> dict:
        http_section: dict = {"addr": self.host, "secret": "machinen-test-secret"}
        if self.tls is not None:
            http_section["tls"] = {"certificate": str(self.tls.cert_path), "key": str(self.tls.key_path)}
        config = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http_section,
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.auth is not None:
            config["auth"] = self.auth
        return config

    def start(self) -> None:
        path = self.root / "config.yml"
        path.write_text(json.dumps(self.config(), indent=1))  # YAML is a superset of JSON
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(path)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"docker-registry did not start:\n{self.log_path.read_text()[-3000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def blob_file(self, digest: str) -> Path:
        """Where the registry's filesystem driver keeps a blob's bytes (manifests included)."""
        hex_digest = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"

    def client(self, ssl_context: ssl.SSLContext | None = None) -> PushClient:
        return PushClient(self.url, self.credentials, ssl_context)


# --- the token service ------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The Docker token protocol's authorization service on 127.0.0.1: ``GET /token?service=
    &scope=`` with optional basic credentials -> ``{"token": <JWT>}`` (``field`` may be set to
    "access_token"). Wrong credentials: 401. No credentials: a token granting nothing, unless
    ``anonymous_pull``. ``requests`` records what was asked."""

    def __init__(self, directory: Path, users: dict[str, str], *, anonymous_pull: bool = False) -> None:
        self.users = users
        self.anonymous_pull = anonymous_pull
        self.field = "token"
        self.issuer, self.service = "machinen-test-issuer", "machinen-test-registry"
        self.signer = make_certificate(directory, "token-signer")
        self.requests: list[dict] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.handle(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/token"

    def registry_auth(self) -> dict:
        """The registry's ``auth`` section that trusts this service."""
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.signer.cert_path),
            }
        }

    def handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(request.path)
        query = urllib.parse.parse_qs(url.query)
        authorization = request.headers.get("Authorization")
        user = None
        if authorization:
            try:
                user, _, password = base64.b64decode(authorization.split(" ", 1)[1]).decode().partition(":")
            except (ValueError, IndexError):
                password = None
            if not authorization.startswith("Basic ") or self.users.get(user) != password:
                self.requests.append({"query": query, "user": user, "granted": None})
                body = json.dumps({"details": "incorrect username or password"}).encode()
                request.send_response(401)
                request.send_header("Content-Type", "application/json")
                request.send_header("Content-Length", str(len(body)))
                request.end_headers()
                request.wfile.write(body)
                return
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            if user is not None:
                granted = [a for a in actions.split(",") if a in ("pull", "push")]
            else:
                granted = ["pull"] if self.anonymous_pull and "pull" in actions.split(",") else []
            access.append({"type": "repository", "name": name, "actions": granted})
        self.requests.append({"query": query, "user": user, "granted": access})
        body = json.dumps({self.field: self.issue(user or "", access), "expires_in": 300}).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def issue(self, subject: str, access: list[dict]) -> str:
        """A JWT as distribution's token verifier reads it: RS256, the signer's certificate in
        ``x5c`` (verified against the ``rootcertbundle``), issuer and audience as configured."""
        now = int(time.time())
        der = self.signer.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.signer.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


# --- pushing ----------------------------------------------------------------------------------


class PushClient:
    """The registry HTTP API as ``docker push`` uses it, answering basic and bearer challenges."""

    def __init__(
        self, base_url: str, credentials: tuple[str, str] | None = None, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.credentials = credentials
        handlers: list = [urllib.request.ProxyHandler({})]  # never through a proxy from the environment
        if ssl_context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
        self.opener = urllib.request.build_opener(*handlers)
        self.authorization: str | None = None

    def _basic(self) -> str:
        assert self.credentials is not None, "this registry needs credentials to push"
        return "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()

    def request(
        self, method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        url = urllib.parse.urljoin(self.base_url + "/", url)
        for attempt in range(2):
            sent = dict(headers or {})
            if self.authorization:
                sent["Authorization"] = self.authorization
            request = urllib.request.Request(url, data=body, method=method, headers=sent)
            try:
                with self.opener.open(request, timeout=30) as response:
                    return response.status, dict(response.headers), response.read()
            except urllib.error.HTTPError as error:
                if error.code == 401 and attempt == 0:
                    self.authorization = self._answer(error.headers.get("WWW-Authenticate", ""))
                    error.close()
                    continue
                return error.code, dict(error.headers), error.read()
        raise AssertionError("unreachable")

    def _answer(self, challenge: str) -> str:
        scheme, _, rest = challenge.partition(" ")
        if scheme.lower() == "basic":
            return self._basic()
        params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        query = urllib.parse.urlencode({"service": params["service"], "scope": params.get("scope", "")})
        request = urllib.request.Request(f"{params['realm']}?{query}", headers={"Authorization": self._basic()})
        with self.opener.open(request, timeout=30) as response:
            return "Bearer " + json.loads(response.read())["token"]

    def push_blob(self, name: str, data: bytes) -> str:
        digest = sha256(data)
        status, _, _ = self.request("HEAD", f"/v2/{name}/blobs/{digest}")
        if status == 200:
            return digest
        status, headers, body = self.request("POST", f"/v2/{name}/blobs/uploads/", b"")
        assert status == 202, (status, body)
        location = urllib.parse.urljoin(self.base_url + "/", headers["Location"])
        location += ("&" if "?" in location else "?") + urllib.parse.urlencode({"digest": digest})
        status, _, body = self.request("PUT", location, data, {"Content-Type": "application/octet-stream"})
        assert status == 201, (status, body)
        return digest

    def push_manifest(self, name: str, reference: str, document: bytes, media_type: str) -> str:
        status, headers, body = self.request(
            "PUT", f"/v2/{name}/manifests/{reference}", document, {"Content-Type": media_type}
        )
        assert status == 201, (status, body)
        assert headers.get("Docker-Content-Digest") == sha256(document)
        return sha256(document)


# --- images -----------------------------------------------------------------------------------


def tar_layer(files: dict[str, bytes], *, compress: bool = True) -> bytes:
    """A layer tar of ``files`` (deterministic), gzip-compressed unless ``compress`` is False."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o644, 0
            archive.addfile(info, io.BytesIO(content))
    data = buffer.getvalue()
    return gzip.compress(data, mtime=0) if compress else data


def diff_id(layer: bytes) -> str:
    return sha256(gzip.decompress(layer) if layer[:2] == b"\x1f\x8b" else layer)


def image_config(
    layers: Sequence[bytes],
    *,
    platform: str = "linux/amd64",
    env: Sequence[str] = ("PATH=/usr/bin:/bin",),
    cmd: Sequence[str] | None = ("sh",),
    entrypoint: Sequence[str] | None = None,
    workdir: str = "",
    user: str = "",
) -> dict:
    os_name, arch, *variant = platform.split("/")
    config = {
        "architecture": arch,
        "os": os_name,
        "config": {
            "Env": list(env),
            "Cmd": list(cmd) if cmd is not None else None,
            "Entrypoint": list(entrypoint) if entrypoint is not None else None,
            "WorkingDir": workdir,
            "User": user,
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id(layer) for layer in layers]},
        "history": [{"created_by": f"layer {n}"} for n in range(len(layers))],
    }
    if variant:
        config["variant"] = variant[0]
    return config


def _layer_media_type(layer: bytes, media: str) -> str:
    compressed = layer[:2] == b"\x1f\x8b"
    if media == "docker":
        return "application/vnd.docker.image.rootfs.diff.tar" + (".gzip" if compressed else "")
    return "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compressed else "")


def manifest_for(config_bytes: bytes, layers: Sequence[bytes], media: str = "oci") -> tuple[bytes, str]:
    """(manifest bytes, media type) for a config and its layers."""
    media_type = DOCKER_MANIFEST if media == "docker" else OCI_MANIFEST
    document = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": DOCKER_CONFIG if media == "docker" else OCI_CONFIG,
            "digest": sha256(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {"mediaType": _layer_media_type(layer, media), "digest": sha256(layer), "size": len(layer)}
            for layer in layers
        ],
    }
    return canonical(document), media_type


def _platform_object(platform: str) -> dict:
    os_name, arch, *variant = platform.split("/")
    return {"os": os_name, "architecture": arch, **({"variant": variant[0]} if variant else {})}


@dataclass
class Pushed:
    digest: str  # what the tag names: the index, or the only manifest
    manifests: dict[str, str] = field(default_factory=dict)  # platform -> manifest digest
    configs: dict[str, dict] = field(default_factory=dict)  # platform -> config
    layers: list[str] = field(default_factory=list)


def push_image(
    registry: Registry | str,
    name: str,
    tag: str,
    layers: Sequence[bytes],
    config: dict,
    *,
    platform: str = "linux/amd64",
    index_of: Sequence[str] | None = None,
    media: str = "oci",
    attestation: bool = False,
    credentials: tuple[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Pushed:
    """Push an image to ``registry`` (a ``Registry`` or a base URL) under ``name:tag``.

    With ``index_of`` (platforms such as "linux/arm64/v8"), one manifest per platform (its
    config says that platform) and an index of them under the tag, plus, with ``attestation``,
    an "unknown/unknown" attestation manifest as buildx adds. ``media``: "oci" or "docker"
    (schema 2 manifests and a manifest list)."""
    client = (
        registry.client(ssl_context)
        if isinstance(registry, Registry)
        else PushClient(registry, credentials, ssl_context)
    )
    pushed = Pushed(digest="", layers=[client.push_blob(name, layer) for layer in layers])
    platforms = list(index_of) if index_of else [platform]
    entries = []
    for each in platforms:
        platform_config = {**config, **_platform_object(each)}
        if len(each.split("/")) == 2:
            platform_config.pop("variant", None)
        config_bytes = canonical(platform_config)
        client.push_blob(name, config_bytes)
        manifest, media_type = manifest_for(config_bytes, layers, media)
        digest = client.push_manifest(name, tag if not index_of else sha256(manifest), manifest, media_type)
        pushed.manifests[each], pushed.configs[each] = digest, platform_config
        entries.append(
            {"mediaType": media_type, "digest": digest, "size": len(manifest), "platform": _platform_object(each)}
        )
    if not index_of:
        pushed.digest = pushed.manifests[platform]
        return pushed
    if attestation:
        statement = canonical({"_type": "https://in-toto.io/Statement/v0.1", "subject": []})
        client.push_blob(name, statement)
        empty = b"{}"
        client.push_blob(name, empty)
        document = canonical(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": sha256(empty), "size": 2},
                "layers": [
                    {"mediaType": "application/vnd.in-toto+json", "digest": sha256(statement), "size": len(statement)}
                ],
            }
        )
        client.push_manifest(name, sha256(document), document, OCI_MANIFEST)
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": sha256(document),
                "size": len(document),
                "platform": {"os": "unknown", "architecture": "unknown"},
                "annotations": {
                    "vnd.docker.reference.type": "attestation-manifest",
                    "vnd.docker.reference.digest": entries[0]["digest"],
                },
            }
        )
    index_type = DOCKER_LIST if media == "docker" else OCI_INDEX
    index = canonical({"schemaVersion": 2, "mediaType": index_type, "manifests": entries})
    pushed.digest = client.push_manifest(name, tag, index, index_type)
    return pushed


def write_oci_layout(root: Path, images: Sequence[tuple[str | None, Sequence[bytes], dict]]) -> dict[str | None, str]:
    """An OCI image layout at ``root`` holding ``images`` (tag or None, layers, config), each
    tag as an ``org.opencontainers.image.ref.name`` annotation: tag -> manifest digest."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = sha256(data)
        (blobs / digest.split(":", 1)[1]).write_bytes(data)
        return digest

    entries, digests = [], {}
    for tag, layers, config in images:
        for layer in layers:
            put(layer)
        config_bytes = canonical(config)
        put(config_bytes)
        manifest, media_type = manifest_for(config_bytes, layers)
        digests[tag] = put(manifest)
        entry = {"mediaType": media_type, "digest": digests[tag], "size": len(manifest)}
        if tag is not None:
            entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
        entries.append(entry)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (root / "index.json").write_bytes(canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}))
    return digests


def write_docker_archive(
    path: Path, layers: Sequence[bytes], config: dict, repo_tags: Sequence[str], *, oci: bool = False
) -> None:
    """What ``docker save`` writes for one image. The old format (``oci=False``): ``manifest.json``,
    ``<config hex>.json``, ``<id>/layer.tar`` for uncompressed ``layers`` (a layer seen before is
    a symlink to the first, as docker makes it), ``repositories``. The newer one (Docker 25+):
    an OCI layout (``oci-layout``, ``index.json`` annotated with the image's names,
    ``blobs/sha256/``) plus a ``manifest.json`` pointing into the blobs."""
    config_bytes = canonical(config)
    members: list[tuple[str, bytes | str]] = []  # name, content or symlink target
    if oci:
        manifest, media_type = manifest_for(config_bytes, layers)
        for blob in (*layers, config_bytes, manifest):
            members.append((f"blobs/sha256/{sha256(blob).split(':', 1)[1]}", blob))
        first = parse_tag(repo_tags[0])
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": media_type,
                    "digest": sha256(manifest),
                    "size": len(manifest),
                    "annotations": {
                        "io.containerd.image.name": first[0],
                        "org.opencontainers.image.ref.name": first[1],
                    },
                }
            ],
        }
        members.append(("index.json", canonical(index)))
        members.append(("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'))
        config_name = f"blobs/sha256/{sha256(config_bytes).split(':', 1)[1]}"
        layer_names = [f"blobs/sha256/{sha256(layer).split(':', 1)[1]}" for layer in layers]
    else:
        config_name = f"{sha256(config_bytes).split(':', 1)[1]}.json"
        members.append((config_name, config_bytes))
        layer_names, seen = [], {}
        for number, layer in enumerate(layers):
            layer_id = hashlib.sha256(f"{number}:{sha256(layer)}".encode()).hexdigest()
            name = f"{layer_id}/layer.tar"
            members.append((f"{layer_id}/VERSION", b"1.0"))
            members.append((f"{layer_id}/json", canonical({"id": layer_id})))
            if sha256(layer) in seen:
                members.append((name, f"../{seen[sha256(layer)]}"))
            else:
                seen[sha256(layer)] = name
                members.append((name, layer))
            layer_names.append(name)
    members.append(
        (
            "manifest.json",
            json.dumps([{"Config": config_name, "RepoTags": list(repo_tags), "Layers": layer_names}]).encode(),
        )
    )
    with tarfile.open(path, "w") as archive:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                archive.addfile(info)
            else:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))


def parse_tag(reference: str) -> tuple[str, str]:
    """``app:1`` -> ("docker.io/library/app:1", "1"), as Docker annotates a saved image."""
    name, _, tag = reference.rpartition(":")
    full = (
        name
        if "/" in name and ("." in name.split("/")[0] or ":" in name.split("/")[0])
        else (f"docker.io/{name}" if "/" in name else f"docker.io/library/{name}")
    )
    return f"{full}:{tag}", tag


# --- proxies ----------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    target: str  # the request target as sent
    headers: dict[str, str]  # lower-case names

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.target).path


def _read_head(connection: socket.socket) -> tuple[bytes, bytes]:
    """An HTTP request head (up to the blank line) and what came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > 1 << 20:
            break
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _parse_head(head: bytes) -> Seen:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = (lines[0].split(" ", 2) + ["", ""])[:3]
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    return Seen(method, target, headers)


def _relay(source: socket.socket, sink: socket.socket, limit: int | None = None) -> None:
    """Copy until EOF (or ``limit`` bytes, then cut both), then close the write side."""
    sent = 0
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            if limit is not None and sent + len(data) >= limit:
                sink.sendall(data[: limit - sent])
                for end in (source, sink):
                    try:
                        end.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            sink.sendall(data)
            sent += len(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class _TcpServer:
    """Accepts connections on 127.0.0.1:<port> and serves each on a thread."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_safely, args=(connection,), daemon=True).start()

    def _serve_safely(self, connection: socket.socket) -> None:
        try:
            self.serve(connection)
        except OSError:
            pass
        finally:
            connection.close()

    def serve(self, connection: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone does not)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


def _pipe(client: socket.socket, upstream: socket.socket, first: bytes, limit: int | None = None) -> None:
    upstream.sendall(first)
    forward = threading.Thread(target=_relay, args=(client, upstream), daemon=True)
    forward.start()
    _relay(upstream, client, limit)
    forward.join(10)
    upstream.close()


class RecordingProxy(_TcpServer):
    """A front of the loopback server at ``target_port`` that records every request (one per
    connection, as the client under test makes them). ``cut_after(suffix, n)``: the next
    request whose path ends with ``suffix`` gets only the first ``n`` bytes of its response,
    then the connection is cut. ``redirect``: path -> a Location to answer 307 with, or None."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.requests: list[Seen] = []
        self.cuts: list[tuple[str, int]] = []
        self.redirect: Callable[[str], str | None] | None = None
        super().__init__()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut_after(self, suffix: str, nbytes: int) -> None:
        self.cuts.append((suffix, nbytes))

    def serve(self, connection: socket.socket) -> None:
        head, rest = _read_head(connection)
        seen = _parse_head(head)
        self.requests.append(seen)
        location = self.redirect(seen.path) if self.redirect else None
        if location is not None:
            connection.sendall(
                f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\n"
                "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            return
        limit = None
        for cut in list(self.cuts):
            if seen.path.endswith(cut[0]):
                self.cuts.remove(cut)
                limit = cut[1]
                break
        with socket.create_connection(("127.0.0.1", self.target_port)) as upstream:
            _pipe(connection, upstream, head + rest, limit)

    def blob_requests(self) -> list[Seen]:
        return [r for r in self.requests if "/blobs/" in r.path]


class ForwardProxy(_TcpServer):
    """An HTTP proxy whose every connection goes to 127.0.0.1:``target_port``, whatever host
    the client names (so a test may use a name like ``registry.test`` that resolves nowhere):
    ``CONNECT host:port`` tunnels, absolute-form requests are passed on in origin form.
    ``seen`` records (method, target)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.seen: list[tuple[str, str]] = []
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve(self, connection: socket.socket) -> None:
        head, rest = _read_head(connection)
        seen = _parse_head(head)
        self.seen.append((seen.method, seen.target))
        with socket.create_connection(("127.0.0.1", self.target_port)) as upstream:
            if seen.method == "CONNECT":
                connection.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                _pipe(connection, upstream, rest)
                return
            parts = urllib.parse.urlsplit(seen.target)
            origin_form = urllib.parse.urlunsplit(("", "", parts.path, parts.query, "")).encode()
            first_line, _, others = head.partition(b"\r\n")
            method, _target, version = first_line.split(b" ", 2)
            _pipe(connection, upstream, b" ".join((method, origin_form, version)) + b"\r\n" + others + rest)


class BlobStorage:
    """Storage "elsewhere" that a registry redirects blob downloads to: serves
    ``/blobs/sha256/<hex>`` from a registry's storage directory and records request headers."""

    def __init__(self, registry: Registry) -> None:
        self.requests: list[dict[str, str]] = []
        storage = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                storage.requests.append({k.lower(): v for k, v in self.headers.items()})
                digest = "sha256:" + self.path.rsplit("/", 1)[-1]
                try:
                    data = registry.blob_file(digest).read_bytes()
                except OSError:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
