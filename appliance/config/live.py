"""The daemon's word on which policy is in force, and how admin commands wait for it.

The daemon publishes a small status file (pid, policy digest in force, last reload outcome) in its audit
folder after every reload; `token revoke` and `cert revoke` send SIGHUP and return once the digest of the
file they wrote is in force, or fail when the daemon rejected it. inotify tells the watcher when a writer
still holds the policy open, so a file written in place is never loaded half-written.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import struct
import time
from pathlib import Path
from typing import Any

from appliance import files
from appliance.errors import SetupError

STATUS_NAME = "daemon-status.json"
CONFIRM_TIMEOUT_S = 10.0
IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x8, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_Q_OVERFLOW = 0x100, 0x200, 0x4000
_EVENT = struct.Struct("iIII")


def status_path(audit_dir: Path) -> Path:
    """Beside the trail: the one folder the daemon can always write and that the policy names."""
    return audit_dir / STATUS_NAME


def start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks (/proc/PID/stat field 22): a reused pid has another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def publish(path: Path, policy_file: Path, in_force: str, last: dict[str, Any]) -> None:
    """Replace the status file atomically (0600), so a reader never sees half of it."""
    status = {
        "pid": os.getpid(),
        "start_ticks": start_ticks(os.getpid()),
        "policy_file": os.path.realpath(policy_file),
        "in_force": in_force,
        "last": last,
    }
    files.atomic_write(path, json.dumps(status).encode(), 0o600)


def withdraw(path: Path) -> None:
    """At shutdown: no status file claims a policy is enforced by a process that is gone."""
    try:
        status = _read(path)
        if status is not None and status.get("pid") == os.getpid():
            path.unlink()
    except OSError:
        pass


def _read(path: Path) -> dict[str, Any] | None:
    try:
        status = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) and isinstance(status.get("pid"), int) else None


def _alive(status: dict[str, Any]) -> bool:
    """The process that wrote the status still runs (same pid and start time, not a reused pid)."""
    pid = status["pid"]
    ticks = start_ticks(pid)
    if ticks is not None or Path("/proc/self/stat").exists():
        return ticks is not None and ticks == status.get("start_ticks")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def confirm(policy_file: Path, audit_dir: Path, digest: str, timeout: float = CONFIRM_TIMEOUT_S) -> str:
    """Tell a running daemon (SIGHUP) and wait until `digest` is in force; the sentence to print.

    No daemon for this policy: the file is changed and applies at the next start. A rejection raises.
    """
    path = status_path(audit_dir)
    status = _read(path)
    if status is None or not _alive(status) or status.get("policy_file") != os.path.realpath(policy_file):
        return (
            f"No daemon is running for {policy_file} (no live {path}); the change applies when it "
            "starts. (A daemon older than this command writes no status: `systemctl reload "
            "qwen-appliance`.)"
        )
    pid = status["pid"]
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        pass  # another user's daemon: its file watcher picks the change up within a fraction of a second
    except ProcessLookupError:
        return f"No daemon is running for {policy_file} (pid {pid} is gone); the change applies at start."
    return _wait(path, pid, digest, timeout)


def _wait(path: Path, pid: int, digest: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _read(path)
        if status is not None and status["pid"] == pid:
            if status.get("in_force") == digest:
                return (
                    f"The daemon (pid {pid}) now enforces this policy (sha256 {digest[:16]}): every "
                    "request that starts from now on is checked against it."
                )
            last = status.get("last") or {}
            if last.get("outcome") == "rejected" and last.get("file_sha256") == digest:
                raise SetupError(
                    f"the daemon (pid {pid}) REJECTED the new policy ({last.get('keys')}) "
                    f"and still enforces {str(status.get('in_force'))[:16]}",
                    hint="`journalctl -u qwen-appliance -n 20` (or the daemon's log) names "
                    "the file, key and fix; correct it, then `systemctl reload "
                    "qwen-appliance`",
                )
        elif status is None and start_ticks(pid) is None and Path("/proc/self/stat").exists():
            raise SetupError(
                f"the daemon (pid {pid}) exited before confirming the new policy",
                hint="check its log; the file is changed and applies when it starts",
            )
        time.sleep(0.02)
    raise SetupError(
        f"the daemon (pid {pid}) did not confirm the new policy within {timeout:.0f} s",
        hint="check its log (`journalctl -u qwen-appliance -n 20`); until it confirms, "
        "assume the old policy is still in force",
    )


class WriteWatch:
    """inotify on the policy's folders: is a watched file modified by a writer that has not closed it yet?"""

    MASK = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE

    def __init__(self, files: list[Path]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._names: dict[int, set[str]] = {}
        self._open: set[tuple[int, str]] = set()
        for file in files:
            wd = int(libc.inotify_add_watch(self.fd, os.fsencode(file.parent), self.MASK))
            if wd < 0:
                err = ctypes.get_errno()
                os.close(self.fd)
                raise OSError(err, f"inotify_add_watch {file.parent} failed")
            self._names.setdefault(wd, set()).add(file.name)

    def busy(self) -> bool:
        """True while a writer has modified a watched file and not yet closed (or replaced) it."""
        self._drain()
        return bool(self._open)

    def _drain(self) -> None:
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            offset = 0
            while offset + _EVENT.size <= len(buf):
                wd, mask, _cookie, size = _EVENT.unpack_from(buf, offset)
                name = os.fsdecode(buf[offset + _EVENT.size : offset + _EVENT.size + size].rstrip(b"\0"))
                offset += _EVENT.size + size
                self._event(wd, mask, name)

    def _event(self, wd: int, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            self._open.clear()  # events were lost; the stability check alone decides until the next write
        if name not in self._names.get(wd, ()):
            return
        if mask & (IN_MODIFY | IN_CREATE):
            self._open.add((wd, name))
        if mask & (IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE):
            self._open.discard((wd, name))

    def close(self) -> None:
        os.close(self.fd)
