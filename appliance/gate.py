"""The ASGI wrapper every request passes first: request id, security headers, identity and scope.

It wraps the whole Litestar app, so 404s and errors Litestar renders itself get the same headers, and a
request without a valid identity never reaches routing.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .errors import ClientError, Forbidden, Unauthorized
from .policy import Client
from .tokens import find_client

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"strict-transport-security", b"max-age=63072000"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
ROUTE_SCOPES = {
    "/v1/chat/completions": "chat",
    "/api/v1/chat": "chat",
    "/v1/models": "models",
}


def error_body(exc: ClientError) -> bytes:
    """The one JSON error shape: `{"error": {"type": ..., "message": ...}}`."""
    return json.dumps({"error": {"type": exc.type, "message": exc.message}}).encode()


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = bytes(value).decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class Gate:
    """Authenticates and authorises before the app sees the request."""

    def __init__(self, app: ASGIApp, clients: Callable[[], tuple[Client, ...]]) -> None:
        self.app = app
        self.clients = clients

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = request_id
        send = self._headers(send, request_id)
        try:
            self._admit(scope)
        except ClientError as exc:
            await self._refuse(send, exc)
            return
        await self.app(scope, receive, send)

    def _admit(self, scope: Scope) -> None:
        path = scope.get("path", "")
        if path in PUBLIC_PATHS:
            return
        token = _bearer(scope)
        client = find_client(self.clients(), token) if token else None
        if client is None:
            raise Unauthorized("a valid bearer token is required (Authorization: Bearer ...)")
        needed = ROUTE_SCOPES.get(path)
        if needed and needed not in client.scopes:
            raise Forbidden(f"client {client.name!r} lacks the {needed!r} scope")
        scope["state"]["client"] = client

    @staticmethod
    def _headers(send: Send, request_id: str) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", [])
                           if h[0].lower() not in (b"server", b"x-request-id")]
                headers.extend(SECURITY_HEADERS)
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)
        return wrapped

    @staticmethod
    async def _refuse(send: Send, exc: ClientError) -> None:
        body = error_body(exc)
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        if isinstance(exc, Unauthorized):
            headers.append((b"www-authenticate", b'Bearer realm="qwen-appliance"'))
        if exc.retry_after is not None:
            headers.append((b"retry-after", str(exc.retry_after).encode()))
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
