"""Process hardening at daemon start, the same with or without systemd.

Prompts, images and the server key live in this process's memory: no core dumps, no ptrace or /proc/PID/mem
by other processes of the same user, private file modes, and optionally no swapping (mlockall).
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import sys

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
_PPC_SPARC = ("ppc", "powerpc", "sparc")  # mlockall flag values differ there
MCL_CURRENT, MCL_FUTURE = (0x2000, 0x4000) if platform.machine().startswith(_PPC_SPARC) else (1, 2)
UMASK = 0o077
CAP_IPC_LOCK = 14


def harden_process(mlock: bool = False) -> dict[str, str]:
    """Apply every measure; returns {measure: outcome} for the start-up log. Never raises."""
    applied = {"core_dumps": _no_core_dumps(), "dumpable": _not_dumpable(), "umask": _umask()}
    if mlock:
        applied["mlock"] = _mlock_all()
    return applied


def _no_core_dumps() -> str:
    """RLIMIT_CORE 0/0: a crash leaves no core file with prompts or keys in it (hard limit only lowers)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if (soft, hard) == (0, 0):
        return "off (RLIMIT_CORE already 0)"
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        return f"FAILED to set RLIMIT_CORE 0: {exc}"
    return "off (RLIMIT_CORE 0)"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _not_dumpable() -> str:
    """PR_SET_DUMPABLE 0: no core dump even via a pipe handler, no ptrace attach by same-uid processes."""
    if not sys.platform.startswith("linux"):
        return "skipped (not Linux)"
    libc = _libc()
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        return f"FAILED: prctl(PR_SET_DUMPABLE): {os.strerror(ctypes.get_errno())}"
    return "off (PR_SET_DUMPABLE 0)"


def _umask() -> str:
    """Files the daemon creates (audit log, temp files) are private to its user."""
    previous = os.umask(UMASK)
    return f"{UMASK:04o} (was {previous:04o})"


def _mlock_all() -> str:
    """Lock current and future pages in RAM so prompts never reach swap; failure is reported, not raised."""
    if not sys.platform.startswith("linux"):
        return "skipped (not Linux)"
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and not _has_cap_ipc_lock():
        # With MCL_FUTURE every later mapping counts against the limit: the model load would fail later.
        return f"FAILED: not locked: {_memlock_hint(soft)}"
    if _libc().mlockall(MCL_CURRENT | MCL_FUTURE) == 0:
        return "locked (mlockall MCL_CURRENT|MCL_FUTURE)"
    return f"FAILED: mlockall: {os.strerror(ctypes.get_errno())} ({_memlock_hint(soft)})"


def _memlock_hint(soft: int) -> str:
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"
    return (
        f"RLIMIT_MEMLOCK {limit}, and the model's pages count too; "
        "under systemd set LimitMEMLOCK=infinity and make sure RAM holds the model"
    )


def _has_cap_ipc_lock() -> bool:
    """CAP_IPC_LOCK (bit 14 of CapEff) lifts RLIMIT_MEMLOCK."""
    try:
        with open("/proc/self/status") as f:
            eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(eff & (1 << CAP_IPC_LOCK))
