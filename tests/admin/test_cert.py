"""`qwen-appliance cert ...`: the local PKI from the command line, down to a real mutual-TLS handshake.

Every command runs through the real entry point (`appliance.admin.cli.main`); no GPU needed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import re
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from helpers import cli_main as cli

from appliance.security import pki


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sha256_of(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@pytest.fixture
def pki_dirs(tmp_path: Path, capsys) -> tuple[Path, Path, Path]:  # type: ignore[no-untyped-def]
    """A CA, a server certificate with an extra host, and one client issued by the CLI."""
    ca, tls, clients = tmp_path / "ca", tmp_path / "tls", tmp_path / "clients"
    assert cli(capsys, "cert", "ca", ca, "--cn", "Branch 12 CA")[0] == 0
    assert (
        cli(
            capsys,
            "cert",
            "server",
            "--ca-dir",
            ca,
            "--out",
            tls,
            "--host",
            "qwen.branch.example",
            "--host",
            "10.20.30.5",
        )[0]
        == 0
    )
    return ca, tls, clients


def test_cert_ca_modes_and_no_overwrite_without_force(pki_dirs, capsys) -> None:  # type: ignore[no-untyped-def]
    ca, _, _ = pki_dirs
    assert (mode(ca / "ca.crt"), mode(ca / "ca.key"), mode(ca)) == (0o644, 0o600, 0o700)
    key = (ca / "ca.key").read_bytes()
    rc, _, err = cli(capsys, "cert", "ca", ca)
    assert rc == 2 and "already exists" in err and "--force" in err
    assert (ca / "ca.key").read_bytes() == key
    assert cli(capsys, "cert", "ca", ca, "--force", "--days", "30")[0] == 0
    assert (ca / "ca.key").read_bytes() != key


def test_cert_server_sans_and_modes(pki_dirs) -> None:  # type: ignore[no-untyped-def]
    _, tls, _ = pki_dirs
    assert (mode(tls / "server.crt"), mode(tls / "server.key")) == (0o644, 0o600)
    cert = x509.load_pem_x509_certificate((tls / "server.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", socket.gethostname(), "qwen.branch.example"} <= set(
        sans.get_values_for_type(x509.DNSName)
    )
    assert {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.20.30.5")} <= set(
        sans.get_values_for_type(x509.IPAddress)
    )
    assert "CN=Branch 12 CA" in cert.issuer.rfc4514_string()


def test_cert_client_p12_with_generated_password(pki_dirs, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ca, _, clients = pki_dirs
    monkeypatch.delenv("QWEN_APPLIANCE_P12_PASSWORD", raising=False)
    rc, out, _ = cli(capsys, "cert", "client", "teller-05", "--ca-dir", ca, "--out", clients, "--p12")
    assert rc == 0
    crt, key, p12 = (clients / f"teller-05.{ext}" for ext in ("crt", "key", "p12"))
    assert (mode(crt), mode(key), mode(p12)) == (0o644, 0o600, 0o600)
    assert (clients / "ca.crt").read_bytes() == (ca / "ca.crt").read_bytes()
    assert sha256_of(crt) in out and f"--cert-sha256 {sha256_of(crt)}" in out
    password = re.search(r"password\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    assert out.count(password) == 1
    p_key, p_cert, p_cas = pkcs12.load_key_and_certificates(p12.read_bytes(), password.encode())
    assert p_cert is not None and p_key is not None
    assert p_cert.public_bytes(serialization.Encoding.PEM) == crt.read_bytes()
    assert [c.subject for c in p_cas] == [
        x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes()).subject
    ]
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(p12.read_bytes(), b"wrong")


def test_cert_client_p12_password_from_env_is_never_printed(pki_dirs, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ca, _, clients = pki_dirs
    monkeypatch.setenv("QWEN_APPLIANCE_P12_PASSWORD", "correct horse battery")
    rc, out, _ = cli(capsys, "cert", "client", "kiosk", "--ca-dir", ca, "--out", clients, "--p12")
    assert rc == 0 and "correct horse" not in out and "$QWEN_APPLIANCE_P12_PASSWORD" in out
    _, cert, _ = pkcs12.load_key_and_certificates(
        (clients / "kiosk.p12").read_bytes(), b"correct horse battery"
    )
    assert cert is not None


def test_cert_client_refusals(pki_dirs, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca, _, clients = pki_dirs
    assert cli(capsys, "cert", "client", "../evil", "--ca-dir", ca, "--out", clients)[0] == 2
    assert not (tmp_path / "evil.key").exists()
    assert cli(capsys, "cert", "client", "c1", "--ca-dir", ca, "--out", clients)[0] == 0
    rc, _, err = cli(capsys, "cert", "client", "c1", "--ca-dir", ca, "--out", clients)
    assert rc == 2 and "already exists" in err
    rc, _, err = cli(capsys, "cert", "client", "c2", "--ca-dir", tmp_path / "none", "--out", clients)
    assert rc == 2 and "cert ca DIR" in err
    rc, _, err = cli(capsys, "cert", "server", "--ca-dir", ca, "--out", clients, "--host", "bad host")
    assert rc == 2 and "not a host name" in err


def test_cert_list_exit_codes_warning_and_expired(pki_dirs, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca, tls, clients = pki_dirs
    rc, out, _ = cli(capsys, "cert", "list", ca, tls / "server.crt")
    assert rc == 0 and "WARNING" not in out and "EXPIRED" not in out
    assert sha256_of(tls / "server.crt") in out and "DNS:qwen.branch.example" in out
    assert "Branch 12 CA" in out

    assert cli(capsys, "cert", "client", "soon", "--ca-dir", ca, "--out", clients, "--days", "10")[0] == 0
    rc, out, _ = cli(capsys, "cert", "list", clients / "soon.crt")
    assert rc == 1 and "WARNING" in out and "EXPIRED" not in out

    authority = pki.load(ca / "ca.crt", ca / "ca.key")
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=40)
    old = pki.new_client_cert(authority, "old", days=10, valid_from=start)
    assert old.cert.not_valid_after_utc < dt.datetime.now(dt.timezone.utc)
    pki.save(old, tmp_path / "expired/old.crt", tmp_path / "expired/old.key")
    rc, out, _ = cli(capsys, "cert", "list", tmp_path / "expired")
    assert rc == 1 and "EXPIRED" in out

    rc, js, _ = cli(capsys, "cert", "list", "--json", tmp_path)
    status = {Path(r["path"]).name: r["status"] for r in json.loads(js)}
    assert rc == 1 and status["old.crt"] == "EXPIRED" and status["soon.crt"] == "WARNING"
    assert status["server.crt"] == "OK"
    assert cli(capsys, "cert", "list", tls / "server.key")[0] == 2  # a key is no certificate


def test_certificates_from_the_cli_complete_a_mutual_tls_handshake(pki_dirs, capsys) -> None:  # type: ignore[no-untyped-def]
    ca, tls, clients = pki_dirs
    assert cli(capsys, "cert", "client", "teller-06", "--ca-dir", ca, "--out", clients)[0] == 0
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tls / "server.crt", tls / "server.key")
    server.load_verify_locations(cafile=ca / "ca.crt")
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(cafile=str(clients / "ca.crt"))  # CERT_REQUIRED, hostname checked
    client.load_cert_chain(clients / "teller-06.crt", clients / "teller-06.key")
    seen: dict[str, object] = {}

    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            with server.wrap_socket(conn, server_side=True) as tls_conn:
                der = tls_conn.getpeercert(binary_form=True)
                seen["peer_sha256"] = hashlib.sha256(der or b"").hexdigest()
                tls_conn.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(listener.getsockname(), timeout=10) as raw,
            client.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
        ):
            assert conn.recv(2) == b"ok"
            server_der = conn.getpeercert(binary_form=True) or b""
        thread.join(10)
    assert seen["peer_sha256"] == sha256_of(clients / "teller-06.crt")
    assert hashlib.sha256(server_der).hexdigest() == sha256_of(tls / "server.crt")


def test_client_certificate_from_another_ca_fails_the_handshake(pki_dirs, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca, tls, _ = pki_dirs
    assert cli(capsys, "cert", "ca", tmp_path / "other")[0] == 0
    assert (
        cli(capsys, "cert", "client", "intruder", "--ca-dir", tmp_path / "other", "--out", tmp_path / "intr")[
            0
        ]
        == 0
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tls / "server.crt", tls / "server.key")
    server.load_verify_locations(cafile=ca / "ca.crt")
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(cafile=str(ca / "ca.crt"))
    client.load_cert_chain(tmp_path / "intr/intruder.crt", tmp_path / "intr/intruder.key")
    errors: list[Exception] = []

    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server.wrap_socket(conn, server_side=True):
                    pass
            except ssl.SSLError as exc:
                errors.append(exc)
            finally:
                conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(listener.getsockname(), timeout=10) as raw,
            pytest.raises((ssl.SSLError, ConnectionError)),
            client.wrap_socket(raw, server_hostname="localhost") as conn,
        ):
            conn.recv(1)  # TLS 1.3: the server's refusal arrives after the client's handshake
        thread.join(10)
    assert errors and "certificate" in str(errors[0]).lower()


def test_pki_validity_window() -> None:
    ca = pki.new_ca(days=30)
    start = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    leaf = pki.new_client_cert(ca, "past", days=10, valid_from=start)
    assert leaf.cert.not_valid_before_utc == start
    assert leaf.cert.not_valid_after_utc == start + dt.timedelta(days=10)
    server = pki.new_server_cert(ca, [], 5, valid_from=dt.datetime(2020, 1, 1))  # naive means UTC
    assert server.cert.not_valid_after_utc == dt.datetime(2020, 1, 6, tzinfo=dt.timezone.utc)
    assert (
        pki.fingerprint(leaf.cert)
        == hashlib.sha256(leaf.cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    )
    with pytest.raises(ValueError):
        pki.new_client_cert(ca, "none", days=0)
