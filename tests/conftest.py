"""Shared fixtures: the tiny real model, a complete `init` set-up, and real daemons on free loopback ports."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from appliance.admin.init import InitResult, init

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@dataclass(frozen=True)
class TinyModel:
    model: Path
    mmproj: Path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """The random-weight Qwen3-VL pair, generated fresh by the real tool."""
    out = tmp_path_factory.mktemp("tiny")
    subprocess.run(
        [sys.executable, str(ROOT / "tools/make_tiny_model.py"), str(out)], check=True, capture_output=True
    )
    return TinyModel(out / "tiny-qwen3vl-q8_0.gguf", out / "tiny-qwen3vl-mmproj.gguf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_bytes(
    color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 64), fmt: str = "PNG"
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@dataclass
class Daemon:
    """A running `qwen-appliance serve` subprocess and clients that reach it over mTLS."""

    setup: InitResult
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def ssl_context(self, client_cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.setup.ca_cert))
        if client_cert:
            ctx.load_cert_chain(str(self.setup.client_cert), str(self.setup.client_key))
        return ctx

    def client(
        self,
        token: str | None = None,
        client_cert: bool = True,
        timeout: float = 60,
        cert: tuple[Path, Path] | None = None,
        source: str | None = None,
    ) -> httpx.Client:
        """An httpx client over mTLS; `cert` picks another client certificate, `source` a local IP."""
        headers = {"authorization": f"Bearer {token or self.setup.token}"}
        ctx = self.ssl_context(client_cert and cert is None)
        if cert is not None:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        transport = httpx.HTTPTransport(verify=ctx, local_address=source) if source else None
        return httpx.Client(
            base_url=self.url, verify=ctx, headers=headers, timeout=timeout, transport=transport
        )

    def readyz(self) -> dict[str, Any]:
        with self.client(timeout=10) as c:
            body: dict[str, Any] = c.get("/readyz").json()
        return body

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def make_setup(root: Path, tiny: TinyModel, port: int, edits: dict[str, str] | None = None) -> InitResult:
    """`init` a set-up, then apply plain-text edits (`old line` → `new line`) to its policy."""
    result = init(root, listen=f"127.0.0.1:{port}", model=tiny.model, mmproj=tiny.mmproj, client="tester")
    text = result.policy.read_text()
    # One inference thread: with two on a 2-core CI box, OpenMP's thread hand-offs dominate a tiny model.
    edits = {"threads = 0 ": "threads = 1 ", **(edits or {})}
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new)
    result.policy.write_text(text)
    return result


def start_daemon(setup: InitResult, port: int, log_path: Path, timeout: float = 60) -> Daemon:
    """Start the real daemon and wait until /readyz answers 200 over mTLS."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE")
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--policy", str(setup.policy)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )
    return wait_ready(Daemon(setup, f"https://127.0.0.1:{port}", proc, log_path), timeout)


def wait_ready(daemon: Daemon, timeout: float) -> Daemon:
    """Poll /readyz until 200; a daemon that exits or stays unready fails the test with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.log()}")
        try:
            with daemon.client(timeout=2) as c:
                if c.get("/readyz").status_code == 200:
                    return daemon
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    daemon.stop(signal.SIGKILL)
    raise AssertionError(f"daemon not ready in {timeout}s:\n{daemon.log()}")


def issue_client_cert(setup: InitResult, cn: str, **validity: Any) -> tuple[Path, Path, str]:
    """A client certificate signed by the set-up's CA: (cert, key, SHA-256 fingerprint)."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    from appliance.security import pki

    tls = setup.policy.parent / "tls"
    ca = pki.load(tls / "ca.crt", tls / "ca.key")
    issued = pki.new_client_cert(ca, cn, **validity)
    out = setup.policy.parent / "clients" / cn
    pki.save(issued, out / "client.crt", out / "client.key")
    der = issued.cert.public_bytes(serialization.Encoding.DER)
    return out / "client.crt", out / "client.key", hashlib.sha256(der).hexdigest()


def add_client(policy: Path, name: str, scopes: tuple[str, ...] = ("chat",), **keys: str) -> str:
    """Append a [[clients]] table (values are TOML literals) and return the new token."""
    from appliance.security.tokens import new_token, token_digest

    token = new_token()
    lines = [
        "",
        "[[clients]]",
        f'name = "{name}"',
        f'token_sha256 = "{token_digest(token)}"',
        "scopes = [" + ", ".join(f'"{s}"' for s in scopes) + "]",
    ]
    lines += [f"{k} = {v}" for k, v in keys.items()]
    with policy.open("a") as f:
        f.write("\n".join(lines) + "\n")
    return token


DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def daemon_factory(tmp_path: Path, tiny_model: TinyModel) -> Iterator[DaemonFactory]:
    """Start daemons with policy edits; every one is stopped at the end of the test."""
    started: list[Daemon] = []

    def factory(
        edits: dict[str, str] | None = None,
        name: str = "d",
        prepare: Callable[[InitResult], None] | None = None,
    ) -> Daemon:
        port = free_port()
        setup = make_setup(tmp_path / name, tiny_model, port, edits)
        if prepare is not None:
            prepare(setup)
        daemon = start_daemon(setup, port, tmp_path / f"{name}.log")
        started.append(daemon)
        return daemon

    yield factory
    for d in started:
        d.stop(signal.SIGKILL if d.proc.poll() is None else signal.SIGTERM, timeout=10)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> Iterator[Daemon]:
    """One daemon shared by a test module, with small limits so refusals are cheap to provoke."""
    root = tmp_path_factory.mktemp("daemon")
    port = free_port()
    setup = make_setup(
        root / "setup",
        tiny_model,
        port,
        {
            "max_body_bytes = 20_000_000": "max_body_bytes = 3_000_000",
            "max_image_bytes = 10_000_000": "max_image_bytes = 1_000_000",
            "max_image_pixels = 16_000_000": "max_image_pixels = 1_000_000",
            "max_tokens = 2048": "max_tokens = 256",
        },
    )
    d = start_daemon(setup, port, root / "daemon.log")
    try:
        yield d
    finally:
        d.stop()
