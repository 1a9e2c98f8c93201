"""Raw mutual-TLS sockets against a real daemon: handshakes, bytes httpx would not send, what came back."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import Daemon

from appliance.security.gate import SECURITY_HEADERS

REFUSED = -1  # no HTTP answer: the handshake failed, or the server closed or reset the connection
Cert = tuple[Path, Path]


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


def port(d: Daemon) -> int:
    return int(d.url.rsplit(":", 1)[1])


def context(d: Daemon, cert: Cert | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(d.setup.ca_cert))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def connect(
    d: Daemon,
    cert: Cert | None,
    source: str | None = None,
    session: ssl.SSLSession | None = None,
    ctx: ssl.SSLContext | None = None,
    timeout: float = 10,
) -> ssl.SSLSocket:
    """A completed TLS handshake (client side); raises ssl.SSLError/OSError when refused."""
    raw = socket.create_connection(
        ("127.0.0.1", port(d)), timeout=timeout, source_address=(source, 0) if source else None
    )
    try:
        return (ctx or context(d, cert)).wrap_socket(raw, server_hostname="127.0.0.1", session=session)
    except BaseException:
        raw.close()
        raise


def head(method: str, path: str, token: str | None, extra: bytes = b"") -> bytes:
    auth = b"authorization: Bearer " + token.encode() + b"\r\n" if token else b""
    return (
        method.encode() + b" " + path.encode() + b" HTTP/1.1\r\nhost: 127.0.0.1\r\n" + auth + extra + b"\r\n"
    )


def read_reply(tls: ssl.SSLSocket) -> Reply:
    """One HTTP/1.1 response (Content-Length framed); REFUSED on EOF, reset or a TLS alert."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = tls.recv(65536)
            if not chunk:
                return Reply(REFUSED)
            data += chunk
        top, _, body = data.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        size = int(headers.get("content-length", "0"))
        while len(body) < size:
            chunk = tls.recv(65536)
            if not chunk:
                break
            body += chunk
    except (ssl.SSLError, OSError):
        return Reply(REFUSED)
    return Reply(int(lines[0].split(" ")[1]), headers, body)


def exchange(tls: ssl.SSLSocket, request: bytes) -> Reply:
    try:
        tls.sendall(request)
    except (ssl.SSLError, OSError):
        return Reply(REFUSED)
    return read_reply(tls)


def ask(
    d: Daemon,
    cert: Cert | None,
    path: str = "/v1/models",
    token: str | None = None,
    source: str | None = None,
) -> int:
    """A fresh connection, one authenticated request: its status, or REFUSED."""
    try:
        tls = connect(d, cert, source=source)
    except (ssl.SSLError, OSError):
        return REFUSED
    with tls:
        return exchange(tls, head("GET", path, token or d.setup.token)).status


def served_cert(d: Daemon) -> str:
    with connect(d, (d.setup.client_cert, d.setup.client_key)) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der
    return hashlib.sha256(der).hexdigest()


def has_security_headers(reply: Reply) -> bool:
    return all(reply.headers.get(n.decode()) == v.decode() for n, v in SECURITY_HEADERS) and bool(
        reply.headers.get("x-request-id")
    )


def metric(d: Daemon, token: str, name: str, **labels: str) -> float:
    """One sample from /metrics (0 when absent), read with a token that has the metrics scope."""
    with d.client(token=token, timeout=10) as c:
        text = c.get("/metrics").text
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split(" ")[1])
    return 0.0
