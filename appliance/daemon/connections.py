"""The listener below HTTP: connection caps, a TLS layer per connection from the context now in force, and
the refusals the HTTP layer makes before the gate (audited, with the security headers).

uvicorn gives asyncio one SSLContext for the server's whole life, and a live context's trust store can
only grow. Here uvicorn listens without TLS and every accepted socket gets its own TLS layer, built from
the context of the current policy: a reload changes every TLS setting (certificate, key, client CA,
client_cert mode) for the next handshake, and a request on an older connection is refused when that
connection would not pass now.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import sys
import time
from asyncio.sslproto import SSLProtocol
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from appliance.audit.log import AuditUnavailable
from appliance.audit.refusals import RefusalAudit
from appliance.config.policy import Policy, ServerPolicy
from appliance.errors import ClientError, ConfigError, ServiceUnavailable, TLSSetupError
from appliance.security.gate import SECURITY_HEADERS, error_body
from appliance.security.tls import server_context_with_ca
from appliance.web.metrics import Metrics

log = logging.getLogger("appliance.daemon.connections")

SHUTDOWN_TIMEOUT_S = 5.0  # a TLS close waits this long for the peer's close_notify (asyncio: 30 s)
SHED_LOG_INTERVAL_S = 10.0
FD_RESERVE = 256  # descriptors beyond the connection cap: listener, model, audit, pipes, libraries
_AUDIT_DOWN = ServiceUnavailable(
    "the audit trail cannot be written, so the request was refused", retry_after=5
)


@dataclass(frozen=True)
class Handshake:
    """The TLS policy one connection's handshake ran under."""

    context: ssl.SSLContext
    client_cert: str  # required | optional | off
    client_ca_sha256: str | None


class ServerTLS:
    """The context new handshakes use; a reload builds a whole new one and swaps it in."""

    def __init__(self, server: ServerPolicy) -> None:
        self.current = _handshake(server)

    def replace(self, server: ServerPolicy, file: str) -> None:
        """Build the new context first: on any failure the old one stays fully in force."""
        try:
            new = _handshake(server)
        except TLSSetupError as exc:
            ca = exc.message.startswith(f"{server.client_ca}:") and server.client_ca is not None
            key = "server.client_ca" if ca else "server.tls_cert"
            raise ConfigError(
                file,
                key,
                exc.message.split(": ", 1)[-1],
                hint=f"{exc.hint}; the running TLS settings stay in force",
            ) from None
        self.current = new

    def stale(self, old: Handshake, has_cert: bool) -> str | None:
        """Why a connection from `old` would not pass a handshake now (None: it would)."""
        now = self.current
        if now.client_cert == "required" and not has_cert:
            return "connection without a client certificate, and [server] client_cert is now required"
        if has_cert and now.client_cert != "off" and old.client_ca_sha256 != now.client_ca_sha256:
            return "client certificate verified against a client CA that is no longer configured"
        return None


def _handshake(server: ServerPolicy) -> Handshake:
    ctx, ca = server_context_with_ca(server)
    return Handshake(ctx, server.client_cert, ca)


def check_fd_budget(server: ServerPolicy, file: str) -> None:
    """The connection cap must fit the file-descriptor limit; raise the soft limit up to the hard one."""
    import resource

    need = server.max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard == resource.RLIM_INFINITY or hard >= need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
            return
        raise ConfigError(
            file,
            "server.max_connections",
            f"{server.max_connections} connections need {need} file descriptors, but the limit is {hard}",
            hint=f"set LimitNOFILE={need} or more in the unit (systemctl "
            f"edit qwen-appliance), or lower max_connections below {hard - FD_RESERVE}",
        )


class HttpProtocol(Protocol):
    """What the listener needs of the HTTP protocol class (CertAwareProtocol)."""

    transport: Any

    def attach(self, listener: Listener, handshake: Handshake) -> None: ...


class Listener:
    """uvicorn's `http` protocol factory: caps, per-connection TLS, refusals below the gate."""

    def __init__(
        self,
        protocol: Callable[..., HttpProtocol],
        tls: ServerTLS,
        policy: Callable[[], Policy],
        metrics: Metrics,
        refusals: RefusalAudit,
    ) -> None:
        self.protocol = protocol
        self.tls = tls
        self.policy = policy
        self.metrics = metrics
        self.refusals = refusals
        self.total = 0
        self.per_source: dict[str, int] = {}
        self._shed = _ShedLog()
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(
        self, config: Any, server_state: Any, app_state: Any, _loop: asyncio.AbstractEventLoop | None = None
    ) -> asyncio.BaseProtocol:
        loop = _loop or asyncio.get_running_loop()
        handshake = self.tls.current
        app = self.protocol(config=config, server_state=server_state, app_state=app_state, _loop=loop)
        app.attach(self, handshake)
        timeout = self.policy().server.handshake_timeout_s
        return GuardedTLS(self, loop, app, handshake.context, timeout)

    def admit(self, ip: str) -> str | None:
        """Count a new TCP connection, or say which cap it is over (it is then closed at once)."""
        s = self.policy().server
        if self.total >= s.max_connections:
            reason = "total_cap"
        elif self.per_source.get(ip, 0) >= s.max_connections_per_source:
            reason = "source_cap"
        else:
            self.total += 1
            self.per_source[ip] = self.per_source.get(ip, 0) + 1
            self.metrics.connections_open.set(self.total)
            return None
        self.metrics.connections_shed.labels(reason).inc()
        self._shed.note(ip, reason, s)
        return reason

    def release(self, ip: str, timed_out: bool) -> None:
        self.total -= 1
        left = self.per_source.get(ip, 1) - 1
        if left > 0:
            self.per_source[ip] = left
        else:
            self.per_source.pop(ip, None)
        self.metrics.connections_open.set(self.total)
        if timed_out:
            self.metrics.connections_shed.labels("handshake_timeout").inc()
            self._shed.note(ip, "handshake_timeout", self.policy().server)

    def refuse(
        self,
        transport: Any,
        ip: str,
        exc: ClientError,
        reason: str,
        label: str,
        cert_sha256: str | None,
        answer: bool,
    ) -> None:
        """Refuse below the gate: audit (within the per-source budget), then answer and close."""
        self.metrics.server_refusals.labels(label).inc()
        task = asyncio.get_running_loop().create_task(
            self._refuse(transport, ip, exc, reason, cert_sha256, answer)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refuse(
        self, transport: Any, ip: str, exc: ClientError, reason: str, cert_sha256: str | None, answer: bool
    ) -> None:
        request_id = secrets.token_hex(12)
        if self.refusals.admit(ip):
            log.warning(
                "refused a request from %s below the gate: %s (HTTP %d, request %s)",
                ip,
                reason,
                exc.status,
                request_id,
            )
            try:
                await self.refusals.trail.write(
                    "request.refused_by_server",
                    request_id=request_id,
                    source_ip=ip,
                    cert_sha256=cert_sha256,
                    status=exc.status,
                    reason=reason,
                )
            except AuditUnavailable:
                exc = _AUDIT_DOWN
        if answer and not transport.is_closing():  # else a response under way ends the connection
            transport.write(http_refusal(exc, request_id))
            transport.close()


def http_refusal(exc: ClientError, request_id: str) -> bytes:
    """A complete HTTP/1.1 error response in the API's JSON shape, with the gate's security headers."""
    body = error_body(exc)
    reason = _REASONS.get(exc.status, b"Error")
    head = [
        b"HTTP/1.1 %d %s" % (exc.status, reason),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
        b"x-request-id: " + request_id.encode(),
    ]
    head += [name + b": " + value for name, value in SECURITY_HEADERS]
    if exc.retry_after is not None:
        head.append(b"retry-after: %d" % exc.retry_after)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


class GuardedTLS(SSLProtocol):
    """asyncio's TLS layer for one accepted socket, counted against the caps before the handshake starts."""

    def __init__(
        self,
        listener: Listener,
        loop: asyncio.AbstractEventLoop,
        app: HttpProtocol,
        context: ssl.SSLContext,
        timeout: int,
    ) -> None:
        extra: dict[str, Any] = (
            {"ssl_shutdown_timeout": SHUTDOWN_TIMEOUT_S} if sys.version_info >= (3, 11) else {}
        )
        no_waiter = cast("asyncio.Future[Any]", None)  # failures close the socket; nobody awaits them
        super().__init__(
            loop,
            cast(asyncio.BaseProtocol, app),
            context,
            no_waiter,
            server_side=True,
            ssl_handshake_timeout=timeout,
            **extra,
        )
        self._listener = listener
        self._app = app
        self._ip: str | None = None
        self._opened = 0.0
        self._timeout = timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else "unknown"
        if self._listener.admit(ip) is not None:
            cast(asyncio.Transport, transport).abort()  # before any TLS work: a flood costs one accept each
            return
        self._ip, self._opened = ip, time.monotonic()
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._ip is not None:
            no_handshake = self._app.transport is None
            timed_out = no_handshake and time.monotonic() - self._opened >= self._timeout * 0.95
            self._listener.release(self._ip, timed_out)
            self._ip = None
        super().connection_lost(exc)


class _ShedLog:
    """At most one log line per interval about shed connections, with the counts since the last one."""

    def __init__(self) -> None:
        self._last = -SHED_LOG_INTERVAL_S
        self._counts: dict[tuple[str, str], int] = {}
        self._what: dict[str, str] = {}
        self._timer: asyncio.TimerHandle | None = None

    def note(self, ip: str, reason: str, s: ServerPolicy) -> None:
        key = (reason, ip if len(self._counts) < 1000 or (reason, ip) in self._counts else "other sources")
        self._counts[key] = self._counts.get(key, 0) + 1
        self._what = {
            "total_cap": f"over [server] max_connections = {s.max_connections}",
            "source_cap": f"over [server] max_connections_per_source = {s.max_connections_per_source}",
            "handshake_timeout": f"no TLS handshake within {s.handshake_timeout_s} s",
        }
        wait = self._last + SHED_LOG_INTERVAL_S - time.monotonic()
        if wait <= 0:
            self.flush()
        elif self._timer is None:  # the rest of this interval is reported at its end
            self._timer = asyncio.get_running_loop().call_later(wait, self.flush)

    def flush(self) -> None:
        self._timer = None
        if not self._counts:
            return
        self._last = time.monotonic()
        parts = [f"{n} from {src} ({self._what[why]})" for (why, src), n in sorted(self._counts.items())[:10]]
        more = len(self._counts) - len(parts)
        log.warning(
            "closed connections below TLS: %s%s (qwa_connections_shed_total)",
            "; ".join(parts),
            f"; and {more} more" if more > 0 else "",
        )
        self._counts.clear()


__all__ = ["GuardedTLS", "Handshake", "Listener", "ServerTLS", "check_fd_budget", "http_refusal"]
