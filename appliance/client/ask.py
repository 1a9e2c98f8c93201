"""`qwen-appliance ask`: one question (with images) to the appliance, the answer streamed as it is generated.

Every refusal becomes one line on stderr and its own exit code (appliance.client.exits); the identity to
use comes from the profile (appliance.client.profile).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx

from appliance.client.exits import EXIT_HELP, EXIT_USAGE, AskError, refusal, transport_failure
from appliance.client.profile import (
    P12_PASSWORD_ENV,
    check_url,
    config_path,
    load_profile,
    setup,
    ssl_context,
)
from appliance.text import strip_control

LOCAL_IMAGE_LIMIT = 10_000_000  # the server has its own limit; this one spares uploading a hopeless file


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
            raise AskError(
                f"{path}: {size} bytes is over the {limit // 1_000_000} MB limit",
                hint="crop the page or export it at a lower resolution",
                exit_code=EXIT_USAGE,
            )
        data = path.read_bytes()
    except OSError as exc:
        raise AskError(f"{path}: cannot read ({exc.strerror})", exit_code=EXIT_USAGE) from None
    mime = sniff(data)
    if data.startswith(b"%PDF-"):
        raise AskError(
            f"{path}: PDF files are not sent",
            hint="export the page as PNG (e.g. `pdftoppm -png -r 150 -f 1 -l 1 FILE page`) "
            "and pass that with --image",
            exit_code=EXIT_USAGE,
        )
    if mime is None:
        raise AskError(
            f"{path}: not a PNG, JPEG or WebP image", hint="convert it to PNG first", exit_code=EXIT_USAGE
        )
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return {"type": "image_url", "image_url": {"url": uri}}


# --- ask -----------------------------------------------------------------------------------------


def _question(args: argparse.Namespace) -> str:
    text = sys.stdin.read() if args.question == "-" else args.question
    if not text.strip():
        raise AskError(
            "the question is empty", hint='e.g. qwen-appliance ask "What is the total?"', exit_code=EXIT_USAGE
        )
    return str(text)


def request_body(
    question: str, image_files: list[Path], max_tokens: int | None, temperature: float | None = None
) -> dict[str, Any]:
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
            out.write(strip_control(piece.replace("\r\n", "\n"), keep="\t\n") if out.isatty() else piece)
            out.flush()
        finish = choice.get("finish_reason") or finish
    raise AskError(
        "the answer was cut off: the connection ended before it was complete",
        hint="ask again; if it persists, tell the appliance admin",
    )


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
    check_url(server)
    body = request_body(_question(args), args.image, args.max_tokens, args.temperature)
    ctx = ssl_context(profile)
    headers = {"authorization": f"Bearer {profile.token}", "accept": "text/event-stream"}
    # The appliance is reached directly on the branch LAN: proxy variables are not used.
    with httpx.Client(
        verify=ctx, headers=headers, trust_env=False, timeout=httpx.Timeout(args.timeout, connect=10)
    ) as client:
        try:
            finish = _post(client, f"{server}/v1/chat/completions", body, out)
        except httpx.TransportError as exc:
            raise transport_failure(exc, server, ctx) from None
    out.write("\n")
    out.flush()
    if finish == "length":
        print("(the answer reached its token limit; pass a larger --max-tokens for more)", file=sys.stderr)
    return 0


# --- CLI -----------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default", help="profile name (default %(default)s)")
    p.add_argument(
        "--config", type=Path, help="profile file (default $XDG_CONFIG_HOME/qwen-appliance/client.toml)"
    )


def register(sub: Any) -> None:
    """Add `ask` and `client setup` to the CLI (each sets `handler`)."""
    p = sub.add_parser(
        "ask", help="ask the appliance a question; the answer streams to the terminal", description=EXIT_HELP
    )
    p.add_argument("question", help='the question, or "-" to read it from stdin')
    p.add_argument(
        "--image",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="a PNG, JPEG or WebP image to ask about (repeatable; PDFs: export the page as PNG)",
    )
    p.add_argument("--server", help="https://HOST:PORT, instead of the profile's")
    p.add_argument("--max-tokens", type=int, metavar="N", help="longest answer, in tokens")
    p.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        help="0 for the most likely, repeatable answer (the server's default otherwise)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300,
        metavar="S",
        help="seconds to wait for the next piece of the answer (default %(default)s)",
    )
    _common(p)
    p.set_defaults(handler=ask)

    client = sub.add_parser("client", help="set up this machine to use the appliance")
    csub = client.add_subparsers(dest="client_command", required=True)
    p = csub.add_parser(
        "setup",
        help="save a profile: server, CA, client certificate and token "
        "(the token is read from stdin or a prompt)",
    )
    p.add_argument("--server", required=True, help="https://HOST:PORT of the appliance")
    p.add_argument("--ca", type=Path, required=True, help="the appliance's CA certificate (ca.crt)")
    p.add_argument("--cert", type=Path, help="your client certificate (NAME.crt)")
    p.add_argument("--key", type=Path, help="its private key (NAME.key)")
    p.add_argument(
        "--p12",
        type=Path,
        help=f"or a PKCS#12 file instead of --cert/--key (password: prompt, stdin's second "
        f"line, or ${P12_PASSWORD_ENV})",
    )
    _common(p)
    p.set_defaults(handler=setup)
