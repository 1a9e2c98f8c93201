"""The ASGI wrapper every request passes first: request id, security headers, identity and scope.

It wraps the whole Litestar app, so 404s and errors Litestar renders itself get the same headers, and a
request without a valid identity never reaches routing.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .errors import ClientError, PayloadTooLarge, Unauthorized
from .identity import PUBLIC_PATHS, authenticate, network_gate
from .limits import ClientLimits
from .policy import Policy

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"strict-transport-security", b"max-age=63072000"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'none'"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)


def _noop() -> None:
    return None


def _check_length(scope: Scope, policy: Policy) -> None:
    """Refuse a declared body over the current limit before reading a byte of it."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            size = bytes(value).decode("latin-1").strip()
            if not size.isdigit():
                raise PayloadTooLarge("Content-Length is not a number")
            if int(size) > policy.limits.max_body_bytes:
                raise PayloadTooLarge(f"request body is larger than {policy.limits.max_body_bytes} "
                                      "bytes")


def error_body(exc: ClientError) -> bytes:
    """The one JSON error shape: `{"error": {"type": ..., "message": ...}}`."""
    return json.dumps({"error": {"type": exc.type, "message": exc.message}}).encode()


class Gate:
    """Network gate → identity → limits, before the app sees the request; headers on every response."""

    def __init__(self, app: ASGIApp, policy: Callable[[], Policy]) -> None:
        self.app = app
        self.policy = policy
        self.limits = ClientLimits()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = secrets.token_hex(12)
        policy = self.policy()  # one snapshot per request: a reload never changes it midway
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, policy=policy)
        send = self._headers(send, request_id)
        try:
            release = self._admit(scope, policy)
        except ClientError as exc:
            await self._refuse(send, exc)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            release()

    def _admit(self, scope: Scope, policy: Policy) -> Callable[[], None]:
        caller = network_gate(dict(scope), policy)
        scope["state"]["caller"] = caller
        if scope.get("path", "") in PUBLIC_PATHS:
            return _noop
        caller = authenticate(dict(scope), policy, caller)
        scope["state"]["caller"] = caller
        _check_length(scope, policy)
        assert caller.client is not None
        return self.limits.acquire(caller.client)

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
