"""Load: 8 concurrent clients for two minutes against the tiny model, with SIGHUP bursts thrown in.

Zero errors besides the designed 429/503, RSS growth under 10 %, no file-descriptor growth, and every
acknowledged (200) request in the audit trail. QWA_LOAD_SECONDS shortens the run for local iterations.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import Daemon, DaemonFactory, png_bytes
from helpers import wait_for

from appliance.audit.log import list_files, load_hmac_key
from appliance.audit.verify import verify

pytestmark = pytest.mark.slow
SECONDS = float(os.environ.get("QWA_LOAD_SECONDS", "120"))
CLIENTS = 8
WARM_UP_S = 10.0
IMAGE = "data:image/png;base64," + base64.b64encode(png_bytes(size=(48, 32))).decode()
REQUESTS = [
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Summarise the ledger"}], "max_tokens": 8},
    ),
    (
        "POST",
        "/v1/chat/completions",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": IMAGE}},
                        {"type": "text", "text": "Total?"},
                    ],
                }
            ],
            "max_tokens": 8,
        },
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "stream"}], "max_tokens": 8, "stream": True},
    ),
    ("POST", "/api/v1/chat", {"prompt": "Risk of this contract?", "image": "scan.png", "max_tokens": 8}),
    ("GET", "/v1/models", None),
]
DESIGNED = {200, 429, 503}


class Tally:
    """What the clients saw, shared between their threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: Counter[int] = Counter()
        self.errors: list[str] = []
        self.acknowledged: list[str] = []

    def record(self, r: httpx.Response) -> None:
        with self.lock:
            self.statuses[r.status_code] += 1
            if r.status_code == 200:
                self.acknowledged.append(r.headers["x-request-id"])
            elif r.status_code not in DESIGNED:
                self.errors.append(f"{r.request.url.path}: {r.status_code} {r.text[:200]}")


def one(c: httpx.Client, n: int) -> httpx.Response:
    method, path, body = REQUESTS[n % len(REQUESTS)]
    if body is not None:  # every request its own: a response cache must not turn this into a cache test
        body = {**body, "seed": n}
    if body is not None and body.get("stream"):
        with c.stream(method, path, json=body) as r:
            lines = [line for line in r.iter_lines() if line]
            if r.status_code == 200:
                assert lines[-1] == "data: [DONE]", lines[-3:]
            return r
    return c.request(method, path, json=body)


def client_loop(d: Daemon, tally: Tally, until: float, offset: int) -> None:
    n = offset
    with d.client(timeout=60) as c:
        while time.monotonic() < until:
            try:
                tally.record(one(c, n))
            except (httpx.HTTPError, AssertionError) as exc:
                with tally.lock:
                    tally.errors.append(f"{type(exc).__name__}: {exc}")
            n += 1


def run_clients(d: Daemon, tally: Tally, seconds: float) -> None:
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=client_loop, args=(d, tally, until, i)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    hups = 0
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        if seconds > WARM_UP_S and hups < 60:
            for _ in range(5):  # a burst of reloads while requests run
                d.proc.send_signal(signal.SIGHUP)
                hups += 1
    for t in threads:
        t.join(90)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid: int) -> int:
    """File descriptors once closed connections have been reaped (the count stops moving)."""
    last = fds(pid)
    for _ in range(20):
        time.sleep(0.5)
        now = fds(pid)
        if now == last:
            return now
        last = now
    return last


def audited_ids(audit: Path) -> set[str]:
    lines = [line for p in list_files(audit) for line in p.read_bytes().splitlines()]
    return {json.loads(line).get("request_id") for line in lines}


def test_eight_clients_for_two_minutes(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(
        {"max_queue = 16": "max_queue = 6"},
        prepare=lambda s: (s.policy.parent / "data" / "scan.png").write_bytes(png_bytes()),
    )
    proc = psutil.Process(d.proc.pid)
    warm = Tally()
    run_clients(d, warm, WARM_UP_S)  # allocator pools, the projector, connection buffers
    rss0, fd0 = proc.memory_info().rss, settled_fds(d.proc.pid)
    tally = Tally()
    started = time.monotonic()
    run_clients(d, tally, SECONDS)
    elapsed = time.monotonic() - started
    assert not tally.errors, tally.errors[:10]
    assert tally.statuses[200] > CLIENTS * 10, tally.statuses
    assert wait_for(lambda: d.readyz()["status"] == "ready")
    rss1, fd1 = proc.memory_info().rss, settled_fds(d.proc.pid)
    print(
        f"load: {sum(tally.statuses.values())} requests in {elapsed:.0f} s {dict(tally.statuses)}; "
        f"RSS {rss0 >> 20} -> {rss1 >> 20} MB; fds {fd0} -> {fd1}"
    )
    assert rss1 < rss0 * 1.10, f"RSS grew from {rss0 >> 20} to {rss1 >> 20} MB"
    assert fd1 <= fd0, f"file descriptors grew from {fd0} to {fd1}"
    assert d.stop() == 0
    audit = d.setup.policy.parent / "audit"
    missing = set(warm.acknowledged + tally.acknowledged) - audited_ids(audit)
    assert not missing, f"{len(missing)} acknowledged requests are not in the audit trail"
    assert verify(audit, load_hmac_key(d.setup.policy.parent / "audit.key"), expect_sealed=True).ok
    assert "Traceback" not in d.log()
