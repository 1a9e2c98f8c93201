"""The admin CLI: `token create|list|revoke` edit policy.toml safely, `cert ...` runs the local PKI.

Every command runs through the real entry point (`appliance.admin.cli.main`, once as a subprocess);
no GPU needed.
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
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from appliance.admin.cli import main
from appliance.admin.init import InitResult, init
from appliance.config.policy import load_policy
from appliance.security import pki
from appliance.security.tokens import find_client, token_digest

ROOT = Path(__file__).resolve().parents[2]
TODAY = dt.datetime.now(dt.timezone.utc).date()
FP = "AB:" * 31 + "AB"  # a fingerprint as openssl prints it


@pytest.fixture
def setup(tmp_path: Path) -> InitResult:
    return init(tmp_path / "s", model=tmp_path / "m.gguf")


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def create(capsys: pytest.CaptureFixture[str], policy: Path, name: str, *extra: str) -> dict[str, str]:
    rc, out, err = cli(capsys, "token", "create", name, "--policy", policy, "--json", *extra)
    assert rc == 0, err
    result: dict[str, str] = json.loads(out)
    return result


# --- token create ---------------------------------------------------------------------------------


def test_create_prints_token_once_and_appends_only_its_digest(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    before = setup.policy.read_text()
    rc, out, _ = cli(capsys, "token", "create", "teller-03", "--policy", setup.policy)
    assert rc == 0
    token = re.search(r"qwa_[A-Za-z0-9_-]{43}", out).group(0)  # type: ignore[union-attr]
    assert out.count(token) == 1 and "only this once" in out and "systemctl reload" in out
    after = setup.policy.read_text()
    assert after.startswith(before)  # every byte the admin had is still there, in place
    assert token not in after and token_digest(token) in after
    added = after[len(before):]
    assert added == f'\n[[clients]]\nname = "teller-03"\ntoken_sha256 = "{token_digest(token)}"\n' \
                   'scopes = ["chat"]\n'
    client = find_client(load_policy(setup.policy).clients, token)
    assert client is not None and client.name == "teller-03" and client.scopes == {"chat"}


def test_create_with_every_option_is_what_load_policy_sees(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    got = create(capsys, setup.policy, "teller-04", "--scope", "chat", "--scope", "models",
                 "--expires", "2031-03-01", "--allow", "127.0.0.1", "--allow", "::1/128",
                 "--cert-cn", "teller-04", "--cert-sha256", FP, "--rate", "60/minute",
                 "--max-concurrent", "2")
    assert got["name"] == "teller-04" and got["scopes"] == ["chat", "models"]
    assert got["expires"] == "2031-03-01"
    text = setup.policy.read_text()
    assert "expires = 2031-03-01\n" in text  # a TOML date, not a string
    client = find_client(load_policy(setup.policy).clients, got["token"])
    assert client is not None
    assert client.scopes == {"chat", "models"}
    assert client.allow == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
    assert client.cert_cn == "teller-04"
    assert client.cert_sha256 == "ab" * 32
    assert client.expires == dt.date(2031, 3, 1)
    assert str(client.rate) == "60/minute"
    assert client.max_concurrent == 2
    assert client.disabled is False


def test_expires_in_days_counts_from_today_utc(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    got = create(capsys, setup.policy, "short", "--expires", "90d")
    assert got["expires"] == (TODAY + dt.timedelta(days=90)).isoformat()


@pytest.mark.parametrize(("args", "key"), [
    (["client-01"], "clients.name"),  # init's client: duplicate
    (["bad name"], "clients.name"),
    ([".x"], "clients.name"),
    (["x" * 65], "clients.name"),
    (["ok\n"], "clients.name"),
    (["ok", "--scope", "root"], "clients.scopes"),
    (["ok", "--allow", "10.0.0.300/24"], "clients.allow"),
    (["ok", "--allow", "127.0.0.1/8"], "clients.allow"),  # host bits set
    (["ok", "--expires", "2027-02-30"], "clients.expires"),
    (["ok", "--expires", "soon"], "clients.expires"),
    (["ok", "--expires", "0d"], "clients.expires"),
    (["ok", "--expires", "2020-01-01"], "clients.expires"),
    (["ok", "--rate", "60/fortnight"], "clients.rate"),
    (["ok", "--rate", "0/minute"], "clients.rate"),
    (["ok", "--rate", "fast"], "clients.rate"),
    (["ok", "--cert-sha256", "abc"], "clients.cert_sha256"),
    (["ok", "--max-concurrent", "0"], "clients.max_concurrent"),
])
def test_create_refusals_name_file_and_key_and_leave_file_alone(  # type: ignore[no-untyped-def]
        setup: InitResult, capsys, args: list[str], key: str) -> None:
    before = setup.policy.read_bytes()
    rc, out, err = cli(capsys, "token", "create", *args, "--policy", setup.policy)
    assert rc == 2 and out == ""  # no token is shown for a client that was not added
    assert f"{setup.policy}: [{key}]" in err and "(hint: " in err
    assert setup.policy.read_bytes() == before


def test_create_refused_by_load_policy_keeps_old_file_and_leaves_no_temp(  # type: ignore[no-untyped-def]
        setup: InitResult, capsys) -> None:
    before = setup.policy.read_bytes()
    rc, out, err = cli(capsys, "token", "create", "far", "--allow", "10.9.0.0/16", "--policy",
                       setup.policy)
    assert rc == 2 and out == ""
    assert "outside [server] allow" in err and str(setup.policy) in err and "not changed" in err
    assert setup.policy.read_bytes() == before
    assert sorted(p.name for p in setup.policy.parent.iterdir() if p.name.startswith(".")) == []


def test_create_refuses_a_policy_others_can_write_and_keeps_mode(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    setup.policy.chmod(0o664)
    rc, out, err = cli(capsys, "token", "create", "x", "--policy", setup.policy)
    assert rc == 2 and out == "" and "chmod go-w" in err
    setup.policy.chmod(0o640)
    create(capsys, setup.policy, "x")
    assert stat.S_IMODE(setup.policy.stat().st_mode) == 0o640


def test_create_via_subprocess(setup: InitResult) -> None:
    proc = subprocess.run([sys.executable, "-m", "appliance", "token", "create", "sub", "--json",
                           "--scope", "models", "--policy", str(setup.policy)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["scopes"] == ["models"] and got["expires"] is None
    assert token_digest(got["token"]) in setup.policy.read_text()


# --- token list / revoke --------------------------------------------------------------------------


def test_list_shows_bindings_and_expiry_but_no_secret(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    token = create(capsys, setup.policy, "bound", "--cert-cn", "bound", "--cert-sha256", FP,
                   "--allow", "127.0.0.0/24", "--rate", "5/second")["token"]
    with setup.policy.open("a") as f:  # an old client, past its date and switched off
        f.write(f'\n[[clients]]\nname = "old"\ntoken_sha256 = "{"c" * 64}"\nexpires = 2020-01-01\n'
                "disabled = true\n")
    rc, out, _ = cli(capsys, "token", "list", "--policy", setup.policy)
    assert rc == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "2020-01-01 EXPIRED" in lines["old"] and " yes " in lines["old"]
    assert "CN=bound" in lines["bound"] and "sha256=abababab…" in lines["bound"]
    assert "127.0.0.0/24" in lines["bound"] and "5/second" in lines["bound"]
    rc, js, _ = cli(capsys, "token", "list", "--policy", setup.policy, "--json")
    rows = {r["name"]: r for r in json.loads(js)}
    assert rows["old"]["expired"] is True and rows["old"]["disabled"] is True
    assert rows["bound"]["cert_sha256_prefix"] == "abababab"
    for text in (out, js):
        assert token not in text and not re.search(r"[0-9a-fA-F]{9,}", text)


def test_revoke_removes_only_that_table(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    original = setup.policy.read_text()
    create(capsys, setup.policy, "a")
    with_a = setup.policy.read_text()
    create(capsys, setup.policy, "b")
    b_table = setup.policy.read_text()[len(with_a):]
    rc, out, _ = cli(capsys, "token", "revoke", "a", "--policy", setup.policy)
    assert rc == 0 and "systemctl reload qwen-appliance" in out
    assert setup.policy.read_text() == original + b_table
    assert cli(capsys, "token", "revoke", "b", "--policy", setup.policy)[0] == 0
    assert setup.policy.read_text() == original  # create + revoke is a byte-exact round trip
    assert [c.name for c in load_policy(setup.policy).clients] == ["client-01"]


def test_revoke_keeps_the_admins_comments_around_other_tables(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    create(capsys, setup.policy, "a")
    text = setup.policy.read_text().replace('[[clients]]\nname = "a"',
                                            '# teller a, ticket 4711\n[[clients]]\nname = "a"')
    text += '\n# kept: about the future\n\n# teller b\n[[clients]]\nname = "b"\n' \
            f'token_sha256 = "{"d" * 64}"\nscopes = ["chat",\n  "models"]   # two\n'
    setup.policy.write_text(text)
    assert cli(capsys, "token", "revoke", "a", "--policy", setup.policy)[0] == 0
    after = setup.policy.read_text()
    assert "ticket 4711" not in after and 'name = "a"' not in after
    a_end = text.index('scopes = ["chat"]\n', text.index('name = "a"')) + len('scopes = ["chat"]\n')
    assert after == text[:text.index("\n# teller a")] + text[a_end:]
    assert cli(capsys, "token", "revoke", "b", "--policy", setup.policy)[0] == 0
    assert "# kept: about the future" in setup.policy.read_text()
    assert "# teller b" not in setup.policy.read_text()


def test_revoke_leaves_a_comment_glued_to_the_next_table(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    original = setup.policy.read_text()
    create(capsys, setup.policy, "a")
    create(capsys, setup.policy, "b")
    text = setup.policy.read_text().replace('\n\n[[clients]]\nname = "b"',
                                            '\n# teller b\n[[clients]]\nname = "b"')
    setup.policy.write_text(text)
    assert cli(capsys, "token", "revoke", "a", "--policy", setup.policy)[0] == 0
    assert setup.policy.read_text() == original + "\n" + text[text.index("# teller b"):]


def test_revoke_refusals(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    before = setup.policy.read_bytes()
    rc, _, err = cli(capsys, "token", "revoke", "nobody", "--policy", setup.policy)
    assert rc == 2 and "no client named 'nobody'" in err and "[clients.name]" in err
    rc, _, err = cli(capsys, "token", "revoke", "client-01", "--policy", setup.policy)
    assert rc == 2 and "only client" in err and "hint:" in err
    assert setup.policy.read_bytes() == before


# --- certificates ---------------------------------------------------------------------------------


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
    assert cli(capsys, "cert", "server", "--ca-dir", ca, "--out", tls, "--host", "qwen.branch.example",
               "--host", "10.20.30.5")[0] == 0
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
        sans.get_values_for_type(x509.DNSName))
    assert {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.20.30.5")} <= set(
        sans.get_values_for_type(x509.IPAddress))
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
    assert [c.subject for c in p_cas] == [x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
                                         .subject]
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(p12.read_bytes(), b"wrong")


def test_cert_client_p12_password_from_env_is_never_printed(pki_dirs, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ca, _, clients = pki_dirs
    monkeypatch.setenv("QWEN_APPLIANCE_P12_PASSWORD", "correct horse battery")
    rc, out, _ = cli(capsys, "cert", "client", "kiosk", "--ca-dir", ca, "--out", clients, "--p12")
    assert rc == 0 and "correct horse" not in out and "$QWEN_APPLIANCE_P12_PASSWORD" in out
    _, cert, _ = pkcs12.load_key_and_certificates((clients / "kiosk.p12").read_bytes(),
                                                  b"correct horse battery")
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
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                client.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            assert conn.recv(2) == b"ok"
            server_der = conn.getpeercert(binary_form=True) or b""
        thread.join(10)
    assert seen["peer_sha256"] == sha256_of(clients / "teller-06.crt")
    assert hashlib.sha256(server_der).hexdigest() == sha256_of(tls / "server.crt")


def test_client_certificate_from_another_ca_fails_the_handshake(pki_dirs, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca, tls, _ = pki_dirs
    assert cli(capsys, "cert", "ca", tmp_path / "other")[0] == 0
    assert cli(capsys, "cert", "client", "intruder", "--ca-dir", tmp_path / "other",
               "--out", tmp_path / "intr")[0] == 0
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
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                pytest.raises((ssl.SSLError, ConnectionError)), \
                client.wrap_socket(raw, server_hostname="localhost") as conn:
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
    assert pki.fingerprint(leaf.cert) == hashlib.sha256(
        leaf.cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    with pytest.raises(ValueError):
        pki.new_client_cert(ca, "none", days=0)

