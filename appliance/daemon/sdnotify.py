"""systemd readiness, watchdog and socket activation with the standard library only.

Implements the wire protocols of sd_notify(3) and sd_listen_fds(3): `systemd-python` needs libsystemd
headers to build, and every call here is a no-op outside systemd, so the daemon runs the same in a terminal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

from appliance.errors import SetupError

log = logging.getLogger("appliance.daemon.sdnotify")

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed sockets start at fd 3
_LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_UNIT_HINT = (
    "check qwen-appliance.socket (`systemctl cat qwen-appliance.socket`): one ListenStream= per "
    "address, Accept=no; or unset LISTEN_FDS/LISTEN_PID when starting by hand"
)


class ListenFdsError(SetupError):
    """systemd passed something that cannot be served (not a listening stream socket): a unit to fix."""


def _address(raw: str) -> str | None:
    """`$NOTIFY_SOCKET` as an AF_UNIX address: a path, or `@name` for the abstract namespace."""
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None  # e.g. vsock: addresses (systemd 254+), not used for local services


def notify(state: str) -> bool:
    """Send `state` (newline-separated KEY=VALUE lines) to systemd; False when not under systemd."""
    raw = os.environ.get("NOTIFY_SOCKET", "")
    address = _address(raw) if raw else None
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", raw, exc.strerror or exc)
        return False
    return True


def _one_line(text: str) -> str:
    """STATUS= ends at the first newline, so fold any the caller passes."""
    return " ".join(text.splitlines())


def ready(status: str | None = None) -> bool:
    """Tell systemd start-up is complete (Type=notify): only now does `systemctl start` return."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def reloading() -> bool:
    """Mark a reload in progress; call ready() when it is done, or the unit stays 'reloading'."""
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")


def stopping() -> bool:
    """Tell systemd a requested shutdown (draining) has begun."""
    return notify("STOPPING=1")


def watchdog() -> bool:
    """Keep-alive ping; systemd restarts the service when pings stop for WatchdogSec=."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """Free-form status line shown by `systemctl status`."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog_interval() -> float | None:
    """Seconds between pings (half of WatchdogSec=), or None when no watchdog is set for this process."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # the watchdog belongs to a parent that exec'd us without clearing it
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


async def watchdog_loop(healthy: Callable[[], bool] | None = None) -> None:
    """Ping the watchdog from the event loop, so a wedged loop stops the pings; returns at once if unset."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        if healthy is None or healthy():
            watchdog()
        await asyncio.sleep(interval)


def listen_fds() -> list[socket.socket]:
    """Sockets systemd passed to this process (socket activation); [] when none. Clears the LISTEN_* vars."""
    pid, count = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    for name in _LISTEN_ENV:  # never let a child process believe the sockets are its own
        os.environ.pop(name, None)
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    return [_adopt(fd) for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count))]


def _adopt(fd: int) -> socket.socket:
    """Wrap one passed fd, refusing anything but a listening stream socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ListenFdsError(
            f"fd {fd} from systemd is not a socket: {exc.strerror}", hint=_UNIT_HINT
        ) from None
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ListenFdsError(
            f"fd {fd} from systemd is not a listening stream socket "
            "(the .socket unit needs ListenStream= and Accept=no)",
            hint=_UNIT_HINT,
        )
    sock.set_inheritable(False)  # like sd_listen_fds(): FD_CLOEXEC on every passed fd
    return sock
