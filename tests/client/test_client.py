"""`qwen-appliance ask` and `client setup` against the real daemon: answers, streaming, and every refusal."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, Daemon, TinyModel, add_client, free_port, make_setup, png_bytes, start_daemon
from helpers import LONG, LONG_EDITS, SHORT, wait_for
from PIL import Image

from appliance.client.profile import Profile, save_profile
from appliance.security import pki

SERVER_IMAGE_LIMIT = 50_000  # the daemon's max_image_bytes here; the client's own limit is 10 MB


@dataclass
class Env:
    """One daemon for the module, with clients that provoke each refusal."""

    daemon: Daemon
    no_chat_token: str
    slow_token: str
    root: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("client")
    port = free_port()
    setup = make_setup(
        root / "setup",
        tiny_model,
        port,
        {
            **LONG_EDITS,
            "max_queue = 16": "max_queue = 1",
            "max_image_bytes = 10_000_000": f"max_image_bytes = {SERVER_IMAGE_LIMIT}",
        },
    )
    text = setup.policy.read_text()  # one engine slot, so a second request waits (if batching exists)
    setup.policy.write_text(text.replace("parallel = 4", "parallel = 1"))
    no_chat = add_client(setup.policy, "reader", scopes=("models",))
    slow = add_client(setup.policy, "slow", rate='"1/minute"')
    d = start_daemon(setup, port, root / "daemon.log")
    try:
        yield Env(d, no_chat, slow, root)
    finally:
        d.stop()


def profile(
    env: Env,
    name: str,
    token: str | None = None,
    cert: bool = True,
    cert_files: tuple[Path, Path] | None = None,
    ca: Path | None = None,
) -> Path:
    """Write a profile file directly (`client setup` itself is tested once, through the CLI)."""
    s = env.daemon.setup
    crt, key = cert_files or (s.client_cert, s.client_key)
    path = env.root / "profiles" / f"{name}.toml"
    save_profile(
        path,
        Profile(
            name="default",
            server=env.daemon.url,
            token=token or s.token,
            ca=ca or s.ca_cert,
            cert=crt if cert else None,
            key=key if cert else None,
        ),
    )
    return path


def cli(
    *args: str, stdin: str | None = None, env_vars: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env_vars or {})},
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def ask(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("ask", "--config", str(config), *args)


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    """Every refusal is exactly one line on stderr, naming the problem and a hint."""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("qwen-appliance: error: ") and "(hint: " in lines[0], lines[0]
    return lines[0]


def audit_records(env: Env) -> list[dict[str, object]]:
    audit = env.daemon.setup.policy.parent / "audit"
    return [json.loads(line) for f in sorted(audit.glob("*.jsonl")) for line in f.read_text().splitlines()]


def noise_png(path: Path, side: int) -> Path:
    """Random pixels: a PNG that does not compress, so its size is predictable."""
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(path, format="PNG")
    return path


# --- set-up and answers ------------------------------------------------------------------------------


def test_setup_reads_token_from_stdin_and_writes_a_private_profile(env: Env, tmp_path: Path) -> None:
    s = env.daemon.setup
    xdg = tmp_path / "xdg"
    r = cli(
        "client",
        "setup",
        "--server",
        env.daemon.url,
        "--ca",
        str(s.ca_cert),
        "--cert",
        str(s.client_cert),
        "--key",
        str(s.client_key),
        stdin=s.token + "\n",
        env_vars={"XDG_CONFIG_HOME": str(xdg)},
    )
    assert r.returncode == 0, r.stderr
    path = xdg / "qwen-appliance" / "client.toml"
    assert path.stat().st_mode & 0o777 == 0o600
    assert f'token = "{s.token}"' in path.read_text() and s.token not in r.stdout
    answered = cli("ask", "--max-tokens", "8", "Hello", env_vars={"XDG_CONFIG_HOME": str(xdg)})
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip()
    path.chmod(0o644)
    refused = cli("ask", "Hello", env_vars={"XDG_CONFIG_HOME": str(xdg)})
    assert refused.returncode == 2
    assert "readable by others" in one_line(refused) and f"chmod 600 {path}" in refused.stderr


def test_setup_with_pkcs12_and_bad_inputs(env: Env, tmp_path: Path) -> None:
    tls = env.daemon.setup.policy.parent / "tls"
    ca = pki.load(tls / "ca.crt", tls / "ca.key")
    p12 = tmp_path / "staff.p12"
    p12.write_bytes(pki.pkcs12_bytes(pki.new_client_cert(ca, "staff"), ca.cert, "staff", "s3cret"))
    config = tmp_path / "client.toml"
    base = (
        "client",
        "setup",
        "--server",
        env.daemon.url,
        "--ca",
        str(tls / "ca.crt"),
        "--config",
        str(config),
        "--profile",
        "branch",
    )
    wrong = cli(*base, "--p12", str(p12), stdin=env.daemon.setup.token + "\nnope\n")
    assert wrong.returncode == 2 and "wrong password" in one_line(wrong) and not config.exists()
    r = cli(*base, "--p12", str(p12), stdin=env.daemon.setup.token + "\ns3cret\n")
    assert r.returncode == 0, r.stderr
    answered = ask(config, "--profile", "branch", "--max-tokens", "4", "Hello")
    assert answered.returncode == 0, answered.stderr
    no_token = cli(*base, "--p12", str(p12), stdin="\n")
    assert no_token.returncode == 2 and "no token" in one_line(no_token)
    both = cli(
        *base, "--p12", str(p12), "--cert", str(tls / "ca.crt"), "--key", str(tls / "ca.key"), stdin="x\n"
    )
    assert both.returncode == 2 and "either --cert and --key, or --p12" in both.stderr
    missing = ask(config, "--profile", "other", "Hello")
    assert missing.returncode == 2 and "no profile named 'other'" in one_line(missing)


def test_ask_text_and_image(env: Env, tmp_path: Path) -> None:
    config = profile(env, "main")
    text = ask(config, "--max-tokens", "16", "What is the total?")
    assert text.returncode == 0, text.stderr
    assert text.stdout.strip() and text.stdout.endswith("\n")
    image = tmp_path / "statement.png"
    image.write_bytes(png_bytes(size=(96, 64)))
    jpeg = tmp_path / "scan.jpg"
    jpeg.write_bytes(png_bytes(fmt="JPEG"))
    r = ask(config, "--max-tokens", "16", "--image", str(image), "--image", str(jpeg), "Summarise")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    last = [rec for rec in audit_records(env) if rec.get("event") == "request"][-1]
    assert last["status"] == 200 and last["images"] == [
        {"width": 96, "height": 64, "bytes": len(image.read_bytes()), "format": "PNG"},
        {"width": 64, "height": 64, "bytes": len(jpeg.read_bytes()), "format": "JPEG"},
    ]


def test_answer_streams_to_stdout_as_it_is_generated(env: Env) -> None:
    config = profile(env, "main")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance",
            "ask",
            "--config",
            str(config),
            "--max-tokens",
            "3000",
            "--temperature",
            "0",  # greedy: no early end
            "Write a long report",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    try:
        reads = []
        while len(reads) < 3:
            data = os.read(proc.stdout.fileno(), 65536)
            assert data, proc.stderr.read() if proc.stderr else ""
            assert proc.poll() is None, "the answer arrived all at once, after the client finished"
            reads.append(data)
        assert env.daemon.readyz()["queue"]["busy"]  # still generating while we read its first pieces
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the client leaves and the generation is cancelled
        try:
            proc.communicate(timeout=60)  # keep draining: a full stdout pipe would block the client
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        # 130 when Ctrl-C lands mid-answer; 0 if the 3,000-token answer had already been written out
        assert proc.returncode in (0, 130)
    assert wait_for(lambda: not env.daemon.readyz()["queue"]["busy"])


# --- refusals ----------------------------------------------------------------------------------------


def test_wrong_token_is_exit_3(env: Env) -> None:
    r = ask(profile(env, "wrong", token="qwa_" + "x" * 43), "Hello")
    assert r.returncode == 3
    assert one_line(r).startswith("qwen-appliance: error: token rejected: a valid bearer token")


def test_missing_scope_is_exit_4(env: Env) -> None:
    r = ask(profile(env, "reader", token=env.no_chat_token), "Hello")
    assert r.returncode == 4
    assert "not allowed: this client lacks the 'chat' scope" in one_line(r)


def test_image_over_the_server_limit_is_exit_5(env: Env, tmp_path: Path) -> None:
    big = noise_png(tmp_path / "big.png", 160)
    assert SERVER_IMAGE_LIMIT < big.stat().st_size < 10_000_000
    r = ask(profile(env, "main"), "--image", str(big), "What is this?")
    assert r.returncode == 5
    assert f"too large: image is larger than {SERVER_IMAGE_LIMIT} bytes" in one_line(r)


def test_rate_limit_is_exit_6_with_retry_after(env: Env) -> None:
    config = profile(env, "slow", token=env.slow_token)
    first = ask(config, "--max-tokens", "2", "Hello")
    assert first.returncode == 0, first.stderr
    second = ask(config, "--max-tokens", "2", "Hello")
    assert second.returncode == 6
    line = one_line(second)
    assert "rate limited: rate limit of 1/minute exceeded; retry after" in line
    retry = int(line.split("retry after ")[1].split(" s")[0])
    assert 1 <= retry <= 60


def test_queue_full_is_exit_7(env: Env) -> None:
    d = env.daemon
    waiting: dict[str, int] = {}
    with d.client() as a, a.stream("POST", "/v1/chat/completions", json=LONG) as held:
        assert held.status_code == 200
        lines = held.iter_lines()  # keep a reference: a collected iterator closes the stream
        next(lines)  # the engine is busy with this generation

        def queued() -> None:
            with d.client() as c:
                waiting["status"] = c.post("/v1/chat/completions", json=SHORT).status_code

        t = threading.Thread(target=queued)
        t.start()  # fills the queue (max_queue = 1)
        assert wait_for(lambda: d.readyz()["queue"]["waiting"] == 1)
        r = ask(profile(env, "main"), "Hello")
    t.join(60)
    assert waiting == {"status": 200}
    assert r.returncode == 7
    assert "appliance busy:" in one_line(r) and "retry after" in r.stderr
    assert wait_for(lambda: not d.readyz()["queue"]["busy"])


def test_other_4xx_is_exit_2(env: Env) -> None:
    r = ask(profile(env, "main"), "--max-tokens", "999999", "Hello")
    assert r.returncode == 2
    assert "refused (400): max_tokens is 999999" in one_line(r)


def test_tls_failures_are_exit_8(env: Env, tmp_path: Path) -> None:
    no_cert = ask(profile(env, "nocert", cert=False), "Hello")
    assert no_cert.returncode == 8
    assert "TLS handshake failed: the appliance did not accept this client certificate" in one_line(no_cert)
    other = pki.new_ca("someone else's CA")
    foreign = pki.new_client_cert(other, "intruder")
    pki.save(foreign, tmp_path / "f.crt", tmp_path / "f.key")
    r = ask(profile(env, "foreign", cert_files=(tmp_path / "f.crt", tmp_path / "f.key")), "Hello")
    assert r.returncode == 8 and "did not accept this client certificate" in one_line(r)
    (tmp_path / "other-ca.crt").write_bytes(pki.cert_pem(other.cert))
    untrusted = ask(profile(env, "badca", ca=tmp_path / "other-ca.crt"), "Hello")
    assert untrusted.returncode == 8
    assert "the server's certificate is not trusted" in one_line(untrusted)


def test_connection_refused_is_exit_9(env: Env) -> None:
    r = ask(profile(env, "main"), "--server", f"https://127.0.0.1:{free_port()}", "Hello")
    assert r.returncode == 9
    assert "connection refused" in one_line(r)


def test_local_refusals_send_nothing(env: Env, tmp_path: Path) -> None:
    """PDFs, other formats and files over the local limit are refused before any connection (exit 2)."""
    closed = ("--server", f"https://127.0.0.1:{free_port()}")  # a connection attempt would be exit 9
    pdf = tmp_path / "statement.pdf"
    pdf.write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n")
    r = ask(profile(env, "main"), *closed, "--image", str(pdf), "Total?")
    assert r.returncode == 2 and "PDF files are not sent" in one_line(r)
    assert "export the page as PNG" in r.stderr
    gif = tmp_path / "a.gif"
    gif.write_bytes(b"GIF89a" + bytes(32))
    r = ask(profile(env, "main"), *closed, "--image", str(gif), "Total?")
    assert r.returncode == 2 and "not a PNG, JPEG or WebP image" in one_line(r)
    huge = tmp_path / "huge.png"
    with huge.open("wb") as f:
        f.write(png_bytes())
        f.truncate(10_000_001)
    r = ask(profile(env, "main"), *closed, "--image", str(huge), "Total?")
    assert r.returncode == 2 and "over the 10 MB limit" in one_line(r)


def test_stream_output_strips_terminal_controls() -> None:
    """Model output may hold escape sequences; on a terminal they are removed, not interpreted."""
    from appliance.client.ask import stream_answer

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    events = [
        'data: {"choices": [{"delta": {"content": "ok\\u001b[2J\\u009b31m done"}}]}',
        'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}',
        "data: [DONE]",
    ]
    out = Tty()
    assert stream_answer(iter(events), out) == "stop"
    assert out.getvalue() == "ok[2J31m done"


def test_a_stream_without_done_is_reported_as_cut_off() -> None:
    from appliance.client.ask import stream_answer
    from appliance.client.exits import AskError

    out = io.StringIO()
    with pytest.raises(AskError, match="cut off") as caught:
        stream_answer(iter(['data: {"choices": [{"delta": {"content": "partial"}}]}']), out)
    assert out.getvalue() == "partial" and caught.value.exit_code == 1
