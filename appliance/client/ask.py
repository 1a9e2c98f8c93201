"""`qwen-appliance ask` and `client setup`: the command-line client for branch staff.

A profile file (0600) holds what the admin issued: server URL, CA, client certificate and key (or a
PKCS#12 file and its password) and the bearer token. `ask` streams the answer as it is generated and turns
every refusal into one line on stderr and its own exit code, so scripts can tell them apart.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import re
import secrets
import socket
import ssl
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx
import tomlkit
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from appliance.errors import ApplianceError, SetupError
from appliance.security import pki

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOCAL_IMAGE_LIMIT = 10_000_000  # the server has its own limit; this one spares uploading a hopeless file
P12_PASSWORD_ENV = "QWEN_APPLIANCE_P12_PASSWORD"  # noqa: S105 - the variable's name, not a secret
EXIT_USAGE, EXIT_TLS, EXIT_CONNECT = 2, 8, 9
STATUS_EXITS = {401: 3, 403: 4, 413: 5, 429: 6, 503: 7}
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Terminal control characters in model output could move the cursor or rewrite the screen.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class AskError(ApplianceError):
    """A refusal or failure, reported as one line with a hint and its own exit code."""

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int = 1) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code


# --- the profile file ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """One server and the identity to use with it."""

    name: str
    server: str
    token: str
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    p12: Path | None = None
    p12_password: str | None = None

    def as_toml(self) -> dict[str, str]:
        values = {"server": self.server, "ca": self.ca, "cert": self.cert, "key": self.key,
                  "p12": self.p12, "p12_password": self.p12_password, "token": self.token}
        return {k: str(v) for k, v in values.items() if v is not None}


def config_path(override: Path | None = None) -> Path:
    """--config, else $XDG_CONFIG_HOME/qwen-appliance/client.toml, else ~/.config/..."""
    if override is not None:
        return override
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "qwen-appliance" / "client.toml"


def _check_private(path: Path) -> None:
    """The file holds a token: refuse it when anyone but the owner can read or write it."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SetupError(f"{path}: readable by others (mode {mode:04o}); it holds your token",
                         hint=f"chmod 600 {path}")


def _read_doc(path: Path) -> tomlkit.TOMLDocument:
    try:
        return tomlkit.parse(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomlkit.exceptions.ParseError) as exc:
        raise SetupError(f"{path}: not a valid TOML file ({exc})",
                         hint="fix it, or delete it and run `qwen-appliance client setup` again") from None


def load_profile(path: Path, name: str) -> Profile:
    """Read one profile, refusing a file that others can read."""
    if not path.is_file():
        raise SetupError(f"{path}: no client profile yet",
                         hint="create it with `qwen-appliance client setup --server URL --ca CA "
                              "--cert CRT --key KEY`")
    _check_private(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("profiles", {}).get(name)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SetupError(f"{path}: not a valid TOML file ({exc})") from None
    if not isinstance(table, dict):
        raise SetupError(f"{path}: no profile named {name!r}",
                         hint=f"run `qwen-appliance client setup --profile {name} ...`, or pick another "
                              "with --profile")
    return _profile(path, name, table)


def _profile(path: Path, name: str, table: dict[str, Any]) -> Profile:
    def text(key: str, required: bool = False) -> str | None:
        value = table.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise SetupError(f"{path}: [profiles.{name}] {key}: must be a non-empty string",
                             hint="run `qwen-appliance client setup` again")
        return value

    def file(key: str) -> Path | None:
        value = text(key)
        return Path(value) if value else None

    return Profile(name=name, server=str(text("server", True)), token=str(text("token", True)),
                   ca=file("ca"), cert=file("cert"), key=file("key"), p12=file("p12"),
                   p12_password=text("p12_password"))


def save_profile(path: Path, profile: Profile) -> None:
    """Add or replace one profile, keeping the others and any comments; the file is written 0600."""
    doc = tomlkit.document()
    if path.exists():
        _check_private(path)
        doc = _read_doc(path)
    profiles = doc.setdefault("profiles", tomlkit.table(is_super_table=True))
    table = tomlkit.table()
    for key, value in profile.as_toml().items():
        table[key] = value
    profiles[profile.name] = table
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    pki.write_secret(path, tomlkit.dumps(doc).encode("utf-8"))


# --- TLS -----------------------------------------------------------------------------------------


def ssl_context(profile: Profile) -> ssl.SSLContext:
    """Trust the profile's CA and present its client certificate (PEM pair or PKCS#12)."""
    try:
        ctx = ssl.create_default_context(cafile=str(profile.ca) if profile.ca else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if profile.p12 is not None:
            _load_p12(ctx, profile.p12, profile.p12_password or "")
        elif profile.cert is not None:
            ctx.load_cert_chain(str(profile.cert), str(profile.key) if profile.key else None)
    except FileNotFoundError as exc:
        raise SetupError(f"{exc.filename}: not found",
                         hint="the profile names a file that moved; run `qwen-appliance client setup` "
                              "again") from None
    except (OSError, ssl.SSLError) as exc:
        raise SetupError(f"profile {profile.name!r}: cannot load its CA or client certificate ({exc})",
                         hint="pass the files the admin issued: ca.crt, NAME.crt and NAME.key") from None
    return ctx


def _load_p12(ctx: ssl.SSLContext, path: Path, password: str) -> None:
    """ssl only loads PEM files: the key goes through a private temp folder, encrypted with a one-off key."""
    try:
        key, cert, chain = pkcs12.load_key_and_certificates(path.read_bytes(), password.encode())
    except ValueError:
        raise SetupError(f"{path}: cannot open this PKCS#12 file (wrong password, or not PKCS#12)",
                         hint=f"check the password the admin sent (or ${P12_PASSWORD_ENV})") from None
    if key is None or cert is None:
        raise SetupError(f"{path}: this PKCS#12 file holds no certificate and key")
    one_off = secrets.token_bytes(32)
    pem = serialization.Encoding.PEM
    with tempfile.TemporaryDirectory(prefix="qwa-") as folder:
        crt, key_file = Path(folder) / "client.crt", Path(folder) / "client.key"
        crt.write_bytes(cert.public_bytes(pem) + b"".join(c.public_bytes(pem) for c in chain))
        pki.write_secret(key_file, key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(one_off)))
        ctx.load_cert_chain(str(crt), str(key_file), password=one_off)


# --- images --------------------------------------------------------------------------------------


def sniff(data: bytes) -> str | None:
    """The image's real type from its first bytes; the file name is not trusted."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def image_part(path: Path, limit: int = LOCAL_IMAGE_LIMIT) -> dict[str, Any]:
    """One image as an OpenAI `image_url` part with a data URI, checked before anything is sent."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise AskError(f"{path}: {size} bytes is over the {limit // 1_000_000} MB limit",
                           hint="crop the page or export it at a lower resolution", exit_code=EXIT_USAGE)
        data = path.read_bytes()
    except OSError as exc:
        raise AskError(f"{path}: cannot read ({exc.strerror})", exit_code=EXIT_USAGE) from None
    mime = sniff(data)
    if data.startswith(b"%PDF-"):
        raise AskError(f"{path}: PDF files are not sent",
                       hint="export the page as PNG (e.g. `pdftoppm -png -r 150 -f 1 -l 1 FILE page`) "
                            "and pass that with --image", exit_code=EXIT_USAGE)
    if mime is None:
        raise AskError(f"{path}: not a PNG, JPEG or WebP image", hint="convert it to PNG first",
                       exit_code=EXIT_USAGE)
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return {"type": "image_url", "image_url": {"url": uri}}


# --- refusals ------------------------------------------------------------------------------------

_HINTS = {
    401: "the token is unknown, disabled or expired (the appliance answers these alike; its audit trail "
         "says which): run `qwen-appliance client setup` again with the token the admin issued, or ask "
         "the admin for a new one",
    403: "ask the appliance admin to check this client's scopes, address range and certificate",
    413: "send a smaller image: crop it or export it at a lower resolution",
    415: "send PNG, JPEG or WebP images",
    400: "check the question, the images and --max-tokens",
}
_LABELS = {401: "token rejected", 403: "not allowed", 413: "too large", 429: "rate limited",
           503: "appliance busy"}


def _clean(text: str, limit: int = 300) -> str:
    return " ".join(_CONTROL.sub(" ", text).split())[:limit]


def refusal(status: int, body: bytes, headers: httpx.Headers) -> AskError:
    """The server's own message (already safe to show) on one line, a hint, and the status's exit code."""
    try:
        message = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = "no details"
    message = _clean(message)
    retry = headers.get("retry-after", "")
    label = _LABELS.get(status, f"refused ({status})" if status < 500 else f"appliance error ({status})")
    hint = _HINTS.get(status)
    if status in (429, 503):
        wait = f"{retry} s" if retry.isdigit() else "a moment"
        message, hint = f"{message}; retry after {wait}", f"wait {wait} and ask again"
    if status >= 500:
        hint = f"quote request id {_clean(headers.get('x-request-id', '-'), 40)} to the appliance admin"
    code = STATUS_EXITS.get(status, EXIT_USAGE if status < 500 else 1)
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
            return AskError(f"TLS handshake failed: the server's certificate is not trusted "
                            f"({_clean(cause.verify_message or str(cause))})",
                            hint="check the profile's CA file and that the URL's host name is in the "
                                 "server certificate", exit_code=EXIT_TLS)
        if isinstance(cause, ssl.SSLError):
            return AskError(f"TLS handshake failed ({_clean(cause.reason or str(cause))})",
                            hint="check the client certificate and CA in the profile", exit_code=EXIT_TLS)
    if isinstance(exc, httpx.RemoteProtocolError) and _refused_after_handshake(server, ctx):
        return AskError("TLS handshake failed: the appliance did not accept this client certificate",
                        hint="check that the profile has the certificate the admin issued, that it has not "
                             "expired, and that it was signed by the appliance's CA", exit_code=EXIT_TLS)
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        reason = "connection refused" if any(isinstance(c, ConnectionRefusedError)
                                             for c in _causes(exc)) else _clean(str(exc))
        return AskError(f"cannot reach {server}: {reason}",
                        hint="check the URL and port, and that the appliance is running",
                        exit_code=EXIT_CONNECT)
    if isinstance(exc, httpx.TimeoutException):
        return AskError(f"no answer from {server} in time", hint="try again, or raise --timeout")
    return AskError(f"the connection to {server} failed ({_clean(str(exc)) or type(exc).__name__})",
                    hint="try again; if it persists, tell the appliance admin")


def _refused_after_handshake(server: str, ctx: ssl.SSLContext) -> bool:
    """Under TLS 1.3 a refused client certificate shows up only as a silent close after the handshake.

    Ask once more for /healthz on a bare TLS socket: no answer at all means the certificate was refused.
    """
    parts = urlsplit(server)
    host, port = parts.hostname or "", parts.port or 443
    try:
        with socket.create_connection((host, port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            return tls.recv(1) == b""
    except ssl.SSLError:
        return True
    except OSError:
        return False


# --- ask -----------------------------------------------------------------------------------------


def _question(args: argparse.Namespace) -> str:
    text = sys.stdin.read() if args.question == "-" else args.question
    if not text.strip():
        raise AskError("the question is empty", hint='e.g. qwen-appliance ask "What is the total?"',
                       exit_code=EXIT_USAGE)
    return str(text)


def request_body(question: str, image_files: list[Path], max_tokens: int | None,
                 temperature: float | None = None) -> dict[str, Any]:
    """An OpenAI chat request: the images first, then the question, streamed."""
    content: list[dict[str, Any]] | str = question
    if image_files:
        content = [*(image_part(p) for p in image_files), {"type": "text", "text": question}]
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "stream": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    return body


def stream_answer(lines: Iterator[str], out: TextIO) -> str | None:
    """Write each delta as it arrives; return the finish reason. No `[DONE]` means the answer was cut off."""
    finish: str | None = None
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return finish
        try:
            choice = (json.loads(data).get("choices") or [{}])[0]
        except (ValueError, AttributeError):
            raise AskError("the appliance sent a malformed stream event") from None
        piece = (choice.get("delta") or {}).get("content")
        if piece:
            out.write(_CONTROL.sub("", piece.replace("\r\n", "\n")) if out.isatty() else piece)
            out.flush()
        finish = choice.get("finish_reason") or finish
    raise AskError("the answer was cut off: the connection ended before it was complete",
                   hint="ask again; if it persists, tell the appliance admin")


def _post(client: httpx.Client, url: str, body: dict[str, Any], out: TextIO) -> str | None:
    with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise refusal(resp.status_code, resp.read(), resp.headers)
        try:
            return stream_answer(resp.iter_lines(), out)
        except (AskError, httpx.TransportError):
            out.write("\n")  # end the partial answer, so the error starts on a line of its own
            out.flush()
            raise


def ask(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Send one question (with images) and stream the answer to stdout."""
    out = out or sys.stdout
    profile = load_profile(config_path(args.config), args.profile)
    server = (args.server or profile.server).rstrip("/")
    _check_url(server)
    body = request_body(_question(args), args.image, args.max_tokens, args.temperature)
    ctx = ssl_context(profile)
    headers = {"authorization": f"Bearer {profile.token}", "accept": "text/event-stream"}
    # The appliance is reached directly on the branch LAN: proxy variables are not used.
    with httpx.Client(verify=ctx, headers=headers, trust_env=False,
                      timeout=httpx.Timeout(args.timeout, connect=10)) as client:
        try:
            finish = _post(client, f"{server}/v1/chat/completions", body, out)
        except httpx.TransportError as exc:
            raise transport_failure(exc, server, ctx) from None
    out.write("\n")
    out.flush()
    if finish == "length":
        print("(the answer reached its token limit; pass a larger --max-tokens for more)", file=sys.stderr)
    return 0


def _check_url(server: str) -> None:
    parts = urlsplit(server)
    if parts.scheme != "https" or not parts.hostname:
        raise SetupError(f"server URL {server!r}: must be https://HOST:PORT",
                         hint="e.g. https://192.168.10.5:8443")


# --- client setup --------------------------------------------------------------------------------


def _secret_input(prompt: str) -> str:
    """A secret from the terminal without echo, or one line of piped stdin; never from argv."""
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    return sys.stdin.readline().strip()


def _readable(path: Path | None) -> Path | None:
    if path is None:
        return None
    if not path.is_file():
        raise SetupError(f"{path}: not found", hint="pass the files the admin issued")
    return path.resolve()


def _check_ca(ca: Path) -> None:
    try:
        x509.load_pem_x509_certificates(ca.read_bytes())
    except ValueError:
        raise SetupError(f"{ca}: no PEM certificate in this file",
                         hint="pass ca.crt from the bundle the admin issued") from None


def setup(args: argparse.Namespace) -> int:
    """Create or replace a profile; the token comes from stdin or a prompt, never from argv."""
    if not _PROFILE_NAME.fullmatch(args.profile):
        raise SetupError(f"profile name {args.profile!r}: letters, digits, '.', '_' and '-' only")
    if bool(args.p12) == bool(args.cert or args.key) or (args.cert is None) != (args.key is None):
        raise SetupError("pass either --cert and --key, or --p12", hint="the files the admin issued")
    server = args.server.rstrip("/")
    _check_url(server)
    ca = _readable(args.ca)
    assert ca is not None
    _check_ca(ca)
    token = _secret_input("Token: ")
    if not token or not token.isprintable() or " " in token:
        raise SetupError("no token given", hint="paste the token the admin issued (or pipe it on stdin)")
    password = None
    if args.p12:
        password = os.environ.get(P12_PASSWORD_ENV) or _secret_input("PKCS#12 password: ")
    profile = Profile(name=args.profile, server=server, token=token, ca=ca, cert=_readable(args.cert),
                      key=_readable(args.key), p12=_readable(args.p12), p12_password=password)
    ssl_context(profile)  # the files load and match, or the profile is not written
    path = config_path(args.config)
    save_profile(path, profile)
    print(f"Saved profile {profile.name!r} for {server} in {path} (0600).\n"
          f'Try it: qwen-appliance ask{_profile_flag(profile.name)} "Hello"')
    return 0


def _profile_flag(name: str) -> str:
    return "" if name == "default" else f" --profile {name}"


# --- CLI -----------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default", help="profile name (default %(default)s)")
    p.add_argument("--config", type=Path,
                   help="profile file (default $XDG_CONFIG_HOME/qwen-appliance/client.toml)")


def register(sub: Any) -> None:
    """Add `ask` and `client setup` to the CLI (each sets `handler`)."""
    p = sub.add_parser("ask", help="ask the appliance a question; the answer streams to the terminal",
                       description="Exit codes: 0 answered, 2 bad input or other 4xx, 3 token rejected "
                                   "(401), 4 not allowed (403), 5 too large (413), 6 rate limited (429), "
                                   "7 busy (503), 8 TLS handshake failed, 9 cannot connect, 1 other.")
    p.add_argument("question", help='the question, or "-" to read it from stdin')
    p.add_argument("--image", action="append", default=[], type=Path, metavar="FILE",
                   help="a PNG, JPEG or WebP image to ask about (repeatable; PDFs: export the page as PNG)")
    p.add_argument("--server", help="https://HOST:PORT, instead of the profile's")
    p.add_argument("--max-tokens", type=int, metavar="N", help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="0 for the most likely, repeatable answer (the server's default otherwise)")
    p.add_argument("--timeout", type=float, default=300, metavar="S",
                   help="seconds to wait for the next piece of the answer (default %(default)s)")
    _common(p)
    p.set_defaults(handler=ask)

    client = sub.add_parser("client", help="set up this machine to use the appliance")
    csub = client.add_subparsers(dest="client_command", required=True)
    p = csub.add_parser("setup", help="save a profile: server, CA, client certificate and token "
                                      "(the token is read from stdin or a prompt)")
    p.add_argument("--server", required=True, help="https://HOST:PORT of the appliance")
    p.add_argument("--ca", type=Path, required=True, help="the appliance's CA certificate (ca.crt)")
    p.add_argument("--cert", type=Path, help="your client certificate (NAME.crt)")
    p.add_argument("--key", type=Path, help="its private key (NAME.key)")
    p.add_argument("--p12", type=Path,
                   help=f"or a PKCS#12 file instead of --cert/--key (password: prompt, stdin's second "
                        f"line, or ${P12_PASSWORD_ENV})")
    _common(p)
    p.set_defaults(handler=setup)
