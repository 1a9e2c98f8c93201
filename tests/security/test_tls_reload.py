"""Issue 11 defect 3: a reload puts every TLS setting in force for new handshakes, as a fresh start would,
and holds older connections to it request by request; a rejected reload leaves the old context whole.

Three client certificates probe each state: none, one from the set-up's CA (A), one from a second CA (B).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import ssl
from pathlib import Path

import pytest
from conftest import Daemon, DaemonFactory, add_client
from cryptography.hazmat.primitives import serialization
from helpers import records, wait_for
from rawtls import REFUSED, Cert, ask, connect, context, exchange, has_security_headers, head, served_cert

from appliance.security import pki

OK = 200


def second_ca(d: Daemon) -> tuple[Path, Cert]:
    """CA B (its certificate in tls/ca-b.crt) and a client certificate "tester" it signed."""
    tls = d.setup.policy.parent / "tls"
    ca = pki.new_ca("second CA")
    pki.save(ca, tls / "ca-b.crt", tls / "ca-b.key")
    leaf = pki.new_client_cert(ca, "tester")
    pki.save(leaf, tls / "b-client.crt", tls / "b-client.key")
    return tls / "ca-b.crt", (tls / "b-client.crt", tls / "b-client.key")


def reload_with(d: Daemon, edits: dict[str, str], accepted: bool = True) -> None:
    """Edit the policy, SIGHUP, and wait for the verdict to be logged."""
    text = d.setup.policy.read_text()
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new)
    before = len(re.findall(r"policy reload \(.*\) (accepted|REJECTED)", d.log()))
    d.setup.policy.write_text(text)
    d.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: len(re.findall(r"policy reload \(.*\) (accepted|REJECTED)", d.log())) > before)
    verdict = re.findall(r"policy reload \(.*\) (accepted|REJECTED)", d.log())
    assert ("accepted" in verdict[before:]) == accepted, d.log()[-3000:]


def matrix(d: Daemon, certs: dict[str, Cert | None]) -> dict[str, int]:
    return {name: ask(d, cert) for name, cert in certs.items()}


def client_ca_line(d: Daemon) -> str:
    line = re.search(r'^client_ca = "[^"]*"', d.setup.policy.read_text(), re.M)
    assert line
    return line.group(0)


def mode_line(d: Daemon) -> str:
    line = re.search(r'^client_cert = "[a-z]+"', d.setup.policy.read_text(), re.M)
    assert line
    return line.group(0)


def test_every_tls_setting_takes_effect_like_a_fresh_start(daemon_factory: DaemonFactory) -> None:
    """Each reload step: the probes answer exactly as a daemon started with that policy would."""
    d = daemon_factory()
    ca_b, cert_b = second_ca(d)
    tls = d.setup.policy.parent / "tls"
    (tls / "both.crt").write_bytes((tls / "ca.crt").read_bytes() + ca_b.read_bytes())
    certs: dict[str, Cert | None] = {
        "none": None,
        "A": (d.setup.client_cert, d.setup.client_key),
        "B": cert_b,
    }
    assert matrix(d, certs) == {"none": REFUSED, "A": OK, "B": REFUSED}
    steps: list[tuple[str, str, dict[str, int]]] = [
        ('client_ca = "tls/ca-b.crt"', 'client_cert = "required"', {"none": REFUSED, "A": REFUSED, "B": OK}),
        ('client_ca = "tls/ca-b.crt"', 'client_cert = "optional"', {"none": OK, "A": REFUSED, "B": OK}),
        ('client_ca = "tls/both.crt"', 'client_cert = "required"', {"none": REFUSED, "A": OK, "B": OK}),
        ('client_ca = "tls/ca.crt"', 'client_cert = "off"', {"none": OK, "A": OK, "B": OK}),
        ('client_ca = "tls/ca.crt"', 'client_cert = "required"', {"none": REFUSED, "A": OK, "B": REFUSED}),
    ]
    for ca_line, mode, want in steps:
        reload_with(d, {client_ca_line(d): ca_line, mode_line(d): mode})
        assert matrix(d, certs) == want, (ca_line, mode)


def test_ca_file_rewritten_in_place_drops_the_old_ca(daemon_factory: DaemonFactory) -> None:
    """The same client_ca path with new contents (the other way to rotate) is just as final."""
    d = daemon_factory()
    tls = d.setup.policy.parent / "tls"
    shutil.copy(tls / "ca.crt", tls / "clients-ca.crt")
    reload_with(d, {'client_ca = "tls/ca.crt"': 'client_ca = "tls/clients-ca.crt"'})
    ca_b, cert_b = second_ca(d)
    a = (d.setup.client_cert, d.setup.client_key)
    assert ask(d, a) == OK and ask(d, cert_b) == REFUSED
    (tls / "clients-ca.crt").write_bytes(ca_b.read_bytes())
    reload_with(d, {})  # the policy file is unchanged: only SIGHUP re-reads the CA
    assert ask(d, a) == REFUSED and ask(d, cert_b) == OK


def test_new_server_certificate_and_key_are_served(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    tls = d.setup.policy.parent / "tls"
    before = served_cert(d)
    fresh = pki.new_server_cert(pki.load(tls / "ca.crt", tls / "ca.key"), ["127.0.0.1"])
    pki.save(fresh, tls / "server2.crt", tls / "server2.key")
    reload_with(
        d,
        {
            'tls_cert = "tls/server.crt"': 'tls_cert = "tls/server2.crt"',
            'tls_key = "tls/server.key"': 'tls_key = "tls/server2.key"',
        },
    )
    want = hashlib.sha256(fresh.cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert served_cert(d) == want != before


def garbage_ca(d: Daemon) -> dict[str, str]:
    (d.setup.policy.parent / "tls/garbage.crt").write_text("not a certificate\n")
    return {'client_ca = "tls/ca.crt"': 'client_ca = "tls/garbage.crt"'}


def empty_ca(d: Daemon) -> dict[str, str]:
    (d.setup.policy.parent / "tls/empty.crt").write_text("")
    return {'client_ca = "tls/ca.crt"': 'client_ca = "tls/empty.crt"'}


def mismatched_key(d: Daemon) -> dict[str, str]:
    """A new server certificate with the old key: the pair does not match."""
    tls = d.setup.policy.parent / "tls"
    fresh = pki.new_server_cert(pki.load(tls / "ca.crt", tls / "ca.key"), ["127.0.0.1"])
    pki.save(fresh, tls / "server2.crt", tls / "server2.key")
    return {'tls_cert = "tls/server.crt"': 'tls_cert = "tls/server2.crt"'}


def good_cert_bad_ca(d: Daemon) -> dict[str, str]:
    """A valid new certificate and key with a broken CA: nothing of it may be half-applied."""
    tls = d.setup.policy.parent / "tls"
    fresh = pki.new_server_cert(pki.load(tls / "ca.crt", tls / "ca.key"), ["127.0.0.1"])
    pki.save(fresh, tls / "server2.crt", tls / "server2.key")
    return {
        'tls_cert = "tls/server.crt"': 'tls_cert = "tls/server2.crt"',
        'tls_key = "tls/server.key"': 'tls_key = "tls/server2.key"',
        **garbage_ca(d),
    }


def stricter_mode_bad_ca(d: Daemon) -> dict[str, str]:
    """optional -> required together with a broken CA: the mode must not change alone."""
    return {'client_cert = "optional"': 'client_cert = "required"', **garbage_ca(d)}


@pytest.mark.parametrize(
    "bad", [garbage_ca, empty_ca, mismatched_key, good_cert_bad_ca, stricter_mode_bad_ca]
)
def test_rejected_tls_reload_leaves_the_old_context_whole(daemon_factory: DaemonFactory, bad: object) -> None:
    d = daemon_factory({'client_cert = "required"': 'client_cert = "optional"'})
    certs: dict[str, Cert | None] = {
        "none": None,
        "A": (d.setup.client_cert, d.setup.client_key),
        "foreign": second_ca(d)[1],
    }
    before, cert_before = matrix(d, certs), served_cert(d)
    assert before == {"none": OK, "A": OK, "foreign": REFUSED}
    assert callable(bad)
    reload_with(d, bad(d), accepted=False)
    log = d.log()
    assert str(d.setup.policy) in log and ("server.client_ca" in log or "server.tls_cert" in log)
    assert "hint" in log and "Traceback" not in log
    assert matrix(d, certs) == before and served_cert(d) == cert_before
    assert [r for r in records(d) if r["event"] == "policy.reload"][-1]["outcome"] == "rejected"


def keepalive(d: Daemon, cert: Cert | None) -> ssl.SSLSocket:
    """A connection that has been answered once and stays open for the next request."""
    tls = connect(d, cert)
    assert exchange(tls, head("GET", "/v1/models", d.setup.token)).status == OK
    return tls


def refused_as_stale(d: Daemon, tls: ssl.SSLSocket, why: str) -> None:
    """The next request on an old connection: 403 in the API's shape, with headers, audited, closed."""
    reply = exchange(tls, head("GET", "/v1/models", d.setup.token))
    assert reply.status == 403 and reply.json()["error"]["type"] == "permission_error"
    assert has_security_headers(reply) and reply.headers["connection"] == "close"
    rec = [r for r in records(d) if r.get("request_id") == reply.headers["x-request-id"]]
    assert rec and rec[0]["event"] == "request.refused_by_server" and why in rec[0]["reason"]
    assert rec[0]["status"] == 403 and rec[0]["source_ip"] == "127.0.0.1"
    assert exchange(tls, head("GET", "/v1/models", d.setup.token)).status == REFUSED


def test_keepalive_connection_loses_the_rotated_out_ca(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    _, cert_b = second_ca(d)
    old = keepalive(d, (d.setup.client_cert, d.setup.client_key))
    unrelated = keepalive(d, (d.setup.client_cert, d.setup.client_key))
    add_client(d.setup.policy, "zed")
    reload_with(d, {})  # an unrelated reload keeps keep-alive connections serving
    assert exchange(unrelated, head("GET", "/v1/models", d.setup.token)).status == OK
    reload_with(d, {'client_ca = "tls/ca.crt"': 'client_ca = "tls/ca-b.crt"'})
    with old, unrelated:
        refused_as_stale(d, old, "no longer configured")
    fresh = keepalive(d, cert_b)  # a connection under the new CA serves on
    with fresh:
        assert exchange(fresh, head("GET", "/v1/models", d.setup.token)).status == OK


def test_keepalive_without_certificate_loses_optional(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory({'client_cert = "required"': 'client_cert = "optional"'})
    old = keepalive(d, None)
    with_cert = keepalive(d, (d.setup.client_cert, d.setup.client_key))
    reload_with(d, {'client_cert = "optional"': 'client_cert = "required"'})
    with old, with_cert:
        refused_as_stale(d, old, "now required")
        assert exchange(with_cert, head("GET", "/v1/models", d.setup.token)).status == OK


def resumable(d: Daemon, version: ssl.TLSVersion) -> tuple[ssl.SSLContext, ssl.SSLSession]:
    """A TLS session of certificate A (a ticket), and the client context that holds it."""
    ctx = context(d, (d.setup.client_cert, d.setup.client_key))
    ctx.maximum_version = version
    with connect(d, None, ctx=ctx) as tls:
        assert exchange(tls, head("GET", "/v1/models", d.setup.token)).status == OK
        assert tls.session is not None and tls.session.has_ticket
        return ctx, tls.session


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_no_session_resumption_across_a_ca_rotation(
    daemon_factory: DaemonFactory, version: ssl.TLSVersion
) -> None:
    """Resumption skips certificate verification: a session from before a rotation must not resume."""
    d = daemon_factory()
    ctx, session = resumable(d, version)
    with connect(d, None, ctx=ctx, session=session) as tls:  # proof the probe can resume at all
        assert exchange(tls, head("GET", "/v1/models", d.setup.token)).status == OK
        assert tls.session_reused
    second_ca(d)
    reload_with(d, {'client_ca = "tls/ca.crt"': 'client_ca = "tls/ca-b.crt"'})
    try:
        tls = connect(d, None, ctx=ctx, session=session)
    except (ssl.SSLError, OSError):
        return  # refused in the handshake: the certificate was checked against CA B
    with tls:
        reply = exchange(tls, head("GET", "/v1/models", d.setup.token))
        assert not tls.session_reused and reply.status == REFUSED
