"""Issue 11 defect 1: a route's scope is judged on exactly the path Litestar dispatches, in one spelling.

The route table (routes.ROUTES) is checked against the Litestar app and the OpenAPI document; a property
test cross-checks the gate with Litestar's own router over path spellings; another sends spellings for every
route, method and token scope set to a real daemon over raw mTLS sockets (httpx would normalise them).
"""

from __future__ import annotations

import itertools
import json
import socket
import ssl
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import Daemon, TinyModel, add_client, free_port, make_setup, start_daemon
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.exceptions import MethodNotAllowedException, NotFoundException
from litestar.utils import normalize_path

from appliance.audit.log import list_files
from appliance.errors import BadRequest
from appliance.security.identity import NONCANONICAL, is_public, resolve
from appliance.web import openapi
from appliance.web.app import ROUTE_HANDLERS, registered_routes
from appliance.web.routes import ROUTES

SCOPES = ("chat", "models", "metrics", "admin")
ASSETS = ("console.js", "console.css", "icon.svg")
METHODS = ("GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "TRACE", "FOO")
# Every canonical spelling the daemon serves, with the method and scope this test expects (not the code's).
SERVED: dict[tuple[str, str], str | None] = {
    ("GET", "/healthz"): None,
    ("GET", "/readyz"): None,
    ("GET", "/console"): None,
    **{("GET", f"/console/static/{a}"): None for a in ASSETS},
    ("GET", "/v1/models"): "models",
    ("GET", "/metrics"): "metrics",
    ("GET", "/api/v1/health"): "admin",
    ("GET", "/openapi.json"): "admin",
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/api/v1/chat"): "chat",
}
LOOKALIKES = {"o": "\u043e", "s": "\u017f", "k": "\u212a", "i": "\u0131", "/": "\uff0f", "a": "\u0430"}


def _pct(ch: str, upper: bool) -> str:
    text = "".join(f"%{b:02X}" for b in ch.encode())
    return text if upper else text.lower()


@st.composite
def spellings(draw: st.DrawFn) -> str:
    """A served path, mutated zero to three times the ways an attacker would try."""
    path = draw(st.sampled_from(sorted({p for _, p in SERVED})))
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(path)))
        kind = draw(
            st.sampled_from(
                [
                    "trailing",
                    "double",
                    "dot",
                    "dotdot",
                    "pct",
                    "pct-slash",
                    "pct-dots",
                    "case",
                    "params",
                    "query",
                    "lookalike",
                    "console-prefix",
                    "backslash",
                    "empty-lead",
                    "fragment",
                ]
            )
        )
        if kind == "trailing":
            path += "/"
        elif kind == "double":
            path = path[:i] + "/" + path[i:] if "/" in path[i - 1 : i] else path.replace("/", "//", 1)
        elif kind == "dot":
            path = path.replace("/", "/./", draw(st.integers(1, 2)))
        elif kind == "dotdot":
            path = "/x/.." + path
        elif kind == "pct" and i < len(path):
            path = path[:i] + _pct(path[i], draw(st.booleans())) + path[i + 1 :]
        elif kind == "pct-slash":
            path = path.replace("/", draw(st.sampled_from(["%2F", "%2f"])), draw(st.integers(1, 3)))
        elif kind == "pct-dots":
            path = "/a/%2e%2e" + path if draw(st.booleans()) else path + "/%2E"
        elif kind == "case" and i < len(path):
            path = path[:i] + path[i].swapcase() + path[i + 1 :]
        elif kind == "params":
            path += draw(st.sampled_from([";", ";x=1", ";jsessionid=a"]))
        elif kind == "query":
            path += draw(st.sampled_from(["?", "?a=b", "??"]))
        elif kind == "lookalike":
            ch = draw(st.sampled_from(sorted(LOOKALIKES)))
            path = path.replace(ch, urllib.parse.quote(LOOKALIKES[ch]), 1)
        elif kind == "console-prefix":
            path = (
                draw(
                    st.sampled_from(
                        ["/console/static/..", "/console/static/%2e%2e", "/console/static/x/../.."]
                    )
                )
                + path
            )
        elif kind == "backslash":
            path = path.replace("/", "\\", 1) if draw(st.booleans()) else path + "\\"
        elif kind == "empty-lead":
            path = "//" + path.lstrip("/")
        elif kind == "fragment":
            path += "#x"
    return path


def _decoded(raw: str) -> str:
    """What uvicorn (httptools) puts in scope["path"] for a request target."""
    path = raw.split("?", 1)[0].split("#", 1)[0]
    return urllib.parse.unquote(path) if "%" in path else path


def _expected_scope(method: str, raw: str) -> tuple[bool, str | None]:
    """(served, scope) by this test's own table: only the exact spelling is served (a query may follow)."""
    key = (method, raw.split("?", 1)[0])
    return (key in SERVED, SERVED.get(key))


# --- the one table ----------------------------------------------------------------------------------


def test_the_route_table_is_exactly_what_litestar_dispatches_and_openapi_documents() -> None:
    app = Litestar(route_handlers=ROUTE_HANDLERS, openapi_config=None)
    assert registered_routes(app) == {(r.method, r.path) for r in ROUTES}
    assert {(m, p) for m, p in SERVED if "/static/" not in p} == {
        (r.method, r.path) for r in ROUTES if "{" not in r.path
    }
    doc = openapi._paths()
    documented = {(m.upper(), p): op for p, ops in doc.items() for m, op in ops.items()}
    assert set(documented) == {(r.method, r.path) for r in ROUTES if not r.console}
    for (method, path), op in documented.items():
        scope = SERVED[(method, path)]
        assert (op.get("security") == []) is (scope is None), path
        assert scope is None or f"scope `{scope}`" in op["description"], path


# --- the gate agrees with Litestar's router (in process, many spellings) --------------------------

ROUTER = Litestar(route_handlers=ROUTE_HANDLERS, openapi_config=None).asgi_router


def _litestar_dispatches(method: str, path: str) -> str | None:
    """The path template Litestar's own router would run for this decoded path, or None."""
    try:
        _, _, _, _, template = ROUTER.handle_routing(path=normalize_path(path), method=method)
    except (NotFoundException, MethodNotAllowedException):
        return None
    return str(template) if method != "OPTIONS" else "OPTIONS " + str(template)


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=spellings(), method=st.sampled_from(METHODS))
@example(raw="/v1/chat/completions/", method="POST")
@example(raw="/api//v1/health", method="GET")
@example(raw="/console/static/../../v1/models", method="GET")
@example(raw="/v1/models%2F", method="GET")
def test_the_gate_authorises_exactly_the_route_litestar_will_dispatch(raw: str, method: str) -> None:
    target = raw.split("?", 1)[0].split("#", 1)[0]
    path = _decoded(raw)
    scope: dict[str, Any] = {"method": method, "path": path, "raw_path": target.encode()}
    served, _ = _expected_scope(method, raw.split("#", 1)[0])
    try:
        route = resolve(scope)
    except BadRequest as exc:
        assert exc.message == NONCANONICAL and not served
        assert not is_public(scope)
        return
    dispatched = _litestar_dispatches(method, path)
    if route is None:  # refused 404/405 once identified; Litestar may know the path but never runs it
        assert not served and (
            dispatched is None or dispatched.startswith("OPTIONS") or dispatched == "/console/static/{name}"
        )
        return
    assert target == scope["path"]  # one spelling only, byte for byte
    assert dispatched == route.path and route.method == method
    assert served or route.path == "/console/static/{name}"  # any other name: the handler's own 404
    assert SERVED.get((method, target), route.scope) == route.scope
    assert is_public(scope) is (route.scope is None)


# --- the real daemon ---------------------------------------------------------------------------------


@dataclass
class Paths:
    d: Daemon
    tokens: dict[frozenset[str], str] = field(default_factory=dict)
    handler_400: set[bytes] = field(default_factory=set)


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> Iterator[Paths]:
    root = tmp_path_factory.mktemp("paths")
    port = free_port()
    setup = make_setup(root / "s", tiny_model, port)
    p = Paths(d=None)  # type: ignore[arg-type]
    for n in range(len(SCOPES) + 1):
        for combo in itertools.combinations(SCOPES, n):
            if combo:
                p.tokens[frozenset(combo)] = add_client(setup.policy, "s-" + "-".join(combo), combo)
    p.tokens[frozenset()] = "qwa_not_a_token"
    p.d = start_daemon(setup, port, root / "daemon.log")
    for route in ("/v1/chat/completions", "/api/v1/chat"):  # what a chat handler itself says to `{}`
        status, _, payload = raw_request(p.d, "POST", route, setup.token, b"{}")
        assert status == 400 and NONCANONICAL.encode() not in payload
        p.handler_400.add(payload)
    try:
        yield p
    finally:
        p.d.stop()


def raw_request(
    d: Daemon,
    method: str,
    target: str,
    token: str | None,
    body: bytes | None = None,
    source: str = "127.0.0.1",
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request over mTLS with the target sent byte for byte: (status, headers, body)."""
    host, port = "127.0.0.1", int(d.url.rsplit(":", 1)[1])
    head = [f"{method} {target} HTTP/1.1", f"host: {host}:{port}", "connection: close"]
    if token is not None:
        head.append(f"authorization: Bearer {token}")
    if body is not None:
        head += ["content-type: application/json", f"content-length: {len(body)}"]
    with (
        socket.create_connection((host, port), timeout=30, source_address=(source, 0)) as sock,
        d.ssl_context().wrap_socket(sock, server_hostname=host) as tls,
    ):
        tls.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
        data = b""
        try:
            while chunk := tls.recv(65536):
                data += chunk
        except (ssl.SSLError, ConnectionResetError):
            pass
    top, _, payload = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), headers, payload


def _was_dispatched(p: Paths, status: int, payload: bytes) -> bool:
    """A handler ran: it answered 200, or the chat handlers' own 400 for the body `{}`."""
    return status == 200 or (status == 400 and payload in p.handler_400)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    raw=spellings(),
    method=st.sampled_from(METHODS),
    held=st.sampled_from([frozenset(c) for n in range(5) for c in itertools.combinations(SCOPES, n)]),
)
@example(raw="/v1/chat/completions/", method="POST", held=frozenset({"models"}))
@example(raw="/metrics/", method="GET", held=frozenset({"models"}))
@example(raw="/api//v1/health", method="GET", held=frozenset({"models"}))
@example(raw="/openapi.json/", method="GET", held=frozenset({"models"}))
@example(raw="/V1/Models", method="GET", held=frozenset({"chat"}))
@example(raw="/v1/models", method="GET", held=frozenset({"models"}))
def test_a_request_is_dispatched_only_if_the_token_holds_its_scope(
    paths: Paths, raw: str, method: str, held: frozenset[str]
) -> None:
    _check_dispatch(paths, method, raw, held)


def _check_dispatch(paths: Paths, method: str, raw: str, held: frozenset[str]) -> None:
    """Served exactly when the spelling is the table's own, the method its own and the scope held."""
    body = b"{}" if method in ("POST", "PUT", "PATCH") else None
    status, _, payload = raw_request(paths.d, method, raw, paths.tokens[held], body)
    served, needed = _expected_scope(method, raw.split("#", 1)[0])
    if _was_dispatched(paths, status, payload):
        assert served and (needed is None or needed in held), (method, raw, sorted(held), status, payload)
    elif served and (needed is None or needed in held):
        pytest.fail(f"{method} {raw} with {sorted(held)} was not served: {status} {payload!r}")


def _variants(path: str) -> list[str]:
    """One of each simple spelling trick, for the exhaustive sweep below."""
    i = path.index("/", 1) if "/" in path[1:] else len(path)
    return [
        path,
        path + "/",
        path.replace("/", "//", 1),
        path[:i] + "/." + path[i:],
        path + "/.",
        path[:1] + _pct(path[1], True) + path[2:],
        path[:1] + path[1].swapcase() + path[2:],
        path[:i] + "%2F" + path[i + 1 :] if i < len(path) else path + "%2F",
        path + "?x=1",
    ]


@pytest.mark.parametrize(("method", "path"), sorted(SERVED))
def test_every_route_every_scope_set_and_simple_spelling(paths: Paths, method: str, path: str) -> None:
    for n in range(len(SCOPES) + 1):
        for held in itertools.combinations(SCOPES, n):
            for raw in _variants(path):
                _check_dispatch(paths, method, raw, frozenset(held))
            _check_dispatch(paths, "OPTIONS" if method == "GET" else "GET", path, frozenset(held))


def _audit(d: Daemon, request_id: str) -> dict[str, Any]:
    files = list_files(d.setup.policy.parent / "audit")
    recs = [json.loads(x) for f in files for x in f.read_bytes().splitlines() if x.strip()]
    found = [r for r in recs if r.get("request_id") == request_id and r["event"] == "request"]
    assert len(found) == 1, (request_id, files, recs[-3:])
    record: dict[str, Any] = found[0]
    return record


REPORTED = [
    ("POST", "/v1/chat/completions/"),
    ("GET", "/metrics/"),
    ("GET", "/api//v1/health"),
    ("GET", "/openapi.json/"),
    ("GET", "/v1/%6Dodels"),
    ("GET", "/v1/./models"),
    ("GET", "/x/../metrics"),
    ("GET", "/console/static/../../metrics"),
    ("GET", "/console/static/%2e%2e/%2e%2e/openapi.json"),
    ("GET", "/v1/models;x"),
    ("GET", "/v1%2Fmodels"),
    ("GET", "/v1/m%D0%BEdels"),
    ("GET", "//v1/models"),
]


@pytest.mark.parametrize(("method", "target"), REPORTED)
def test_the_reported_spellings_are_refused_before_the_token_and_audited_raw(
    paths: Paths, method: str, target: str
) -> None:
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    models_only = paths.tokens[frozenset({"models"})]
    for token in (models_only, None):  # refused before identity: the same answer with or without one
        source = f"127.0.0.{10 + REPORTED.index((method, target))}"  # its own refusal budget
        status, headers, payload = raw_request(
            paths.d, method, target, token, chat if method == "POST" else None, source
        )
        assert status == 400 and json.loads(payload) == {
            "error": {"type": "invalid_request_error", "message": NONCANONICAL}
        }
        assert headers["x-content-type-options"] == "nosniff"
        rec = _audit(paths.d, headers["x-request-id"])
        assert rec["route"] == target and rec["status"] == 400 and rec.get("client") is None


@pytest.mark.parametrize(
    ("method", "target", "anonymous", "with_token"),
    [
        ("GET", "/V1/Models", 401, 404),
        ("GET", "/nothing", 401, 404),
        ("GET", "/", 401, 404),
        ("GET", "/console/static/nope.js", 404, 404),  # public route: its handler's own 404
        ("HEAD", "/healthz", 401, 405),
        ("OPTIONS", "/v1/chat/completions", 401, 405),
        ("OPTIONS", "/console", 401, 405),
        ("POST", "/console", 401, 405),
        ("PROPFIND", "/metrics", 401, 405),
        ("GET", "/v1/chat/completions", 401, 405),
        ("GET", "/v1/models?", 401, 200),
    ],
)
def test_unrouted_requests_need_the_token_and_are_never_public(
    paths: Paths, method: str, target: str, anonymous: int, with_token: int
) -> None:
    admin = paths.tokens[frozenset(SCOPES)]
    assert raw_request(paths.d, method, target, None)[0] == anonymous
    status, headers, _ = raw_request(paths.d, method, target, admin)
    assert status == with_token
    if status == 405:
        assert headers["allow"] in ("GET", "POST")


def test_only_the_consoles_exact_paths_keep_their_own_csp(paths: Paths) -> None:
    from appliance.web.console import CONSOLE_CSP

    for target in ("/console", "/console/static/console.js"):
        status, headers, _ = raw_request(paths.d, "GET", target, None)
        assert status == 200 and headers["content-security-policy"] == CONSOLE_CSP, target
    for target in ("/console/", "/console/static/../console", "/console/static/console.js/"):
        status, headers, _ = raw_request(paths.d, "GET", target, None, source="127.0.0.40")
        assert status == 400 and headers["content-security-policy"] == "default-src 'none'", target
