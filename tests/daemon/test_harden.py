"""Process hardening, checked from inside real child processes (it changes process-wide state for good)."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from conftest import ROOT

CHILD = r"""
import ctypes, json, os, resource, sys
from appliance.daemon.harden import harden_process, PR_GET_DUMPABLE
applied = harden_process(mlock=sys.argv[1] == "mlock")
libc = ctypes.CDLL(None, use_errno=True)
umask = os.umask(0o022)
locked_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmLck:"))
print(json.dumps({"applied": applied, "dumpable": libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0),
                  "core": resource.getrlimit(resource.RLIMIT_CORE), "umask": umask,
                  "locked_kb": locked_kb}))
"""
IS_ROOT = os.geteuid() == 0


def _child(mlock: bool = False, preexec: Callable[[], None] | None = None) -> dict[str, Any]:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "mlock" if mlock else "-"],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        preexec_fn=preexec,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _allow_core_dumps() -> None:
    """Start from a permissive core limit, so the test proves harden_process lowers it."""
    hard = resource.RLIM_INFINITY if IS_ROOT else resource.getrlimit(resource.RLIMIT_CORE)[1]
    resource.setrlimit(resource.RLIMIT_CORE, (hard if hard != resource.RLIM_INFINITY else 1 << 30, hard))


def test_no_core_dumps_not_dumpable_private_umask() -> None:
    r = _child(preexec=_allow_core_dumps)
    assert r["dumpable"] == 0
    assert r["core"] == [0, 0]
    assert r["umask"] == 0o077
    assert r["applied"]["core_dumps"] == "off (RLIMIT_CORE 0)"
    assert r["applied"]["dumpable"] == "off (PR_SET_DUMPABLE 0)"
    assert r["applied"]["umask"].startswith("0077 (was ")
    assert "mlock" not in r["applied"] and r["locked_kb"] == 0


def test_core_limit_already_zero_is_left_alone() -> None:
    """Under systemd LimitCORE=0 already holds (and ~@resources may forbid setrlimit)."""
    r = _child(preexec=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))
    assert r["applied"]["core_dumps"] == "off (RLIMIT_CORE already 0)" and r["core"] == [0, 0]


@pytest.mark.skipif(
    not IS_ROOT and resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] != resource.RLIM_INFINITY,
    reason="needs root or an unlimited RLIMIT_MEMLOCK",
)
def test_mlock_locks_memory() -> None:
    r = _child(mlock=True)
    assert r["applied"]["mlock"] == "locked (mlockall MCL_CURRENT|MCL_FUTURE)"
    assert r["locked_kb"] > 1024  # the interpreter's pages, now unswappable


PR_CAPBSET_DROP, CAP_IPC_LOCK = 24, 14


def _low_memlock_without_cap_ipc_lock() -> None:
    """64 KiB of lockable memory, and (as root) CAP_IPC_LOCK dropped from the bounding set before exec."""
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, 64 * 1024))
    if IS_ROOT and ctypes.CDLL(None, use_errno=True).prctl(PR_CAPBSET_DROP, CAP_IPC_LOCK, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")


def test_mlock_failure_is_reported_not_raised() -> None:
    """RLIMIT_MEMLOCK far below the process size: a clear message and the daemon goes on."""
    r = _child(mlock=True, preexec=_low_memlock_without_cap_ipc_lock)
    msg = r["applied"]["mlock"]
    assert msg.startswith("FAILED: not locked: ") and "RLIMIT_MEMLOCK 64 KiB" in msg
    assert "LimitMEMLOCK=infinity" in msg
    assert r["dumpable"] == 0 and r["core"] == [0, 0] and r["locked_kb"] == 0  # the rest still holds
