"""The HTTP protocol of every connection: uvicorn's httptools protocol (pinned version), plus what it lacks.

uvicorn does not fill the ASGI TLS extension, so this subclass reads the verified peer certificate once per
connection and puts it into each request's scope; it also bounds each request's head and body in time and
size (slowloris), and refuses what it cannot parse through the listener, audited, never silently.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from appliance.daemon.connections import Handshake, Listener
from appliance.errors import BadRequest, ClientError, Forbidden, HeaderFieldsTooLarge
from appliance.security.tls import peer_cert

log = logging.getLogger("appliance.daemon.protocol")


# uvicorn bounds only the idle time between requests (timeout_keep_alive); these bound the request itself, so
# slow or endless headers and bodies (slowloris) cannot hold connections and memory open.
HEAD_TIMEOUT_S = 10.0  # request line and headers, from the end of the TLS handshake or the first byte
BODY_TIMEOUT_S = 60.0  # for each BODY_PROGRESS_BYTES of the body: a slow link is fine, a trickle is not
BODY_PROGRESS_BYTES = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024  # request line plus headers; httptools alone buffers any amount


class _Refused(Exception):
    """Raised from a parser callback to refuse the request below the gate; httptools stops parsing."""

    def __init__(self, exc: ClientError, reason: str, label: str) -> None:
        super().__init__(reason)
        self.exc, self.reason, self.label = exc, reason, label


def _upgrade() -> _Refused:
    return _Refused(
        BadRequest("protocol upgrades (WebSocket, h2c, CONNECT) are not served here"),
        "protocol upgrade requested (Upgrade header or CONNECT)",
        "upgrade",
    )


class CertAwareProtocol(HttpToolsProtocol):
    """Adds `scope["extensions"]["tls"]` (client certificate facts, TLS version) to every request, and
    deadlines and a size limit for each request's head and body. Refusals it makes itself (malformed
    requests, oversized heads, upgrades, connections older than the TLS policy) are audited and carry the
    security headers, like the gate's."""

    listener: Listener | None = None
    handshake: Handshake | None = None

    def attach(self, listener: Listener, handshake: Handshake) -> None:
        self.listener, self.handshake = listener, handshake

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._refusal: _Refused | None = None
        self._refusing = False
        self._arm(HEAD_TIMEOUT_S, "request headers")
        self._tls: dict[str, Any] = {"client_cert": None}
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return
        der = ssl_object.getpeercert(binary_form=True)
        self._tls = {
            "client_cert": peer_cert(der).as_scope() if der else None,
            "tls_version": ssl_object.version(),
            "cipher_suite": (ssl_object.cipher() or ("",))[0],
        }

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire, seconds, what)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, seconds: float, what: str) -> None:
        log.warning(
            "closing the connection from %s: %s not received within %.0f s", self.client, what, seconds
        )
        self._deadline = None
        self.transport.abort()

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._stop(
                _Refused(
                    HeaderFieldsTooLarge(f"request line and headers are over {MAX_HEAD_BYTES} bytes"),
                    f"request line and headers over {MAX_HEAD_BYTES} bytes",
                    "headers_too_large",
                )
            )

    def _stop(self, refusal: _Refused) -> None:
        """From a parser callback: remember why, and make httptools stop with a parse error."""
        self._refusal = refusal
        raise refusal

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """uvicorn's, but every parse failure becomes an audited refusal (uvicorn's own has neither)."""
        if self._refusing:
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._refuse(self._refusal or _malformed(exc))
        except httptools.HttpParserUpgrade:
            self._refuse(_upgrade())

    def send_400_response(self, msg: str) -> None:
        """Nothing in uvicorn answers unaudited: its 400 goes the same way as ours."""
        self._refuse(
            self._refusal
            or _Refused(BadRequest("the request could not be parsed"), "malformed HTTP request", "malformed")
        )

    def _refuse(self, refusal: _Refused) -> None:
        if self._refusing:
            return
        self._refusing = True
        self._disarm()
        if self.listener is None:  # not served by our listener (never in the daemon): plain close
            self.transport.abort()
            return
        self.transport.pause_reading()
        cert = self._tls.get("client_cert")
        idle = self.cycle is None or self.cycle.response_complete
        if not idle:  # pipelined behind a running request: that one finishes, then the connection closes
            self.cycle.keep_alive = False
        ip = self.client[0] if self.client else "unknown"
        self.listener.refuse(
            self.transport,
            ip,
            refusal.exc,
            refusal.reason,
            refusal.label,
            cert.get("cert_sha256") if cert else None,
            answer=idle,
        )

    def shutdown(self) -> None:
        """Drop idle keep-alive connections at once; a TLS close would wait up to 30 s for the peer."""
        if self.cycle is None or self.cycle.response_complete:
            self.transport.abort()
        else:
            self.cycle.keep_alive = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        if self._deadline is None:
            self._arm(HEAD_TIMEOUT_S, "request headers")
        tls: dict[object, object] = dict(self._tls.items())
        self.scope["extensions"] = {"tls": tls}

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade() or any(name == b"upgrade" for name, _ in self.headers):
            self._stop(_upgrade())  # WebSockets are off: nothing may go around the gate
        stale = self._stale()
        if stale is not None:
            self._stop(
                _Refused(
                    Forbidden(
                        "this connection was set up under TLS settings that have since changed; connect again"
                    ),
                    stale,
                    "stale_tls",
                )
            )
        self._body_bytes = 0
        self._arm(BODY_TIMEOUT_S, "request body")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes >= BODY_PROGRESS_BYTES:  # progress: the next 64 KiB get a fresh minute
            self._body_bytes = 0
            self._arm(BODY_TIMEOUT_S, "request body")
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _stale(self) -> str | None:
        """The backstop: a connection whose handshake would not pass under the TLS policy now."""
        if self.listener is None or self.handshake is None:
            return None
        return self.listener.tls.stale(self.handshake, self._tls.get("client_cert") is not None)


def _malformed(exc: Exception) -> _Refused:
    """httptools' reason is one of llhttp's fixed messages, never the request's bytes."""
    why = str(exc)[:120] if not isinstance(exc, httptools.HttpParserCallbackError) else "parser callback"
    return _Refused(
        BadRequest("the request is not valid HTTP/1.1"), f"malformed HTTP request ({why})", "malformed"
    )
