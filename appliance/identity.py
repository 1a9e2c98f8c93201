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

from .errors import Forbidden, Unauthorized
from .policy import Client, Network, Policy
from .tokens import find_client

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
# The browser console's page and assets load before a token exists (the mTLS handshake still applies);
# everything they call needs the token. GET/HEAD only: these exact paths, or one file name under a prefix.
CONSOLE_PATHS = frozenset({"/console"})
PUBLIC_PREFIXES = ("/console/static/",)
ROUTE_SCOPES = {
    "/v1/chat/completions": "chat",
    "/api/v1/chat": "chat",
    "/v1/models": "models",
    "/metrics": "metrics",
    "/api/v1/health": "admin",
    "/openapi.json": "admin",
}


_ASSET_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9]+)+")  # one path segment: no '/', no '..'


def is_console(path: str) -> bool:
    """The console's own paths (the page, or one file name under a public prefix), which may set a CSP."""
    if path in CONSOLE_PATHS:
        return True
    prefix = next((p for p in PUBLIC_PREFIXES if path.startswith(p)), None)
    return prefix is not None and _ASSET_NAME.fullmatch(path[len(prefix):]) is not None


def is_public(scope: dict[str, Any]) -> bool:
    """Paths that pass the network gate without a token: health probes, and the console's GETs."""
    path = scope.get("path", "")
    if path in PUBLIC_PATHS:
        return True
    return scope.get("method") in ("GET", "HEAD") and is_console(path)


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


def source_ip(scope: dict[str, Any], policy: Policy) -> IPAddress:
    """The socket peer; X-Forwarded-For only when that peer is a configured trusted proxy."""
    unknown = ("0.0.0.0", 0)  # noqa: S104 - never bound: a peerless scope, in no allow range  # nosec B104
    peer = ipaddress.ip_address((scope.get("client") or unknown)[0])
    forwarded = _header(scope, b"x-forwarded-for")
    if forwarded is None or not _in(peer, policy.server.trusted_proxies):
        return peer
    for hop in reversed([h.strip() for h in forwarded.split(",")]):
        try:
            addr = ipaddress.ip_address(hop)
        except ValueError:
            raise Forbidden("X-Forwarded-For from the trusted proxy is malformed") from None
        if not _in(addr, policy.server.trusted_proxies):
            return addr
    return peer


def network_gate(scope: dict[str, Any], policy: Policy) -> Caller:
    """Refuse peers outside [server] allow and revoked certificates, before any token is read."""
    ip = source_ip(scope, policy)
    if not _in(ip, policy.server.allow):
        raise Forbidden("this address is not allowed to use the appliance")
    tls = (scope.get("extensions") or {}).get("tls") or {}
    cert = tls.get("client_cert")
    if cert and cert["cert_sha256"] in policy.server.revoked:
        raise Forbidden("this client certificate has been revoked")
    return Caller(ip=str(ip), cert=cert)


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


def identify(scope: dict[str, Any], policy: Policy, caller: Caller) -> Caller:
    """Select the client by its token; unknown and disabled tokens look the same (401)."""
    token = _bearer(scope)
    client = find_client(policy.clients, token) if token else None
    if client is None or client.disabled:
        raise Unauthorized("a valid bearer token is required (Authorization: Bearer ...)")
    return Caller(ip=caller.ip, cert=caller.cert, client=client)


def authorize(scope: dict[str, Any], caller: Caller, today: dt.date | None = None) -> None:
    """Every rule bound to the identified client, then the route's scope."""
    client = caller.client
    assert client is not None
    if client.expires is not None and (today or dt.datetime.now(dt.timezone.utc).date()) \
            > client.expires:
        raise Unauthorized(f"this token expired on {client.expires.isoformat()}; "
                           "ask the appliance admin for a new one")
    ip = ipaddress.ip_address(caller.ip)
    if client.allow is not None and not _in(ip, client.allow):
        raise Forbidden("this client is not allowed from this address")
    _check_cert(client, caller.cert)
    needed = ROUTE_SCOPES.get(scope.get("path", ""))
    if needed and needed not in client.scopes:
        raise Forbidden(f"this client lacks the {needed!r} scope")


def _check_cert(client: Client, cert: dict[str, Any] | None) -> None:
    if client.cert_cn is None and client.cert_sha256 is None:
        return
    if cert is None:
        raise Forbidden("this client must present its TLS client certificate")
    if client.cert_sha256 is not None and cert["cert_sha256"] != client.cert_sha256:
        raise Forbidden("the TLS client certificate does not belong to this client")
    if client.cert_cn is not None and cert.get("subject_cn") != client.cert_cn:
        raise Forbidden("the TLS client certificate does not belong to this client")
