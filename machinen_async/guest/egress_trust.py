"""``egress_trust``: the guest's side of secrets injected on egress (``boot(secrets=)``).

The host terminates the guest's TLS to a secret's hosts with a CA of its own for this VM: the guest
must trust it, beside its system's CAs.  The CA goes into its own file and into a bundle of the
system's CAs plus it (``SSL_CERT_FILE``, ``REQUESTS_CA_BUNDLE``: OpenSSL, Python, curl read these
instead of the system store, so the bundle must hold both), and is appended to the system bundle
for programs that read only that.  The secrets' placeholders (never their values) become
environment variables of every later command.  A second call (a fork given the secrets, a
restore) replaces the CA.
"""

from __future__ import annotations

import os

from .task import BASE_ENV

CA_FILE = "/usr/local/share/ca-certificates/machinen-egress.crt"
BUNDLE = "/etc/ssl/machinen-egress-bundle.pem"
SYSTEM_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")
BEGIN, END = b"# machinen egress CA begin\n", b"# machinen egress CA end\n"

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing into PID 1 (slow under TCG)
if TYPE_CHECKING:
    from collections.abc import Mapping


def _without_ours(pem: bytes) -> bytes:
    """A bundle with the block an earlier call appended taken out."""
    start = pem.find(BEGIN)
    end = pem.find(END, start)
    return pem if start < 0 or end < 0 else pem[:start] + pem[end + len(END) :]


def _replace(path: str, data: bytes) -> None:
    """Write ``path`` anew (a temporary file renamed over it: an image's symlink is not followed)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".machinen", "wb") as f:
        f.write(data)
    os.replace(path + ".machinen", path)


def trust(params: Mapping[str, object]) -> dict[str, object]:
    ca_pem, env = params["ca_pem"], params["env"]
    if not isinstance(ca_pem, bytes) or not ca_pem.startswith(b"-----BEGIN CERTIFICATE-----"):
        raise ValueError("egress_trust: ca_pem is a PEM certificate")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError("egress_trust: env maps names to placeholders")
    _replace(CA_FILE, ca_pem)
    block = BEGIN + ca_pem.rstrip(b"\n") + b"\n" + END
    system = next((path for path in SYSTEM_BUNDLES if os.path.exists(path)), None)
    system_pem = b""
    if system is not None:
        with open(system, "rb") as f:
            system_pem = _without_ours(f.read())
        _replace(os.path.realpath(system), system_pem.rstrip(b"\n") + b"\n" + block)
    _replace(BUNDLE, system_pem.rstrip(b"\n") + b"\n" + block)
    BASE_ENV.update(env)
    BASE_ENV.update({"SSL_CERT_FILE": BUNDLE, "REQUESTS_CA_BUNDLE": BUNDLE, "CURL_CA_BUNDLE": BUNDLE,
                     "NODE_EXTRA_CA_CERTS": CA_FILE})  # fmt: skip
    return {"bundle": BUNDLE, "system_bundle": system}
