"""The HTTP API (Litestar) behind the gate: the handlers of the route table and one JSON error shape.

A handler without its row in appliance/web/routes.py (or a row without its handler) stops start-up.
"""

from __future__ import annotations

import json
import logging
from typing import Any, cast

from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException

from appliance.errors import INTERNAL_ERROR, ClientError, error_type
from appliance.security import state
from appliance.security.gate import ASGIApp, Gate, error_body, internal_error_body
from appliance.web import chat, health, openapi
from appliance.web import console as webconsole
from appliance.web.routes import ROUTES
from appliance.web.runtime import Runtime

log = logging.getLogger("appliance.web.app")

ROUTE_HANDLERS = [*health.HANDLERS, *chat.HANDLERS, openapi.openapi_document, *webconsole.HANDLERS]


def _client_error(request: Request[Any, Any, Any], exc: ClientError) -> Response[bytes]:
    state.of(request.scope).audit_reason = f"{exc.type}: {exc.message}"
    headers = {"retry-after": str(exc.retry_after)} if exc.retry_after is not None else None
    return Response(error_body(exc), status_code=exc.status, media_type="application/json", headers=headers)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code if 400 <= exc.status_code < 500 else 500
    message = {
        404: "no such route",
        405: "method not allowed on this route",
        413: "request body is too large",
    }.get(status, "bad request")
    if status == 500:
        message = "internal error"
    payload = {"error": {"type": error_type(status), "message": message}}
    state.of(request.scope).audit_reason = f"{payload['error']['type']}: {message}"
    allow = (exc.headers or {}).get("allow") if status == 405 else None  # RFC 9110: a 405 names them
    return Response(
        json.dumps(payload).encode(),
        status_code=status,
        media_type="application/json",
        headers={"allow": allow} if allow else None,
    )


def _crash(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Log the failure server-side; the client learns only the request id."""
    found = state.find(request.scope)
    rid = found.request_id if found is not None else "-"
    log.error("request %s failed: %s", rid, type(exc).__name__, exc_info=exc)
    if found is not None:
        found.audit_reason = f"{INTERNAL_ERROR}: {type(exc).__name__}"
    return Response(internal_error_body(rid), status_code=500, media_type="application/json")


def registered_routes(app: Litestar) -> set[tuple[str, str]]:
    """(method, path) of every handler Litestar can dispatch, less the OPTIONS it adds by itself."""
    return {
        (method, route.path_format)
        for route in app.routes
        for method in getattr(route, "methods", {"ANY"})
        if method != "OPTIONS"
    }


def _check_routes(app: Litestar) -> None:
    """The gate authorises rows of routes.ROUTES only: a handler outside the table must not start."""
    table = {(r.method, r.path) for r in ROUTES}
    if registered_routes(app) != table:
        raise RuntimeError(
            f"HTTP routes {sorted(registered_routes(app) ^ table)} are not exactly "
            "routes.ROUTES; declare each route there with its scope"
        )


def build_app(runtime: Runtime) -> Gate:
    """The Litestar app wrapped in the gate; nothing is reachable around it."""
    app = Litestar(
        route_handlers=ROUTE_HANDLERS,
        exception_handlers={ClientError: _client_error, HTTPException: _http_error, Exception: _crash},
        request_max_body_size=runtime.policy.limits.max_body_bytes,
        openapi_config=None,
        debug=False,
        logging_config=None,
    )
    _check_routes(app)
    app.state.runtime = runtime
    return Gate(cast(ASGIApp, app), lambda: runtime.policy, runtime.trail)
