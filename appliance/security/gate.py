"""The ASGI wrapper every request passes first: request id, security headers, identity and scope.

It wraps the whole Litestar app, so 404s and errors Litestar renders itself get the same headers, and a
request without a valid identity never reaches routing.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from appliance.audit.log import AuditUnavailable
from appliance.audit.record import Trail
from appliance.audit.refusals import RefusalAudit
from appliance.config.policy import Policy
from appliance.errors import (
    INTERNAL_ERROR,
    ClientError,
    MethodNotAllowed,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
)
from appliance.security.identity import (
    Caller,
    TokenRefused,
    authorize,
    identify,
    is_console,
    network_gate,
    presented,
    resolve,
)
from appliance.security.ratelimit import ClientLimits
from appliance.security.state import RequestState, begin, of

log = logging.getLogger("appliance.security.gate")
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


_AUDIT_DOWN = ServiceUnavailable(
    "the audit trail cannot be written, so the request was refused", retry_after=5
)


def _is_stream(message: Message) -> bool:
    return any(
        k.lower() == b"content-type" and v.startswith(b"text/event-stream")
        for k, v in message.get("headers", [])
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
                raise PayloadTooLarge(f"request body is larger than {policy.limits.max_body_bytes} bytes")


def error_body(exc: ClientError) -> bytes:
    """The one JSON error shape: `{"error": {"type": ..., "message": ...}}`."""
    return json.dumps({"error": {"type": exc.type, "message": exc.message}}).encode()


def internal_error_body(request_id: str) -> bytes:
    """The same shape for a failure of our own: the client learns only the id to quote."""
    return json.dumps(
        {
            "error": {
                "type": INTERNAL_ERROR,
                "message": f"internal error; quote request id {request_id} to the admin",
            }
        }
    ).encode()


class Gate:
    """Network gate → identity → limits, before the app sees the request; audit and headers on every
    response."""

    def __init__(self, app: ASGIApp, policy: Callable[[], Policy], trail: Trail) -> None:
        self.app = app
        self.policy = policy
        self.trail = trail
        self.limits = ClientLimits()
        self.refusals = RefusalAudit(trail, lambda: self.policy().server.refusal_records_per_second)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # WebSockets and lifespan are off in the server: nothing else passes
            log.error("refused an ASGI %r scope: only HTTP requests pass the gate", scope["type"])
            return
        request_id = secrets.token_hex(12)
        policy = self.policy()  # one snapshot per request: a reload never changes it midway
        state = begin(scope, request_id, policy)
        send = self._headers(send, request_id, keep_csp=is_console(scope.get("path", "")))
        try:
            release = self._admit(scope, state)
        except ClientError as exc:
            detail = f" ({exc.detail})" if exc.detail else ""  # the admin's reason, never sent
            state.audit_reason = f"{exc.type}: {exc.message}{detail}"
            self._count(scope, exc.status)
            await self._refuse_audited(scope, send, exc)
            return
        try:
            await self.app(scope, receive, self._audited(scope, send))
        finally:
            release()  # and a stream that ended early is recorded; complete() never raises into uvicorn
            await self.trail.complete(scope, reason="stream ended early (client disconnected or error)")

    async def _refuse_audited(self, scope: Scope, send: Send, exc: ClientError) -> None:
        """Every refusal is recorded (beyond the per-source budget: counted and summarised); if the
        record cannot be written, the answer is 503."""
        fields = self.trail.request_fields(scope, exc.status)
        if self.refusals.admit(str(fields.get("source_ip"))):
            try:
                await self.trail.write("request", **fields)
            except AuditUnavailable:
                exc = _AUDIT_DOWN
        await self._refuse(send, exc)

    def _count(self, scope: Scope, status: int) -> None:
        metrics, state = self.trail.metrics, of(scope)
        if metrics is not None:
            metrics.observe_response(scope.get("path", ""), status, state.client_name, state.audit_reason)

    def _audited(self, scope: Scope, send: Send) -> Send:
        """Record before the first byte (and at the end of a stream); no record, no answer."""
        swallow = streaming = False
        state = of(scope)

        async def wrapped(message: Message) -> None:
            nonlocal swallow, streaming
            if message["type"] == "http.response.start":
                self._count(scope, int(message["status"]))
                streaming = _is_stream(message)
                state.stream_open = streaming
                fields = self.trail.request_fields(scope, int(message["status"]))
                try:
                    await self.trail.write("request", streaming=streaming or None, **fields)
                except AuditUnavailable:
                    swallow, state.stream_open = True, False  # refused: no stream to complete
                    await self._refuse(send, _AUDIT_DOWN)
                    return
            elif message["type"] == "http.response.body":
                if swallow:
                    return
                if streaming and not message.get("more_body", False) and not await self.trail.complete(scope):
                    message = {
                        "type": "http.response.body",
                        "more_body": False,  # no record: no clean end
                        "body": b"data: " + error_body(_AUDIT_DOWN) + b"\n\n",
                    }
            await send(message)

        return wrapped

    def _admit(self, scope: Scope, state: RequestState) -> Callable[[], None]:
        """Network gate, one canonical path, token, the client's rules and the route's scope, in order."""
        policy = state.policy
        state.caller = presented(dict(scope), policy)  # a refusal audits the address judged
        caller = state.caller = network_gate(dict(scope), policy)
        route = resolve(dict(scope))  # 400 for any other spelling, before a token is read
        if route is not None and route.scope is None:
            return _noop
        try:
            caller = identify(dict(scope), policy, caller)
        except TokenRefused as exc:
            if exc.client is not None:  # disabled or expired: the admin's record names the client
                state.caller = Caller(ip=caller.ip, cert=caller.cert, client=exc.client)
                log.warning("request %s refused: %s", state.request_id, exc.detail)
            raise
        state.caller = caller  # known from here on: audited even if refused below
        authorize(dict(scope), caller, route)
        _check_length(scope, policy)
        assert caller.client is not None
        return self.limits.acquire(caller.client)

    @staticmethod
    def _headers(send: Send, request_id: str, keep_csp: bool = False) -> Send:
        """Security headers on every response; only console routes may set their own CSP."""
        # The gate's own values win (no duplicates); only console routes may keep their own CSP.
        ours = (
            b"server",
            b"x-request-id",
            b"cache-control",
            b"strict-transport-security",
            b"x-content-type-options",
            b"x-frame-options",
            b"referrer-policy",
        )
        dropped = ours if keep_csp else (*ours, b"content-security-policy")

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() not in dropped]
                own_csp = any(h[0].lower() == b"content-security-policy" for h in headers)
                headers.extend(
                    h for h in SECURITY_HEADERS if not (own_csp and h[0] == b"content-security-policy")
                )
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        return wrapped

    @staticmethod
    async def _refuse(send: Send, exc: ClientError) -> None:
        body = error_body(exc)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if isinstance(exc, Unauthorized):
            headers.append((b"www-authenticate", b'Bearer realm="qwen-appliance"'))
        if isinstance(exc, MethodNotAllowed):
            headers.append((b"allow", ", ".join(exc.allow).encode()))
        if exc.retry_after is not None:
            headers.append((b"retry-after", str(exc.retry_after).encode()))
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
