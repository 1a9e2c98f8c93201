"""Issue 11 defect 6: behind a trusted proxy, the address judged and audited is the one the proxy appended.

HAProxy `option forwardfor` adds its own X-Forwarded-For line after any the client sent; the test connects
from 127.0.0.1 (the trusted proxy) and sends the lines a proxy would pass on, over real mTLS to a real daemon.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from conftest import Daemon, TinyModel, add_client, free_port, make_setup, start_daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.audit.log import list_files
from appliance.config.load import load_policy
from appliance.security.identity import source_ip


@dataclass
class Proxied:
    d: Daemon
    branch: str  # token of a client bound to allow = 10.1.1.0/24


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> Iterator[Proxied]:
    root = tmp_path_factory.mktemp("proxied")
    port = free_port()
    setup = make_setup(
        root / "s",
        tiny_model,
        port,
        {
            "trusted_proxies = []": 'trusted_proxies = ["127.0.0.1/32", "10.9.9.9/32"]',
            'allow = ["127.0.0.0/8", "::1/128"]': 'allow = ["127.0.0.0/8", "10.0.0.0/8"]',
        },
    )
    branch = add_client(setup.policy, "branch", ("models",), allow='["10.1.1.0/24"]')
    d = start_daemon(setup, port, root / "daemon.log")
    try:
        yield Proxied(d, branch)
    finally:
        d.stop()


def ask(
    p: Proxied,
    lines: list[str],
    token: str | None = None,
    source: str | None = None,
    extra: list[tuple[str, str]] | None = None,
) -> httpx.Response:
    """GET /v1/models with these X-Forwarded-For header lines, each sent as its own line."""
    headers = [("x-forwarded-for", line) for line in lines] + (extra or [])
    with p.d.client(token=token or p.branch, source=source) as c:
        return c.get("/v1/models", headers=headers)


def audited(p: Proxied, r: httpx.Response) -> dict[str, Any]:
    """The request record of a response, by its request id."""
    rid = r.headers["x-request-id"]
    recs = [
        json.loads(x)
        for f in list_files(p.d.setup.policy.parent / "audit")
        for x in f.read_bytes().splitlines()
        if x.strip()
    ]
    found = [x for x in recs if x.get("request_id") == rid and x["event"] == "request"]
    assert len(found) == 1, rid
    record: dict[str, Any] = found[0]
    return record


def test_the_proxys_own_line_wins_over_a_forged_first_line(proxied: Proxied) -> None:
    honest = ask(proxied, ["10.1.1.5"])
    assert honest.status_code == 200 and audited(proxied, honest)["source_ip"] == "10.1.1.5"
    # The client forged an allowed address; the proxy appended the real one on its own line.
    forged = ask(proxied, ["10.1.1.5", "10.2.2.2"])
    assert forged.status_code == 403 and "not allowed from this address" in forged.text
    assert audited(proxied, forged)["source_ip"] == "10.2.2.2"
    outside = ask(proxied, ["10.1.1.5", "192.0.2.9"])  # outside [server] allow: the network gate refuses
    assert outside.status_code == 403 and "address is not allowed" in outside.text
    assert audited(proxied, outside)["source_ip"] == "192.0.2.9"  # the address judged, not the proxy's


def test_lines_and_commas_are_one_list(proxied: Proxied) -> None:
    for lines in (["10.1.1.5, 10.2.2.2"], ["10.1.1.5", "10.2.2.2"], ["10.1.1.5,10.2.2.2"]):
        r = ask(proxied, lines)
        assert r.status_code == 403 and audited(proxied, r)["source_ip"] == "10.2.2.2", lines
    # A chain of trusted proxies: each appends; the right-most hop none of them is, is the client.
    r = ask(proxied, ["10.2.2.2", "10.1.1.7", "10.9.9.9"])
    assert r.status_code == 200 and audited(proxied, r)["source_ip"] == "10.1.1.7"
    # What the client wrote left of the proxy's line is never parsed, garbage included.
    r = ask(proxied, ["not-an-address, also junk", "10.1.1.8"])
    assert r.status_code == 200 and audited(proxied, r)["source_ip"] == "10.1.1.8"
    r = ask(proxied, ["10.1.1.5", "nonsense"])  # the trusted proxy's own entry must parse
    assert r.status_code == 403 and "malformed" in r.text


def test_forwarded_header_is_refused_from_a_trusted_proxy_and_ignored_from_others(proxied: Proxied) -> None:
    r = ask(proxied, ["10.1.1.5"], extra=[("forwarded", "for=10.1.1.5")])
    assert r.status_code == 403 and "Forwarded header" in r.text
    r = ask(proxied, [], extra=[("forwarded", "for=10.1.1.5")])
    assert r.status_code == 403 and "Forwarded header" in r.text
    # Not from a trusted proxy: neither header is read; the socket address is judged (and audited).
    r = ask(proxied, ["10.1.1.5"], source="127.0.0.2", extra=[("forwarded", "for=10.1.1.5")])
    assert r.status_code == 403 and "not allowed from this address" in r.text
    assert audited(proxied, r)["source_ip"] == "127.0.0.2"
    with proxied.d.client(source="127.0.0.2") as c:
        ok = c.get("/v1/models", headers=[("x-forwarded-for", "192.0.2.9"), ("forwarded", "for=1.2.3.4")])
    assert ok.status_code == 200 and audited(proxied, ok)["source_ip"] == "127.0.0.2"


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    forged=st.lists(st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40), max_size=4),
    appended=st.ip_addresses(v=4),
    chained=st.booleans(),
)
def test_whatever_the_client_forges_the_address_is_the_one_the_proxy_appended(
    proxied: Proxied, forged: list[str], appended: ipaddress.IPv4Address, chained: bool
) -> None:
    policy = load_policy(proxied.d.setup.policy)
    if any(appended in n for n in policy.server.trusted_proxies):
        return
    lines = [*forged, str(appended)] + (
        ["10.9.9.9"] if chained else []
    )  # a second trusted proxy may add its own
    scope = {
        "client": ("127.0.0.1", 4000),
        "headers": [(b"x-forwarded-for", x.encode("latin-1")) for x in lines],
    }
    assert source_ip(scope, policy) == appended
