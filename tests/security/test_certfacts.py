"""Issue 12: certificate facts (CN, SANs, expiry) are read in one place: TLS, health, doctor, `cert`."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from appliance.security import certfacts, pki


def test_facts_of_an_issued_server_certificate(tmp_path: Path) -> None:
    ca = pki.new_ca()
    server = pki.new_server_cert(ca, ["appliance.branch.local", "192.168.10.5"], days=30)
    pki.save(server, tmp_path / "server.crt", tmp_path / "server.key")
    f = certfacts.pem_facts(tmp_path / "server.crt")
    assert f.subject_cn == "qwen-appliance server" and f.issuer_cn == "qwen-appliance local CA"
    assert {"localhost", "appliance.branch.local"} <= set(f.dns_names)
    assert {"127.0.0.1", "::1", "192.168.10.5"} <= set(f.ip_addresses)
    assert f.sans == f.dns_names + f.ip_addresses
    assert "DNS:localhost" in f.labelled_sans and "IP:127.0.0.1" in f.labelled_sans
    assert f.days_left() in (29, 30) and certfacts.days_left_in_file(tmp_path / "server.crt") == f.days_left()
    assert f.days_left(f.not_after + dt.timedelta(days=2)) == -2


def test_no_sans_and_unreadable_files(tmp_path: Path) -> None:
    ca = pki.new_ca()
    assert certfacts.facts(ca.cert).sans == ()
    (tmp_path / "junk.crt").write_text("not a certificate")
    assert certfacts.days_left_in_file(tmp_path / "junk.crt") is None
    assert certfacts.days_left_in_file(tmp_path / "missing.crt") is None
    assert certfacts.days_left_in_file(None) is None
