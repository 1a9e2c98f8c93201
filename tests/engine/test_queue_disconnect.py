"""Issue 11 defect 13: a request whose client leaves while it waits in the queue never runs.

A real daemon with one slot: A's long stream holds it, B queues behind it and its client drops the
connection. B must leave the queue at once (not when A ends), be audited as 499 `cancelled_while: queued`,
count in qwa_cancelled_total{stage="queued"}, and never reach the engine.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import httpx
import pytest
from conftest import Daemon, DaemonFactory, add_client
from helpers import LONG, records, wait_for

EDITS = {
    "n_ctx = 4096": "n_ctx = 32768",
    "max_tokens = 2048": "max_tokens = 30000",
    "parallel = 4": "parallel = 1",
}


def _metric(d: Daemon, token: str, name: str) -> float:
    with d.client(token=token) as c:
        text = c.get("/metrics").text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _drop_while_queued(d: Daemon, body: dict[str, Any]) -> None:
    """Send `body` from a client that gives up after 3 s, while it is still queued."""

    def post() -> None:
        with d.client(timeout=3.0) as c, pytest.raises(httpx.ReadTimeout):
            if body.get("stream"):
                with c.stream("POST", "/v1/chat/completions", json=body) as s:
                    next(s.iter_lines())
            else:
                c.post("/v1/chat/completions", json=body)

    t = threading.Thread(target=post)
    t.start()
    assert wait_for(lambda: d.readyz()["queue"]["waiting"] == 1, timeout=10)
    t.join(30)
    assert not t.is_alive()


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "non-streamed"])
def test_request_dropped_while_queued_never_runs(daemon_factory: DaemonFactory, stream: bool) -> None:
    tokens: dict[str, str] = {}
    d = daemon_factory(EDITS, prepare=lambda s: tokens.update(ops=add_client(s.policy, "ops", ("metrics",))))
    queued = 'qwa_cancelled_total{stage="queued"}'
    with d.client() as a, a.stream("POST", "/v1/chat/completions", json=LONG) as held:
        lines = held.iter_lines()
        next(lines)  # A holds the only slot
        _drop_while_queued(d, dict(LONG, stream=stream))
        # B left the queue while A still runs: before the fix it waited there and then ran.
        assert wait_for(lambda: d.readyz()["queue"]["waiting"] == 0, timeout=5)
        assert _metric(d, tokens["ops"], queued) == 1
        next(lines)  # A is still streaming: B never took its place
    b = [r for r in records(d) if r.get("status") == 499]
    assert len(b) == 1, b
    assert b[0]["cancelled_while"] == "queued" and b[0]["finish_reason"] == "cancelled"
    assert b[0]["completion_tokens"] == 0 and b[0]["prompt_tokens"] == 0
    assert b[0]["reason"].startswith("client_closed_request")
    # The scheduler's own line: B ended without a single prompt token evaluated.
    assert wait_for(lambda: f"request {b[0]['request_id']}: cancelled after 0+0 tokens" in d.log())
    assert wait_for(lambda: not d.readyz()["queue"]["busy"], timeout=30)
    assert _metric(d, tokens["ops"], queued) == 1
    with d.client() as c:  # the slot and the queue work as before
        short = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert c.post("/v1/chat/completions", json=short).status_code == 200
