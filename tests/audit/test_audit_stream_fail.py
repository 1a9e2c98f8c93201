"""Fail-closed mid-stream (issue 11, defect 14): a completion record that cannot be written ends the stream
with an error event and no [DONE], raises nothing into uvicorn, and makes /readyz 503.

The disk fills through RLIMIT_FSIZE on the real daemon; its output goes through a pipe (not subject to the
limit), so the log is complete and a traceback in it would be seen.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Daemon, TinyModel, free_port, make_setup, wait_ready
from helpers import wait_for

from appliance.admin.init import InitResult
from appliance.audit.log import list_files, load_hmac_key
from appliance.audit.verify import verify

STREAM = {
    "messages": [{"role": "user", "content": "count"}],
    "max_tokens": 6,
    "temperature": 0,
    "stream": True,
}
NO_LIMIT = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)


def start_piped(setup: InitResult, port: int, log_path: Path, timeout: float = 60) -> Daemon:
    """The real daemon, its stdout and stderr copied into log_path by this process (no file-size limit)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--policy", str(setup.policy)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )

    def copy() -> None:
        assert proc.stdout is not None
        with log_path.open("wb") as out:
            while chunk := proc.stdout.read1(65536):
                out.write(chunk)
                out.flush()

    threading.Thread(target=copy, daemon=True).start()
    return wait_ready(Daemon(setup, f"https://127.0.0.1:{port}", proc, log_path), timeout)


@pytest.fixture
def piped(tmp_path: Path, tiny_model: TinyModel) -> Any:
    port = free_port()
    d = start_piped(make_setup(tmp_path / "s", tiny_model, port), port, tmp_path / "d.log")
    yield d
    resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, NO_LIMIT) if d.proc.poll() is None else None
    d.stop(timeout=20)


def audit_lines(d: Daemon) -> list[bytes]:
    return [x for p in list_files(d.setup.policy.parent / "audit") for x in p.read_bytes().splitlines()]


def events_of(lines: list[str]) -> list[Any]:
    return [
        x[len("data: ") :] if x == "data: [DONE]" else json.loads(x[len("data: ") :])
        for x in lines
        if x.startswith("data: ")
    ]


def stream(d: Daemon) -> tuple[str, list[Any]]:
    with d.client() as c, c.stream("POST", "/v1/chat/completions", json=STREAM) as s:
        assert s.status_code == 200
        return s.headers["x-request-id"], events_of(list(s.iter_lines()))


def by_id(d: Daemon, rid: str) -> dict[str, bytes]:
    return {json.loads(x)["event"]: x for x in audit_lines(d) if json.loads(x).get("request_id") == rid}


def test_full_disk_at_the_end_of_a_stream_ends_it_with_an_error_event(piped: Daemon) -> None:
    d = piped
    rid, events = stream(d)  # an honest stream first: how long its two records are
    assert events[-1] == "[DONE]"
    recs = by_id(d, rid)
    request_len, complete_len = len(recs["request"]) + 1, len(recs["request.complete"]) + 1
    assert complete_len - request_len > 40, (request_len, complete_len)
    audit_file = list_files(d.setup.policy.parent / "audit")[-1]
    limit = audit_file.stat().st_size + request_len + (complete_len - request_len) // 2
    resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    rid, events = stream(d)  # the request record fits; the completion record does not
    assert "request" in by_id(d, rid) and "request.complete" not in by_id(d, rid)
    assert "[DONE]" not in events, events
    content = [e for e in events[:-1] if e["choices"][0]["delta"].get("content")]
    assert content and all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    err = events[-1]["error"]
    assert err["type"] == "overloaded_error" and "audit" in err["message"]
    with d.client() as c:
        assert c.get("/readyz").status_code == 503  # the trail is marked failing
        resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, NO_LIMIT)
        assert wait_for(lambda: c.get("/readyz").status_code == 200)
    rid, events = stream(d)  # and it recovers by itself
    assert events[-1] == "[DONE]" and "request.complete" in by_id(d, rid)
    assert d.stop() == 0
    log = d.log()
    assert "stream completion record NOT written" in log and "audit trail NOT writable" in log
    assert "Traceback" not in log and "Exception in ASGI" not in log, log
    key = load_hmac_key(d.setup.policy.parent / "audit.key")
    r = verify(d.setup.policy.parent / "audit", key, expect_sealed=True)
    assert r.ok, r.problem


def test_client_gone_while_the_disk_is_full_raises_nothing_into_uvicorn(piped: Daemon) -> None:
    """A stream cut by its client while no record can be written: logged as such, no traceback."""
    d = piped
    audit_file = list_files(d.setup.policy.parent / "audit")[-1]
    rid, _ = stream(d)
    request_len = len(by_id(d, rid)["request"]) + 1
    resource.prlimit(
        d.proc.pid,
        resource.RLIMIT_FSIZE,
        (audit_file.stat().st_size + request_len + 20, resource.RLIM_INFINITY),
    )
    body = dict(STREAM, max_tokens=200)
    with d.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as s:
        assert s.status_code == 200  # its request record fits, nothing after it does
        next(s.iter_lines())  # one event, then the client goes away
    assert wait_for(lambda: "stream completion record NOT written" in d.log())
    with d.client() as c:  # a plain request meanwhile: refused with 503 JSON, not answered
        r = c.post("/v1/chat/completions", json=dict(STREAM, stream=False))
        assert r.status_code == 503 and "audit" in r.json()["error"]["message"]
        resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, NO_LIMIT)
        assert wait_for(lambda: c.get("/readyz").status_code == 200)
    assert d.stop() == 0
    log = d.log()
    assert "stream completion record NOT written" in log
    assert "Traceback" not in log and "Exception in ASGI" not in log, log
