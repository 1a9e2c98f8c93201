"""One identity per client, enforced by the real daemon over real mTLS from several loopback sources."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import Daemon, TinyModel, add_client, free_port, issue_client_cert, make_setup, start_daemon

from appliance.admin.init import InitResult

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


@dataclass
class Gated:
    """A daemon whose policy holds one client per rule under test."""

    d: Daemon
    tokens: dict[str, str] = field(default_factory=dict)
    certs: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def post(
        self,
        who: str,
        cert: str | None = None,
        source: str | None = None,
        path: str = "/v1/chat/completions",
        **kw: object,
    ) -> httpx.Response:
        c = self.certs[cert] if cert else None
        with self.d.client(token=self.tokens.get(who, who), cert=c, source=source) as client:
            if path == "/v1/models":
                return client.get(path, **kw)  # type: ignore[arg-type]
            return client.post(path, json=CHAT, **kw)  # type: ignore[arg-type]


def prepare(setup: InitResult, g: Gated) -> None:
    for cn in ("alice", "bob", "mallory"):
        crt, key, fp = issue_client_cert(setup, cn)
        g.certs[cn] = (crt, key)
        g.certs[cn + "_fp"] = (Path(fp), Path(fp))
    alice_fp, bob_fp, mallory_fp = (str(g.certs[n + "_fp"][0]) for n in ("alice", "bob", "mallory"))
    policy = setup.policy
    text = (
        policy.read_text()
        .replace(
            'allow = ["127.0.0.0/8", "::1/128"]', 'allow = ["127.0.0.1/32", "127.0.0.2/32", "127.0.0.3/32"]'
        )
        .replace("revoked = []", f'revoked = ["{mallory_fp}"]')
    )
    policy.write_text(text)
    g.tokens.update(
        alice=add_client(policy, "alice", cert_cn='"alice"'),
        bob=add_client(policy, "bob", cert_sha256=f'"{bob_fp}"'),
        carol=add_client(policy, "carol", allow='["127.0.0.2/32"]'),
        dave=add_client(policy, "dave", expires="2020-01-01"),
        erin=add_client(policy, "erin", disabled="true"),
        frank=add_client(policy, "frank", rate='"2/minute"'),
        grace=add_client(policy, "grace", max_concurrent="1"),
    )
    g.tokens["tester"] = setup.token
    assert alice_fp != bob_fp


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> Iterator[Gated]:
    root = tmp_path_factory.mktemp("gated")
    port = free_port()
    setup = make_setup(
        root / "s",
        tiny_model,
        port,
        {"n_ctx = 4096": "n_ctx = 32768", "max_tokens = 2048": "max_tokens = 30000"},
    )
    g = Gated(d=None)  # type: ignore[arg-type]
    prepare(setup, g)
    g.d = start_daemon(setup, port, root / "daemon.log")
    try:
        yield g
    finally:
        g.d.stop()


def refused(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"], r.json()
    assert r.headers["x-content-type-options"] == "nosniff"


def test_network_gate_comes_before_the_token(gated: Gated, tmp_path: Path) -> None:
    refused(gated.post("tester", source="127.0.0.4"), 403, "address is not allowed")
    refused(gated.post("no-such-token", source="127.0.0.4"), 403, "address is not allowed")
    with gated.d.client(source="127.0.0.4") as c:
        refused(c.get("/healthz"), 403, "address is not allowed")
    assert gated.post("tester", source="127.0.0.3").status_code == 200


def test_certificate_bound_clients(gated: Gated) -> None:
    assert gated.post("alice", cert="alice").status_code == 200
    refused(gated.post("alice"), 403, "does not belong")  # tester's certificate, alice's token
    refused(gated.post("alice", cert="bob"), 403, "does not belong")
    assert gated.post("bob", cert="bob").status_code == 200
    refused(gated.post("bob", cert="alice"), 403, "does not belong")


def test_revoked_certificate_refused_even_with_valid_token(gated: Gated) -> None:
    refused(gated.post("tester", cert="mallory"), 403, "revoked")


def test_client_address_ranges_and_forwarded_for_spoofing(gated: Gated) -> None:
    assert gated.post("carol", source="127.0.0.2").status_code == 200
    refused(gated.post("carol", source="127.0.0.3"), 403, "not allowed from this address")
    refused(
        gated.post("carol", headers={"x-forwarded-for": "127.0.0.2"}), 403, "not allowed from this address"
    )


def test_scope_expiry_disabled(gated: Gated) -> None:
    refused(gated.post("alice", cert="alice", path="/v1/models"), 403, "'models' scope")
    assert gated.post("tester", path="/v1/models").status_code == 200
    refused(gated.post("dave"), 401, "valid bearer token")  # expired looks alike (issue 11)
    refused(gated.post("erin"), 401, "valid bearer token")
    unknown = gated.post("qwa_unknown")
    refused(unknown, 401, "valid bearer token")
    assert unknown.json() == gated.post("erin").json()  # a disabled token looks like an unknown one


def test_rate_limit_429_with_retry_after(gated: Gated) -> None:
    assert [gated.post("frank").status_code for _ in range(2)] == [200, 200]
    r = gated.post("frank")
    refused(r, 429, "rate limit of 2/minute")
    assert 1 <= int(r.headers["retry-after"]) <= 60


def test_concurrency_limit_429(gated: Gated) -> None:
    long = {
        "messages": [{"role": "user", "content": "long"}],
        "max_tokens": 30000,
        "temperature": 0,
        "stream": True,
    }
    with (
        gated.d.client(token=gated.tokens["grace"]) as c,
        c.stream("POST", "/v1/chat/completions", json=long) as stream,
    ):
        lines = stream.iter_lines()
        next(lines)
        r = gated.post("grace")
        refused(r, 429, "in flight")
        assert r.headers["retry-after"] == "1"
    assert gated.post("grace").status_code == 200  # the slot is free again


def test_token_header_injection_and_odd_schemes(gated: Gated) -> None:
    for value in ("Bearer " + gated.tokens["tester"] + "\tx", "bearer", "Token abc", "Bearer " + "a" * 5000):
        with gated.d.client() as c:
            r = c.post("/v1/chat/completions", json=CHAT, headers={"authorization": value})
        refused(r, 401, "valid bearer token")


def test_concurrent_clients_do_not_share_limits(gated: Gated) -> None:
    results: list[int] = []

    def run() -> None:
        results.append(gated.post("tester").status_code)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 4


def test_expired_client_certificate_fails_the_handshake(gated: Gated) -> None:
    import datetime as dt

    setup = gated.d.setup
    crt, key, _ = issue_client_cert(
        setup, "oldtimer", days=1, valid_from=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    )
    with (
        pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
        gated.d.client(cert=(crt, key)) as c,
    ):
        c.get("/healthz")
    assert gated.post("tester").status_code == 200


def scope_with(peer: str, forwarded: str | None = None) -> dict[str, object]:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    return {"client": (peer, 5000), "headers": headers, "path": "/v1/models"}


def test_forwarded_for_only_from_trusted_proxies(tmp_path: Path, tiny_model: TinyModel) -> None:
    from appliance.config.load import load_policy
    from appliance.errors import Forbidden
    from appliance.security.identity import network_gate, source_ip

    setup = make_setup(
        tmp_path / "s",
        tiny_model,
        free_port(),
        {
            "trusted_proxies = []": 'trusted_proxies = ["10.0.0.2/32"]',
            'allow = ["127.0.0.0/8", "::1/128"]': 'allow = ["10.0.0.0/24", "192.168.10.0/24"]',
        },
    )
    policy = load_policy(setup.policy)
    assert str(source_ip(scope_with("10.0.0.2", "192.168.10.7"), policy)) == "192.168.10.7"
    # A chain: the right-most address the trusted proxy did not add itself is the client.
    assert str(source_ip(scope_with("10.0.0.2", "1.2.3.4, 192.168.10.7, 10.0.0.2"), policy)) == "192.168.10.7"
    assert str(source_ip(scope_with("10.0.0.9", "192.168.10.7"), policy)) == "10.0.0.9"
    with pytest.raises(Forbidden, match="not allowed"):
        network_gate(scope_with("10.0.0.2", "8.8.8.8"), policy)
    with pytest.raises(Forbidden, match="malformed"):
        network_gate(scope_with("10.0.0.2", "not-an-ip"), policy)
