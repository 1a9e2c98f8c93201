"""How `ask` fails: each refusal or transport failure as one line with a hint, and an exit code of its own.

Scripts tell the cases apart by the exit code alone; the codes below are the only declaration of them.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx

from appliance.errors import ApplianceError
from appliance.text import one_line

EXIT_USAGE, EXIT_TLS, EXIT_CONNECT = 2, 8, 9
# HTTP status -> (exit code, label): the label starts the refusal's line and names the code in `ask --help`.
REFUSALS = {
    401: (3, "token rejected"),
    403: (4, "not allowed"),
    413: (5, "too large"),
    429: (6, "rate limited"),
    503: (7, "appliance busy"),
}
EXIT_HELP = (
    f"Exit codes: 0 answered, {EXIT_USAGE} bad input or other 4xx, "
    + "".join(f"{code} {label} ({status}), " for status, (code, label) in REFUSALS.items())
    + f"{EXIT_TLS} TLS handshake failed, {EXIT_CONNECT} cannot connect, 1 other."
)


class AskError(ApplianceError):
    """A refusal or failure, reported as one line with a hint and its own exit code."""

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int = 1) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code


_HINTS = {
    401: "the token is unknown, disabled or expired (the appliance answers these alike; its audit trail "
    "says which): run `qwen-appliance client setup` again with the token the admin issued, or ask "
    "the admin for a new one",
    403: "ask the appliance admin to check this client's scopes, address range and certificate",
    413: "send a smaller image: crop it or export it at a lower resolution",
    415: "send PNG, JPEG or WebP images",
    400: "check the question, the images and --max-tokens",
}


def refusal(status: int, body: bytes, headers: httpx.Headers) -> AskError:
    """The server's own message (already safe to show) on one line, a hint, and the status's exit code."""
    try:
        message = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = "no details"
    message = one_line(message)
    retry = headers.get("retry-after", "")
    if status in REFUSALS:
        code, label = REFUSALS[status]
    elif status < 500:
        code, label = EXIT_USAGE, f"refused ({status})"
    else:
        code, label = 1, f"appliance error ({status})"
    hint = _HINTS.get(status)
    if status in (429, 503):
        wait = f"{retry} s" if retry.isdigit() else "a moment"
        message, hint = f"{message}; retry after {wait}", f"wait {wait} and ask again"
    if status >= 500:
        hint = f"quote request id {one_line(headers.get('x-request-id', '-'), 40)} to the appliance admin"
    return AskError(f"{label}: {message}", hint=hint, exit_code=code)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def transport_failure(exc: httpx.TransportError, server: str, ctx: ssl.SSLContext) -> AskError:
    """TLS trouble is exit 8, an unreachable server 9, anything else 1; each with what to check."""
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return AskError(
                f"TLS handshake failed: the server's certificate is not trusted "
                f"({one_line(cause.verify_message or str(cause))})",
                hint="check the profile's CA file and that the URL's host name is in the server certificate",
                exit_code=EXIT_TLS,
            )
        if isinstance(cause, ssl.SSLError):
            return AskError(
                f"TLS handshake failed ({one_line(cause.reason or str(cause))})",
                hint="check the client certificate and CA in the profile",
                exit_code=EXIT_TLS,
            )
    if isinstance(exc, httpx.RemoteProtocolError) and _refused_after_handshake(server, ctx):
        return AskError(
            "TLS handshake failed: the appliance did not accept this client certificate",
            hint="check that the profile has the certificate the admin issued, that it has not "
            "expired, and that it was signed by the appliance's CA",
            exit_code=EXIT_TLS,
        )
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        reason = (
            "connection refused"
            if any(isinstance(c, ConnectionRefusedError) for c in _causes(exc))
            else one_line(str(exc))
        )
        return AskError(
            f"cannot reach {server}: {reason}",
            hint="check the URL and port, and that the appliance is running",
            exit_code=EXIT_CONNECT,
        )
    if isinstance(exc, httpx.TimeoutException):
        return AskError(f"no answer from {server} in time", hint="try again, or raise --timeout")
    return AskError(
        f"the connection to {server} failed ({one_line(str(exc)) or type(exc).__name__})",
        hint="try again; if it persists, tell the appliance admin",
    )


def _refused_after_handshake(server: str, ctx: ssl.SSLContext) -> bool:
    """Under TLS 1.3 a refused client certificate shows up only as a silent close after the handshake.

    Ask once more for /healthz on a bare TLS socket: no answer at all means the certificate was refused.
    """
    parts = urlsplit(server)
    host, port = parts.hostname or "", parts.port or 443
    try:
        with (
            socket.create_connection((host, port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            return tls.recv(1) == b""
    except ssl.SSLError:
        return True
    except OSError:
        return False
