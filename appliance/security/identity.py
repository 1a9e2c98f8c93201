"""Who is asking: network gate, verified certificate, token, and the client rules that bind them together.

One client identity ties a bearer token to address ranges and a TLS certificate; every rule must hold.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from appliance.config.policy import Client, Network, Policy
from appliance.errors import BadRequest, Forbidden, MethodNotAllowed, NotFound, Unauthorized
from appliance.security.tokens import find_client
from appliance.web.routes import Route, routes_for

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NONCANONICAL = (
    "the request path is not in its one canonical spelling (no percent-encoding, no empty, '.' "
    "or '..' segments, no trailing '/', ASCII letters, digits and '._-' only)"
)

_SEGMENT = r"/[A-Za-z0-9_-][A-Za-z0-9._-]*"
_CANONICAL = re.compile(rf"/|({_SEGMENT})+")


def canonical_path(scope: dict[str, Any]) -> str:
    """The path, refused (400) unless its raw bytes are its one canonical spelling: what Litestar
    dispatches is then exactly what the table is looked up with."""
    path = str(scope.get("path", ""))
    raw = scope.get("raw_path")
    if (
        not _CANONICAL.fullmatch(path)
        or (raw is not None and bytes(raw) != path.encode("ascii"))
        or scope.get("root_path")
    ):  # Litestar would strip a root_path first
        raise BadRequest(NONCANONICAL)
    return path


def resolve(scope: dict[str, Any]) -> Route | None:
    """The one row this request will be dispatched to, or None (refused 404/405 once identified)."""
    path, method = canonical_path(scope), scope.get("method")
    return next((r for r in routes_for(path) if r.method == method), None)


def is_console(path: str) -> bool:
    """The console's own paths (the page, or one file name under its static folder), which may set a CSP."""
    return _CANONICAL.fullmatch(path) is not None and any(r.console for r in routes_for(path))


def is_public(scope: dict[str, Any]) -> bool:
    """Requests that pass the network gate without a token: health probes and the console's files, by GET
    and in their canonical spelling only."""
    try:
        route = resolve(scope)
    except BadRequest:
        return False
    return route is not None and route.scope is None


def refuse_unrouted(scope: dict[str, Any]) -> None:
    """No row for this method and path: 405 when the path has another method, else 404 (never public)."""
    rows = routes_for(canonical_path(scope))
    if rows:
        raise MethodNotAllowed(
            "method not allowed on this route", allow=tuple(sorted({r.method for r in rows}))
        )
    raise NotFound("no such route")


@dataclass(frozen=True)
class Caller:
    """What is known about the peer before and after authentication."""

    ip: str
    cert: dict[str, Any] | None
    client: Client | None = None


def _in(ip: IPAddress, nets: Iterable[Network]) -> bool:
    return any(ip.version == n.version and ip in n for n in nets)


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _joined(scope: dict[str, Any], name: bytes) -> str | None:
    """Every line of a list-valued header, in order, joined with ',' (RFC 9110 5.3): a proxy that
    appends its own line (HAProxy `option forwardfor`) is read, not the client's line before it."""
    lines = [bytes(value).decode("latin-1") for key, value in scope.get("headers", ()) if key == name]
    return ",".join(lines) if lines else None


def source_ip(scope: dict[str, Any], policy: Policy) -> IPAddress:
    """The socket peer; from a trusted proxy, the right-most X-Forwarded-For hop it did not add itself."""
    unknown = ("0.0.0.0", 0)  # noqa: S104 - never bound: a peerless scope, in no allow range  # nosec B104
    peer = ipaddress.ip_address((scope.get("client") or unknown)[0])
    if not _in(peer, policy.server.trusted_proxies):
        return peer  # nobody else's forwarding headers are read
    if _header(scope, b"forwarded") is not None:
        raise Forbidden(
            "the trusted proxy sent a Forwarded header, which this appliance does not read; "
            "configure the proxy to send X-Forwarded-For only"
        )
    forwarded = _joined(scope, b"x-forwarded-for")
    if forwarded is None:
        return peer
    for hop in reversed([h.strip() for h in forwarded.split(",")]):
        try:
            addr = ipaddress.ip_address(hop)
        except ValueError:
            raise Forbidden("X-Forwarded-For from the trusted proxy is malformed") from None
        if not _in(addr, policy.server.trusted_proxies):
            return addr
    return peer


def presented(scope: dict[str, Any], policy: Policy) -> Caller:
    """The address the gate judges and the certificate shown, before any rule: what a refusal audits."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    return Caller(ip=str(source_ip(scope, policy)), cert=tls.get("client_cert"))


def network_gate(scope: dict[str, Any], policy: Policy) -> Caller:
    """Refuse peers outside [server] allow and revoked certificates, before any token is read."""
    ip = source_ip(scope, policy)
    if not _in(ip, policy.server.allow):
        raise Forbidden("this address is not allowed to use the appliance")
    tls = (scope.get("extensions") or {}).get("tls") or {}
    cert = tls.get("client_cert")
    if cert is not None and (cert.get("problem") or not cert.get("cert_ids")):
        raise Forbidden("this client certificate cannot be identified; ask the appliance admin for a new one")
    if cert is not None and policy.server.revoked & cert_ids(cert):
        raise Forbidden("this client certificate has been revoked")
    if cert is not None and not valid_now(cert):
        raise Forbidden(
            "this client certificate has expired or is not yet valid; ask the appliance admin for a new one"
        )
    return Caller(ip=str(ip), cert=cert)


def valid_now(cert: dict[str, Any], now: dt.datetime | None = None) -> bool:
    """The handshake checked the validity window once; a keep-alive or resumed session must not outlive it."""
    now = now or dt.datetime.now(dt.timezone.utc)
    start, end = cert.get("not_before"), cert.get("not_after")
    try:
        return (start is None or dt.datetime.fromisoformat(start) <= now) and (
            end is not None and now <= dt.datetime.fromisoformat(end)
        )
    except (TypeError, ValueError):
        return False


def cert_ids(cert: dict[str, Any]) -> frozenset[str]:
    """Every fingerprint that names the presented certificate (all its valid encodings, its signed part)."""
    return frozenset(cert.get("cert_ids") or ())


def _bearer(scope: dict[str, Any]) -> str | None:
    """The bearer token; two Authorization headers are ambiguous (a proxy may read the other) and none."""
    if sum(1 for key, _ in scope.get("headers", ()) if key == b"authorization") > 1:
        return None
    value = _header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token and token.isprintable() else None


BEARER_REQUIRED = "a valid bearer token is required (Authorization: Bearer ...)"


class TokenRefused(Unauthorized):
    """Missing, unknown, disabled and expired tokens get one answer; `detail` (audit, log) says which."""

    def __init__(self, detail: str, client: Client | None = None) -> None:
        super().__init__(BEARER_REQUIRED)
        self.detail = detail
        self.client = client


def identify(scope: dict[str, Any], policy: Policy, caller: Caller, today: dt.date | None = None) -> Caller:
    """Select the client by its token; a token that names no usable client is refused alike (401)."""
    token = _bearer(scope)
    if token is None:
        raise TokenRefused("no usable bearer token (missing, malformed or sent twice)")
    client = find_client(policy.clients, token)
    if client is None:
        raise TokenRefused("unknown token")
    if client.disabled:
        raise TokenRefused(f"token of client {client.name!r}, which is disabled", client)
    if client.expires is not None and (today or dt.datetime.now(dt.timezone.utc).date()) > client.expires:
        raise TokenRefused(f"token of client {client.name!r} expired on {client.expires.isoformat()}", client)
    return Caller(ip=caller.ip, cert=caller.cert, client=client)


def authorize(scope: dict[str, Any], caller: Caller, route: Route | None) -> None:
    """Every rule bound to the identified client, then the route (404/405) and its scope."""
    client = caller.client
    assert client is not None
    ip = ipaddress.ip_address(caller.ip)
    if client.allow is not None and not _in(ip, client.allow):
        raise Forbidden("this client is not allowed from this address")
    _check_cert(client, caller.cert)
    if route is None:
        refuse_unrouted(scope)
        return
    if route.scope is not None and route.scope not in client.scopes:
        raise Forbidden(f"this client lacks the {route.scope!r} scope")


def _check_cert(client: Client, cert: dict[str, Any] | None) -> None:
    """A bound client's certificate: `cert_sha256` names one certificate in any of its encodings."""
    if client.cert_cn is None and client.cert_sha256 is None:
        return
    if cert is None:
        raise Forbidden("this client must present its TLS client certificate")
    if client.cert_sha256 is not None and client.cert_sha256 not in cert_ids(cert):
        raise Forbidden("the TLS client certificate does not belong to this client")
    if client.cert_cn is not None and cert.get("subject_cn") != client.cert_cn:
        raise Forbidden("the TLS client certificate does not belong to this client")
