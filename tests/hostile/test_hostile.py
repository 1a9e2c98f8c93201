"""The hostile corpus against one real daemon: each case gets its status, and the daemon serves on, bounded.

Also the slow attacks (slowloris headers and bodies): 20 held connections must not stop another client, and
the daemon must close them by itself within its request deadlines.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import TinyModel, data_uri, free_port, issue_client_cert, make_setup, png_bytes, start_daemon
from hostile_corpus import Case, Target, all_cases, image, quick

from appliance.daemon.protocol import BODY_TIMEOUT_S, HEAD_TIMEOUT_S
from appliance.security import pki

RSS_BOUND = 200 * 2**20  # growth allowed over the whole corpus
CASES = all_cases()
LIMITS = {
    "max_body_bytes = 20_000_000": "max_body_bytes = 3_000_000",
    "max_image_bytes = 10_000_000": "max_image_bytes = 1_000_000",
    "max_image_pixels = 16_000_000": "max_image_pixels = 1_000_000",
    "max_images = 8": "max_images = 4",
    "max_tokens = 2048": "max_tokens = 16",
}


def test_the_corpus_is_big_enough() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) and len(names) >= 40


def furnish(root: Path) -> None:
    """The data directory a tester probes: a real image, a way out, a FIFO, a folder; a secret outside."""
    data = root / "data"
    data.mkdir(exist_ok=True)
    (data / "scan.png").write_bytes(png_bytes())
    (data / "sub").mkdir()
    (root / "secret.png").write_bytes(png_bytes((9, 9, 9)))
    os.symlink(root / "secret.png", data / "link.png")
    os.mkfifo(data / "pipe.png")


def foreign_cert(root: Path) -> tuple[Path, Path]:
    """A client certificate from a CA the appliance has never seen."""
    other = pki.new_ca("someone else's CA")
    leaf = pki.new_client_cert(other, "tester")
    pki.save(leaf, root / "foreign.crt", root / "foreign.key")
    return root / "foreign.crt", root / "foreign.key"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("hostile")
    port = free_port()
    setup = make_setup(root / "s", tiny_model, port, LIMITS)
    furnish(setup.policy.parent)
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    expired = issue_client_cert(setup, "expired", days=1, valid_from=past)[:2]
    certs = {
        "tester": (setup.client_cert, setup.client_key),
        "expired": expired,
        "foreign": foreign_cert(root),
    }
    d = start_daemon(setup, port, root / "daemon.log")
    try:
        yield Target(d, setup.policy.parent, certs)
    finally:
        d.stop()


@pytest.fixture(scope="module")
def baseline_rss(target: Target) -> int:
    """RSS once the first image has gone through (allocator pools and the projector warmed up)."""
    assert image(data_uri(png_bytes()))(target) == 200
    return int(psutil.Process(target.d.proc.pid).memory_info().rss)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case(case: Case, target: Target, baseline_rss: int) -> None:
    got = case.send(target)
    assert got == case.expect, f"{case.name}: got {got}, expected {case.expect}\n{target.d.log()[-3000:]}"
    assert target.d.proc.poll() is None, "the daemon died"
    assert quick(target).status_code == 200, "the daemon no longer serves"
    rss = psutil.Process(target.d.proc.pid).memory_info().rss
    assert rss - baseline_rss < RSS_BOUND, f"RSS grew by {(rss - baseline_rss) >> 20} MB"


def test_no_tracebacks_or_secrets_in_the_log(target: Target) -> None:
    log = target.d.log()
    assert "Traceback" not in log and "internal_error" not in log
    assert target.d.setup.token not in log


# --- slow attacks ---------------------------------------------------------------------------------


def open_tls(t: Target) -> ssl.SSLSocket:
    ctx = t.d.ssl_context()
    raw = socket.create_connection(("127.0.0.1", t.port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def closed_by_server(s: ssl.SSLSocket) -> bool:
    """EOF, a reset or any answer (a refusal) means the server acted; silence means it still waits."""
    s.settimeout(0.05)
    try:
        s.recv(1024)
    except TimeoutError:
        return False
    except (ssl.SSLError, OSError):
        return True
    return True


@pytest.mark.slow
def test_slowloris_is_cut_off_and_others_are_served(target: Target) -> None:
    """10 silent, 5 dribbling-header and 5 dribbling-body connections; another client is served meanwhile."""
    token = target.d.setup.token.encode()
    silent = [open_tls(target) for _ in range(10)]
    heads = [open_tls(target) for _ in range(5)]
    bodies = [open_tls(target) for _ in range(5)]
    for s in heads:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
    for s in bodies:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
            + token
            + b"\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{"
        )
    started = time.monotonic()
    held = silent + heads + bodies
    while time.monotonic() - started < BODY_TIMEOUT_S + 15 and not all(closed_by_server(s) for s in held):
        for s in heads + bodies:
            with contextlib.suppress(OSError):
                s.sendall(b"x" if s in heads else b" ")  # one byte a second keeps no deadline at bay
        assert quick(target).status_code == 200  # served while the slow ones hang on
        time.sleep(1)
    elapsed = time.monotonic() - started
    assert all(closed_by_server(s) for s in held), f"slow connections still open after {elapsed:.0f} s"
    assert elapsed < BODY_TIMEOUT_S + 15
    for s in held:
        s.close()
    log = target.d.log()
    assert "request headers not received within" in log and "request body not received within" in log
    assert HEAD_TIMEOUT_S < BODY_TIMEOUT_S
