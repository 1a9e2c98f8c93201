"""The one route table: method, path, scope, public or not, for the app, the gate, metrics and OpenAPI.

Pure data and its lookup (no Litestar): a handler without its row here stops the daemon at start-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    """One row of the route table, the only source of path -> scope (gate, metrics, OpenAPI, tests)."""

    method: str
    path: str  # canonical; a last segment "{name}" stands for one console file name
    scope: str | None  # None: public (the network gate and the TLS handshake still apply)
    console: bool = False  # the console's own routes, which may set their own CSP


# The console's page and files load before a token exists (the mTLS handshake still applies); everything
# they call needs the token. A new handler must get its row here, or the daemon does not start.
ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", None),
    Route("GET", "/readyz", None),
    Route("GET", "/console", None, console=True),
    Route("GET", "/console/static/{name}", None, console=True),
    Route("GET", "/v1/models", "models"),
    Route("GET", "/metrics", "metrics"),
    Route("GET", "/api/v1/health", "admin"),
    Route("GET", "/openapi.json", "admin"),
    Route("POST", "/v1/chat/completions", "chat"),
    Route("POST", "/api/v1/chat", "chat"),
)
ROUTE_SCOPES = {r.path: r.scope for r in ROUTES if r.scope is not None}  # a derived view, for readers

_ASSET_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9]+)+")  # one path segment: no '/', no '..'


def _matches(route: Route, path: str) -> bool:
    prefix, brace, _ = route.path.partition("{")
    if not brace:
        return route.path == path
    return path.startswith(prefix) and _ASSET_NAME.fullmatch(path[len(prefix) :]) is not None


def routes_for(path: str) -> tuple[Route, ...]:
    """The rows for one canonical path (any method)."""
    return tuple(r for r in ROUTES if _matches(r, path))
