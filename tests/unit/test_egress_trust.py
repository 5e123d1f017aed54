"""The guest's side of secrets (guest/egress_trust.py) on a scratch directory: the CA in its own
file, in a bundle with the system's CAs, appended to the system bundle once however often it is
given, and the placeholders in every later command's environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from machinen_async.guest import egress_trust, task

CA_ONE = b"-----BEGIN CERTIFICATE-----\nONE\n-----END CERTIFICATE-----\n"
CA_TWO = b"-----BEGIN CERTIFICATE-----\nTWO\n-----END CERTIFICATE-----\n"
SYSTEM = b"-----BEGIN CERTIFICATE-----\nSYSTEM\n-----END CERTIFICATE-----\n"


def test_the_ca_is_trusted_beside_the_systems_and_replaced_not_piled_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    system = tmp_path / "etc/ssl/certs/ca-certificates.crt"
    system.parent.mkdir(parents=True)
    system.write_bytes(SYSTEM)
    monkeypatch.setattr(egress_trust, "CA_FILE", str(tmp_path / "ca/machinen-egress.crt"))
    monkeypatch.setattr(egress_trust, "BUNDLE", str(tmp_path / "etc/ssl/machinen-egress-bundle.pem"))
    monkeypatch.setattr(egress_trust, "SYSTEM_BUNDLES", (str(tmp_path / "missing.pem"), str(system)))
    monkeypatch.setattr(task, "BASE_ENV", dict(task.BASE_ENV))
    monkeypatch.setattr(egress_trust, "BASE_ENV", task.BASE_ENV)
    egress_trust.trust({"ca_pem": CA_ONE, "env": {"API_KEY": "machinen-secret-API_KEY-0123456789abcdef"}})
    egress_trust.trust({"ca_pem": CA_TWO, "env": {"API_KEY": "machinen-secret-API_KEY-0123456789abcdef"}})
    assert Path(egress_trust.CA_FILE).read_bytes() == CA_TWO
    for bundle in (system, Path(egress_trust.BUNDLE)):
        text = bundle.read_bytes()
        assert text.count(b"SYSTEM") == 1 and b"ONE" not in text and text.count(b"TWO") == 1, bundle
    assert task.BASE_ENV["API_KEY"] == "machinen-secret-API_KEY-0123456789abcdef"
    assert task.BASE_ENV["SSL_CERT_FILE"] == task.BASE_ENV["REQUESTS_CA_BUNDLE"] == egress_trust.BUNDLE
    assert task.BASE_ENV["NODE_EXTRA_CA_CERTS"] == egress_trust.CA_FILE
    for bad in ({"ca_pem": b"not a certificate", "env": {}}, {"ca_pem": CA_ONE, "env": {"A": 1}}):
        with pytest.raises(ValueError):
            egress_trust.trust(bad)
