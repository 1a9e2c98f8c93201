"""Helpers shared by test modules (no test module imports another): CLI runs, polling, audit reading."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Daemon

from appliance.audit.log import list_files

LONG = {
    "model": "tiny-qwen3vl",
    "messages": [{"role": "user", "content": "Write a long report"}],
    "max_tokens": 30000,
    "temperature": 0,
    "stream": True,
}
# The tiny model decodes thousands of tokens per second; a long context keeps one generation busy.
LONG_EDITS = {"n_ctx = 4096": "n_ctx = 32768", "max_tokens = 2048": "max_tokens = 30000"}
SHORT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def wait_for(predicate: Callable[[], Any], timeout: float = 30) -> bool:
    """Poll until `predicate()` is true or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m appliance ARGS` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def cli_main(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """`qwen-appliance ARGV` in this process (appliance.admin.cli.main): exit code, stdout, stderr."""
    from appliance.admin.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def records(d: Daemon) -> list[dict[str, Any]]:
    """Every record of a test daemon's audit trail, in file order."""
    audit = d.setup.policy.parent / "audit"
    return [
        json.loads(line) for p in list_files(audit) for line in p.read_bytes().splitlines() if line.strip()
    ]


def by_request(recs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by request id."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        if "request_id" in r:
            out.setdefault(r["request_id"], []).append(r)
    return out
