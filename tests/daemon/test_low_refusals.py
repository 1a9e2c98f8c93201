"""Issue 11 defects 9 and 18: what the HTTP layer refuses before the gate (malformed requests, oversized
heads, WebSocket and other upgrades) is audited and carries the security headers, never logs the URL or the
raw bytes; and the audit cost of refusals is bounded per source, with nothing dropped silently.
"""

from __future__ import annotations

import signal
import ssl
import time
from collections.abc import Iterator

import pytest
from conftest import Daemon, TinyModel, add_client, free_port, make_setup, start_daemon
from helpers import records, wait_for
from rawtls import REFUSED, Reply, connect, exchange, has_security_headers, head, metric, read_reply

MARK = "zq7secretmark"  # in every hostile request: must never reach a log or the trail
LIMIT = 5  # refusal_records_per_second in these tests
WATCHER: dict[str, str] = {}  # the module daemon's metrics token


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("low")
    port = free_port()
    setup = make_setup(
        root / "s",
        tiny_model,
        port,
        {"refusal_records_per_second = 20": f"refusal_records_per_second = {LIMIT}"},
    )
    WATCHER["token"] = add_client(setup.policy, "watcher", ("metrics",))
    daemon = start_daemon(setup, port, root / "daemon.log")
    try:
        yield daemon
    finally:
        daemon.stop()


def ok_head(d: Daemon, extra: bytes = b"", path: str = f"/v1/models?q={MARK}") -> bytes:
    return head("GET", path, d.setup.token, extra)


def body_post(d: Daemon, extra: bytes) -> bytes:
    return head("POST", "/v1/chat/completions", d.setup.token, b"content-type: application/json\r\n" + extra)


WS = (
    b"upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"sec-websocket-version: 13\r\n"
)

CASES = {
    "content-length-and-chunked": (
        lambda d: (
            body_post(d, b"content-length: 5\r\ntransfer-encoding: chunked\r\n") + b"5\r\nhello\r\n0\r\n\r\n"
        ),
        400,
    ),
    "content-length-twice": (
        lambda d: body_post(d, b"content-length: 2\r\ncontent-length: 3\r\n") + b"{}}",
        400,
    ),
    "control-char-in-header": (lambda d: ok_head(d, b"x-a: 1\x01" + MARK.encode() + b"\r\n"), 400),
    "nul-in-target": (lambda d: b"GET /v1/models\x00" + MARK.encode() + b" HTTP/1.1\r\nhost: x\r\n\r\n", 400),
    "space-before-colon": (lambda d: ok_head(d, b"x-a : " + MARK.encode() + b"\r\n"), 400),
    "bad-method": (lambda d: b"G\x01T /" + MARK.encode() + b" HTTP/1.1\r\nhost: x\r\n\r\n", 400),
    "bad-version": (lambda d: b"GET /" + MARK.encode() + b" HTTP/7.3\r\nhost: x\r\n\r\n", 400),
    "headers-over-64k": (
        lambda d: ok_head(d, b"".join(b"x-pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(80))),
        431,
    ),
    "websocket-upgrade": (lambda d: ok_head(d, WS), 400),
    "websocket-upgrade-no-connection-header": (lambda d: ok_head(d, b"upgrade: websocket\r\n"), 400),
    "h2c-upgrade": (
        lambda d: ok_head(
            d, b"upgrade: h2c\r\nconnection: Upgrade, HTTP2-Settings\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n"
        ),
        400,
    ),
    "connect-method": (
        lambda d: b"CONNECT " + MARK.encode() + b".example:443 HTTP/1.1\r\nhost: x\r\n\r\n",
        400,
    ),
}


def send_raw(d: Daemon, data: bytes, source: str | None = None) -> Reply:
    with connect(d, (d.setup.client_cert, d.setup.client_key), source=source) as tls:
        return exchange(tls, data)


@pytest.mark.parametrize("name", sorted(CASES))
def test_refusal_below_the_gate_is_audited_with_headers(d: Daemon, name: str) -> None:
    build, status = CASES[name]
    time.sleep(1.1)  # a fresh audit budget for this source
    reply = send_raw(d, build(d))
    assert reply.status == status, (name, reply)
    assert has_security_headers(reply), reply.headers
    error = reply.json()["error"]
    assert set(error) == {"type", "message"} and MARK not in reply.body.decode()
    assert reply.headers["connection"] == "close" and reply.headers["content-type"] == "application/json"
    rid = reply.headers["x-request-id"]
    assert wait_for(lambda: any(r.get("request_id") == rid for r in records(d)))
    rec = next(r for r in records(d) if r.get("request_id") == rid)
    assert rec["event"] == "request.refused_by_server"
    assert rec["status"] == status and rec["source_ip"] == "127.0.0.1" and rec["reason"]
    trail = "".join(p.read_text() for p in (d.setup.policy.parent / "audit").glob("*.jsonl"))
    assert MARK not in trail and MARK not in d.log()


def test_websocket_never_reaches_the_app(d: Daemon) -> None:
    """Tokenless, from an allowed address, to a real route: still refused, and no WebSocket handshake."""
    reply = send_raw(d, b"GET /v1/models?token=" + MARK.encode() + b" HTTP/1.1\r\nhost: x\r\n" + WS + b"\r\n")
    assert reply.status == 400 and "sec-websocket-accept" not in reply.headers
    assert "upgrade" in reply.json()["error"]["message"]
    assert MARK not in d.log() and "Unsupported upgrade request" not in d.log()


def test_server_refusals_are_counted(d: Daemon) -> None:
    before = metric(d, WATCHER["token"], "qwa_server_refusals_total", reason="malformed")
    send_raw(d, CASES["content-length-twice"][0](d))
    after = metric(d, WATCHER["token"], "qwa_server_refusals_total", reason="malformed")
    assert after == before + 1


def flood_malformed(d: Daemon, n: int, source: str) -> None:
    """n refusals below the gate, as fast as one client can."""
    ctx = ssl.create_default_context(cafile=str(d.setup.ca_cert))
    ctx.load_cert_chain(str(d.setup.client_cert), str(d.setup.client_key))
    for _ in range(n):
        with connect(d, None, source=source, ctx=ctx) as tls:
            assert exchange(tls, b"GET / HTTP/1.1\r\nx-a: \x01\r\n\r\n").status == 400


def flood_tokenless(d: Daemon, n: int, source: str) -> None:
    """n gate refusals (401) on one keep-alive connection."""
    with connect(d, (d.setup.client_cert, d.setup.client_key), source=source) as tls:
        for _ in range(n):
            tls.sendall(head("GET", "/v1/models", None))
            assert read_reply(tls).status == 401


def accounted(d: Daemon, event: str, ip: str, since: int, status: int | None = None) -> tuple[int, int, int]:
    """(records of their own, refusals counted in summaries, summary records) for one source."""
    recs = records(d)[since:]
    own = [
        r
        for r in recs
        if r["event"] == event and r.get("source_ip") == ip and (status is None or r.get("status") == status)
    ]
    summaries = [r for r in recs if r["event"] == "request.refusals_suppressed" and r.get("source_ip") == ip]
    return len(own), sum(int(r["suppressed"]) for r in summaries), len(summaries)


@pytest.mark.parametrize("kind", ["server", "gate"])
def test_refusal_records_are_bounded_per_source_and_nothing_is_lost(d: Daemon, kind: str) -> None:
    time.sleep(1.1)
    since = len(records(d))
    suppressed_before = metric(d, WATCHER["token"], "qwa_refusal_records_suppressed_total")
    n, ip = 60, "127.0.0.31" if kind == "server" else "127.0.0.32"
    started = time.monotonic()
    (flood_malformed if kind == "server" else flood_tokenless)(d, n, ip)
    seconds = time.monotonic() - started
    assert send_raw(d, CASES["bad-version"][0](d), source="127.0.0.33").status == 400  # another source
    event = "request.refused_by_server" if kind == "server" else "request"
    assert wait_for(
        lambda: sum(accounted(d, event, ip, since, None if kind == "server" else 401)[:2]) == n, timeout=5
    ), accounted(d, event, ip, since)
    own, summarised, summaries = accounted(d, event, ip, since, None if kind == "server" else 401)
    assert own <= LIMIT * (int(seconds) + 2), (own, seconds)  # the budget, per started second
    assert summarised >= n - LIMIT * (int(seconds) + 2) and summaries <= int(seconds) + 2
    assert accounted(d, "request.refused_by_server", "127.0.0.33", since)[0] == 1  # its own budget
    suppressed = metric(d, WATCHER["token"], "qwa_refusal_records_suppressed_total")
    assert suppressed - suppressed_before == summarised
    assert f"refusals from {ip} suppressed" in d.log()


def test_pending_summary_is_written_at_shutdown(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel
) -> None:
    """A burst just before SIGTERM: its summary is in the trail before the daemon's last record."""
    root = tmp_path_factory.mktemp("lowstop")
    port = free_port()
    setup = make_setup(
        root / "s", tiny_model, port, {"refusal_records_per_second = 20": "refusal_records_per_second = 1"}
    )
    daemon = start_daemon(setup, port, root / "daemon.log")
    try:
        flood_tokenless(daemon, 30, "127.0.0.41")
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.stop(signal.SIGKILL)
    own, summarised, _ = accounted(daemon, "request", "127.0.0.41", 0, 401)
    assert own + summarised == 30, (own, summarised)
    assert records(daemon)[-1]["event"] in ("audit.seal", "daemon.stop")


def test_malformed_request_pipelined_behind_a_good_one(d: Daemon) -> None:
    """The running request is answered in full; the bad one behind it is audited and ends the connection."""
    time.sleep(1.1)
    since = len(records(d))
    with connect(d, (d.setup.client_cert, d.setup.client_key)) as tls:
        tls.sendall(ok_head(d) + b"GET / HTTP/1.1\r\nx-a: \x01\r\n\r\n")
        first = read_reply(tls)
        assert first.status == 200 and first.json()["data"]
        assert read_reply(tls).status == REFUSED  # closed, not a second answer
    assert wait_for(lambda: any(r["event"] == "request.refused_by_server" for r in records(d)[since:]))


def test_many_spoofed_sources_stay_bounded_and_counted() -> None:
    """Thousands of source addresses (a forged X-Forwarded-For range): records, summaries and memory stay
    bounded, and every refusal is either recorded or counted in a summary."""
    import asyncio
    from typing import Any, cast

    from appliance.audit import refusals
    from appliance.audit.record import Trail

    class Sink:
        metrics = None

        def __init__(self) -> None:
            self.records: list[dict[str, Any]] = []

        async def write(self, event: str, **fields: Any) -> None:
            self.records.append({"event": event, **fields})

    async def flood() -> tuple[Sink, int, int]:
        sink = Sink()
        audit = refusals.RefusalAudit(cast(Trail, sink), lambda: 2)
        n = refusals.MAX_SOURCES + 1000
        admitted = sum(audit.admit(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}") for i in range(n))
        peak = len(audit._sources)
        await asyncio.sleep(refusals.WINDOW_S + 0.2)
        await audit.flush()
        return sink, admitted, n - peak

    sink, admitted, headroom = asyncio.run(flood())
    summaries = [r for r in sink.records if r["event"] == "request.refusals_suppressed"]
    assert admitted == 2 * refusals.GLOBAL_FACTOR  # the global budget, not 2 per forged address
    assert admitted + sum(r["suppressed"] for r in summaries) == refusals.MAX_SOURCES + 1000
    assert len(summaries) <= refusals.MAX_SOURCES + 1 and headroom >= 999
    assert any(r["source_ip"] is None and "other sources" in r["reason"] for r in summaries)
