"""A client certificate's validity window holds on every request, not only at the handshake.

Found after issue 11: a keep-alive connection, or a TLS session resumed after `not_after`, kept answering an
expired certificate (resumption skips certificate verification).
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from conftest import Daemon, DaemonFactory
from helpers import records
from rawtls import Cert, connect, context, exchange, head

from appliance.security import pki
from appliance.security.identity import valid_now

LIFE_S = 4


def short_lived(d: Daemon, seconds: int) -> tuple[Cert, dt.datetime]:
    """A certificate from the set-up's CA that expires `seconds` from now (CN of the set-up's client)."""
    tls = d.setup.policy.parent / "tls"
    ca = pki.load(tls / "ca.crt", tls / "ca.key")
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1) + dt.timedelta(seconds=seconds)
    leaf = pki.new_client_cert(ca, "tester", days=1, valid_from=start)
    out: tuple[Path, Path] = (tls / "short.crt", tls / "short.key")
    pki.save(leaf, *out)
    return out, leaf.cert.not_valid_after_utc


def wait_past(moment: dt.datetime) -> None:
    time.sleep(max(0.0, (moment - dt.datetime.now(dt.timezone.utc)).total_seconds()) + 1.5)


def refused_expired(d: Daemon, status: int, request_id: str) -> None:
    assert status == 403
    rec = [r for r in records(d) if r.get("request_id") == request_id]
    assert rec and "expired" in rec[0]["reason"]


def test_keepalive_connection_stops_at_not_after(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    cert, end = short_lived(d, LIFE_S)
    with connect(d, cert) as tls:
        assert exchange(tls, head("GET", "/v1/models", d.setup.token)).status == 200
        wait_past(end)
        reply = exchange(tls, head("GET", "/v1/models", d.setup.token))
        refused_expired(d, reply.status, reply.headers["x-request-id"])
        assert reply.json()["error"]["type"] == "permission_error"


def test_resumed_session_stops_at_not_after(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    cert, end = short_lived(d, LIFE_S)
    ctx = context(d, cert)
    with connect(d, None, ctx=ctx) as tls:
        assert exchange(tls, head("GET", "/v1/models", d.setup.token)).status == 200
        session = tls.session
    assert session is not None
    wait_past(end)
    try:
        tls = connect(d, None, ctx=ctx, session=session)
    except OSError:
        return  # not resumed: a full handshake refused the expired certificate, which is as good
    with tls:
        reply = exchange(tls, head("GET", "/v1/models", d.setup.token))
        if tls.session_reused:
            refused_expired(d, reply.status, reply.headers["x-request-id"])
        else:
            assert reply.status != 200


@pytest.mark.parametrize(
    ("window", "ok"),
    [
        ((-10, 10), True),
        ((-10, -1), False),
        ((5, 10), False),
        ((None, None), False),
    ],
)
def test_validity_window_is_checked_from_the_scope_facts(
    window: tuple[int | None, int | None], ok: bool
) -> None:
    now = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.timezone.utc)

    def at(s: int | None) -> str | None:
        return None if s is None else (now + dt.timedelta(seconds=s)).isoformat()

    assert valid_now({"not_before": at(window[0]), "not_after": at(window[1])}, now) is ok
    assert valid_now({"not_before": "garbage", "not_after": at(10)}, now) is False
