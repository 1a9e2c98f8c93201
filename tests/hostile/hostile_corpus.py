"""The hostile corpus: named requests a penetration tester would send, each with the status it must get.

Each case is a function of the running daemon that returns the HTTP status it got (0: the TLS layer refused
the connection). tests/hostile/test_hostile.py sends them all and checks the daemon afterwards.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import ssl
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from conftest import Daemon, data_uri, png_bytes
from PIL import Image

TLS_REFUSED = 0


@dataclass(frozen=True)
class Target:
    """What a case needs to reach the daemon: the daemon, its set-up folder and a few certificates."""

    d: Daemon
    root: Path
    certs: dict[str, tuple[Path, Path]]

    @property
    def port(self) -> int:
        return int(self.d.url.rsplit(":", 1)[1])


Send = Callable[[Target], int]


@dataclass(frozen=True)
class Case:
    name: str
    send: Send
    expect: int


# --- how requests are sent -------------------------------------------------------------------------


def post(
    path: str, body: Any = None, content: bytes | None = None, headers: dict[str, str] | None = None
) -> Send:
    def go(t: Target) -> int:
        with t.d.client(timeout=60) as c:
            return c.post(path, json=body, content=content, headers=headers).status_code

    return go


def chat(content: Any, **extra: Any) -> Send:
    return post(
        "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}
    )


def image(url: str) -> Send:
    return chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}])


def api_image(value: str) -> Send:
    return post("/api/v1/chat", {"prompt": "describe", "image": value, "max_tokens": 2})


def raw_body(body: bytes, ctype: str = "application/json") -> Send:
    return post("/v1/chat/completions", content=body, headers={"content-type": ctype})


def raw(head: Callable[[Target], bytes], body: bytes = b"") -> Send:
    """Bytes straight onto a mutual-TLS socket, for what httpx refuses to send (CR, LF, NUL, duplicates)."""

    def go(t: Target) -> int:
        ctx = t.d.ssl_context()
        with (
            socket.create_connection(("127.0.0.1", t.port), timeout=30) as s,
            ctx.wrap_socket(s, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(head(t) + body)
            return status_of(tls)

    return go


def status_of(tls: ssl.SSLSocket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = tls.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else -1


def request_head(
    auth: bytes | None = None,
    extra: bytes = b"",
    length: int | None = 0,
    path: bytes = b"/v1/chat/completions",
) -> Callable[[Target], bytes]:
    def build(t: Target) -> bytes:
        token = auth if auth is not None else b"Bearer " + t.d.setup.token.encode()
        size = b"" if length is None else b"content-length: %d\r\n" % length
        return (
            b"POST " + path + b" HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: " + token + b"\r\n"
            b"content-type: application/json\r\n" + size + extra + b"\r\n"
        )

    return build


SMALL = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()


def raw_chat(auth: Callable[[Target], bytes] | bytes | None = None, extra: bytes = b"") -> Send:
    def go(t: Target) -> int:
        token = auth(t) if callable(auth) else auth
        return raw(request_head(token, extra, len(SMALL)), SMALL)(t)

    return go


def tls_attempt(cert: str | None = None, version: ssl.TLSVersion | None = None) -> Send:
    """A handshake that must fail: no certificate, a foreign or expired one, or an old TLS version."""

    def go(t: Target) -> int:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(t.d.setup.ca_cert))
        if version is not None:
            with warnings.catch_warnings():  # TLS 1.0 and 1.1 are deprecated: that is the point
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx.minimum_version = ctx.maximum_version = version
            ctx.set_ciphers("ALL:@SECLEVEL=0")
        if cert is not None:
            ctx.load_cert_chain(*map(str, t.certs[cert]))
        try:
            with (
                socket.create_connection(("127.0.0.1", t.port), timeout=10) as s,
                ctx.wrap_socket(s, server_hostname="127.0.0.1") as tls,
            ):
                tls.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
                got = status_of(tls)  # TLS 1.3: the server's verdict on the certificate comes after
        except (ssl.SSLError, ConnectionError):
            return TLS_REFUSED
        return TLS_REFUSED if got == -1 else got

    return go


# --- hostile images --------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes whose header claims width x height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 4096, 9))
        + png_chunk(b"IEND", b"")
    )


def encoded(fmt: str, size: tuple[int, int], **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (0, 0, 0)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def corrupt_png() -> bytes:
    data = bytearray(png_bytes(size=(32, 32)))
    data[40:60] = b"\xff" * 20  # inside IDAT: CRC and deflate stream broken
    return bytes(data)


def polyglot_png_zip() -> bytes:
    """A valid PNG with a ZIP archive appended (the GIFAR idea): only the pixels go anywhere."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.sh", "#!/bin/sh\nid\n")
    return png_bytes(size=(16, 16)) + buf.getvalue()


def gifar() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
    return encoded("GIF", (8, 8)) + buf.getvalue()


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><script>alert(1)</script></svg>'
B64 = base64.b64encode(png_bytes(size=(16, 16))).decode()


def image_cases() -> list[Case]:
    return [
        Case("png-bomb-20000x20000", image(data_uri(png_claiming(20000, 20000))), 413),
        Case("png-bomb-real-5000x5000", image(data_uri(encoded("PNG", (5000, 5000), optimize=False))), 413),
        Case(
            "webp-bomb-lossless-3000x3000",
            image(data_uri(encoded("WEBP", (3000, 3000), lossless=True), "image/webp")),
            413,
        ),
        Case("png-0x0", image(data_uri(png_claiming(0, 0))), 400),
        Case("png-1x100000", image(data_uri(png_claiming(1, 100000))), 413),
        Case("png-truncated", image(data_uri(png_bytes()[:80])), 400),
        Case("png-corrupt-idat", image(data_uri(corrupt_png())), 400),
        Case("jpeg-truncated", image(data_uri(encoded("JPEG", (64, 64))[:300], "image/jpeg")), 400),
        Case(
            "jpeg-corrupt-after-soi",
            image(data_uri(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 50, "image/jpeg")),
            400,
        ),
        Case("gif-refused", image(data_uri(encoded("GIF", (8, 8)))), 415),
        Case("bmp-refused", image(data_uri(encoded("BMP", (8, 8)))), 415),
        Case("tiff-refused", image(data_uri(encoded("TIFF", (8, 8)))), 415),
        Case("ico-refused", image(data_uri(encoded("ICO", (16, 16)))), 415),
        Case("svg-as-png-refused", image(data_uri(SVG)), 415),
        Case("svg-mime-refused", image(data_uri(SVG, "image/svg+xml")), 400),
        Case("polyglot-png-zip-decoded-as-png", image(data_uri(polyglot_png_zip())), 200),
        Case("gifar-refused", image(data_uri(gifar())), 415),
        Case(
            "base64-with-spaces",
            image("data:image/png;base64," + " ".join(B64[i : i + 8] for i in range(0, 64, 8)) + B64[64:]),
            400,
        ),
        Case("base64-mime-line-breaks", image("data:image/png;base64," + B64[:76] + "\r\n" + B64[76:]), 400),
        Case("base64-padding-stripped", image("data:image/png;base64," + B64.rstrip("=") + "A"), 400),
        Case("base64-extra-padding", image("data:image/png;base64," + B64 + "=="), 400),
        Case(
            "base64-urlsafe-alphabet",
            image("data:image/png;base64," + B64.replace("/", "_").replace("+", "-") + "-_"),
            400,
        ),
        Case("base64-huge-2MB", image("data:image/png;base64," + "A" * 2_000_000), 413),
        Case("data-uri-unicode-case-fold", image("data:image/png;ba\u017fe64," + B64), 400),
        Case("data-uri-not-base64", image("data:image/png;utf8,\x89PNG"), 400),
        Case("data-text-html", image("data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg=="), 400),
        Case(
            "ten-thousand-image-parts",
            chat([{"type": "image_url", "image_url": {"url": data_uri(png_bytes(size=(1, 1)))}}] * 10_000),
            400,
        ),
    ]


def url_cases() -> list[Case]:
    schemes = [
        "http://169.254.169.254/latest/meta-data/",
        "https://example.com/a.png",
        "file:///etc/passwd",
        "ftp://host/a.png",
        "gopher://127.0.0.1:6379/_INFO",
        "dict://127.0.0.1:11211/stats",
        "ldap://host/dc=x",
        "smb://host/share/a.png",
        "jar:http://host/a.jar!/a.png",
        "javascript:alert(1)",
        "blob:https://host/uuid",
        "ws://127.0.0.1/",
        "//host/a.png",
        "\\\\host\\share\\a.png",
    ]
    return [Case(f"url-{u.split(':')[0].strip('/') or 'unc'}", image(u), 400) for u in schemes]


def path_cases() -> list[Case]:
    return [
        Case("path-inside-data-dir", api_image("scan.png"), 200),
        Case("path-dotdot", api_image("../secret.png"), 400),
        Case("path-dotdot-nested", api_image("sub/../../secret.png"), 400),
        Case("path-url-encoded-dotdot", api_image("%2e%2e/secret.png"), 400),
        Case("path-absolute-outside", api_image("/etc/passwd"), 400),
        Case("path-proc-self", api_image("/proc/self/environ"), 400),
        Case("path-symlink-outside", api_image("link.png"), 400),
        Case("path-nul-byte", api_image("scan.png\x00.txt"), 400),
        Case("path-windows-separators", api_image("..\\..\\secret.png"), 400),
        Case("path-windows-drive", api_image("C:\\Windows\\win.ini"), 400),
        Case("path-fifo", api_image("pipe.png"), 400),
        Case("path-directory", api_image("sub"), 400),
        Case("path-file-url", api_image("file:///etc/passwd"), 400),
    ]


# --- hostile bodies ---------------------------------------------------------------------------------


def numeric_cases() -> list[Case]:
    """Negative, huge, NaN, infinite, fractional and mistyped numbers in every numeric field."""
    bad: dict[str, list[str]] = {
        "max_tokens": ["-1", "0", "1e308", "NaN", "Infinity", "2.5", '"2"', "true", str(10**30)],
        "temperature": ["-0.1", "1e308", "NaN", "-Infinity", '"0.5"'],
        "top_p": ["-1", "1.5", "NaN", "[]"],
        "seed": [str(2**64), str(-(2**63) - 1), "NaN", "1.5", '"7"', "false"],
        "n": ["2", "0", "-1", "NaN", "true"],
    }
    cases = []
    for field, values in bad.items():
        for v in values:
            body = (
                b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"'
                + field.encode()
                + b'":'
                + v.encode()
                + b"}"
            )
            if field == "max_tokens":
                body = b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":' + v.encode() + b"}"
            cases.append(Case(f"number-{field}={v}", raw_body(body), 400))
    return cases


def body_cases() -> list[Case]:
    many = [{"role": "user", "content": "x"}] * 10_000
    return [
        Case("invalid-utf8-body", raw_body(b'{"messages":[{"role":"user","content":"\xff\xfe\xc0"}]}'), 400),
        Case("utf16-body", raw_body('{"messages":[{"role":"user","content":"hi"}]}'.encode("utf-16")), 400),
        Case("lone-surrogate-escape", raw_body(b'{"messages":[{"role":"user","content":"\\ud800"}]}'), 400),
        Case("nested-arrays-100k", raw_body(b"[" * 100_000 + b"]" * 100_000), 400),
        Case("nested-objects-100k", raw_body(b'{"a":' * 100_000 + b"1" + b"}" * 100_000), 400),
        Case("ten-thousand-messages", post("/v1/chat/completions", {"messages": many, "max_tokens": 2}), 400),
        Case("unknown-fields-ignored", chat("hi", tools=[{"x": 1}], logit_bias={"1": 100}, user="u"), 200),
        Case("nul-in-prompt-is-text", chat("a\x00b"), 200),
        Case("not-an-object", raw_body(b'["messages"]'), 400),
        Case("ctype-text-plain", raw_body(SMALL, "text/plain"), 415),
        Case("ctype-form", raw_body(b"messages=hi", "application/x-www-form-urlencoded"), 415),
        Case("ctype-multipart", raw_body(b"--b\r\n\r\nhi\r\n--b--", "multipart/form-data; boundary=b"), 415),
        Case("ctype-json-lookalike", raw_body(SMALL, "application/json-patch+json"), 415),
        Case("body-over-limit-declared", raw(request_head(length=3_500_000)), 413),
        Case(
            "chunked-body-over-limit",
            post(
                "/v1/chat/completions",
                content=iter([b" " * 1_000_000] * 4),
                headers={"content-type": "application/json"},
            ),
            413,
        ),
        Case(
            "content-length-not-a-number",
            raw(request_head(length=None, extra=b"content-length: 1e3\r\n")),
            400,
        ),
    ]


# --- hostile headers and TLS -----------------------------------------------------------------------


def _token_with(suffix: bytes) -> Callable[[Target], bytes]:
    return lambda t: b"Bearer " + t.d.setup.token.encode() + suffix


def header_cases() -> list[Case]:
    return [
        Case("token-cr-injection", raw_chat(_token_with(b"\rX-Injected: 1")), 400),
        Case("token-lf-injection", raw_chat(_token_with(b"\nX-Injected: 1")), 400),
        Case("token-nul", raw_chat(_token_with(b"\x00")), 400),
        Case("token-latin1", raw_chat(b"Bearer t\xf6ken"), 401),
        Case("token-huge-8k", raw_chat(b"Bearer " + b"a" * 8000), 401),
        Case("authorization-twice-valid-first", raw_chat(extra=b"authorization: Bearer junk\r\n"), 401),
        Case("authorization-twice-valid-last", raw_dup_auth(), 401),
        Case("content-length-twice", raw_chat(extra=b"content-length: 5\r\n"), 400),
        Case("content-length-and-chunked", raw_chat(extra=b"transfer-encoding: chunked\r\n"), 400),
        Case("obsolete-line-folding", raw_chat(extra=b"x-a: 1\r\n folded\r\n"), 400),
        Case(
            "headers-over-64k",
            raw_chat(extra=b"".join(b"x-pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(80))),
            431,
        ),
        Case(
            "forwarded-for-spoof-ignored",
            post(
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                headers={"x-forwarded-for": "10.9.9.9"},
            ),
            200,
        ),
    ]


def raw_dup_auth() -> Send:
    def go(t: Target) -> int:
        token = b"Bearer " + t.d.setup.token.encode()
        return raw(request_head(b"Bearer junk", b"authorization: " + token + b"\r\n", len(SMALL)), SMALL)(t)

    return go


def tls_cases() -> list[Case]:
    return [
        Case("tls-without-client-certificate", tls_attempt(), TLS_REFUSED),
        Case("tls-1.0", tls_attempt("tester", ssl.TLSVersion.TLSv1), TLS_REFUSED),
        Case("tls-1.1", tls_attempt("tester", ssl.TLSVersion.TLSv1_1), TLS_REFUSED),
        Case("tls-expired-client-certificate", tls_attempt("expired"), TLS_REFUSED),
        Case("tls-foreign-ca-certificate", tls_attempt("foreign"), TLS_REFUSED),
        Case("tls-1.2-with-certificate", tls_attempt("tester", ssl.TLSVersion.TLSv1_2), 200),
    ]


def all_cases() -> list[Case]:
    return (
        image_cases()
        + url_cases()
        + path_cases()
        + numeric_cases()
        + body_cases()
        + header_cases()
        + tls_cases()
    )


def quick(t: Target) -> httpx.Response:
    """An authenticated request through the whole gate, cheap: proof that the daemon still serves."""
    with t.d.client(timeout=30) as c:
        return c.get("/v1/models")
