"""sd_notify and socket activation over real sockets: a bound AF_UNIX datagram socket plays systemd,
and real child processes inherit real listening sockets (systemd-socket-activate, or a bash wrapper)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.daemon import sdnotify

CHILD = r"""
import json, os, sys
from appliance.daemon import sdnotify
try:
    socks = sdnotify.listen_fds()
except sdnotify.ListenFdsError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(0)
info = {"count": len(socks), "fds": [s.fileno() for s in socks],
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        "inheritable": [os.get_inheritable(s.fileno()) for s in socks],
        "addresses": [list(s.getsockname()) for s in socks]}
if socks:
    conn, _ = socks[0].accept()
    conn.sendall(b"served by the inherited socket")
    conn.close()
print(json.dumps(info))
"""


@pytest.fixture
def systemd_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket bound at a filesystem path, named in $NOTIFY_SOCKET like systemd does."""
    path = tmp_path / "notify"
    if len(str(path)) >= 100:  # sun_path limit
        pytest.skip("temporary path too long for an AF_UNIX socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """The same in the abstract namespace: `@name` in the variable, a leading NUL on the wire."""
    name = f"qwen-appliance-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def test_without_systemd_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False and sdnotify.watchdog() is False


def test_ready_with_status_reaches_a_path_socket(systemd_socket: socket.socket) -> None:
    assert sdnotify.ready("model loaded\nlistening on fd 3") is True
    assert systemd_socket.recv(4096) == b"READY=1\nSTATUS=model loaded listening on fd 3"
    assert sdnotify.ready() is True
    assert systemd_socket.recv(4096) == b"READY=1"


def test_messages_reach_an_abstract_socket(abstract_socket: socket.socket) -> None:
    assert sdnotify.stopping() and sdnotify.watchdog() and sdnotify.status("draining 2 requests")
    got = [abstract_socket.recv(4096) for _ in range(3)]
    assert got == [b"STOPPING=1", b"WATCHDOG=1", b"STATUS=draining 2 requests"]


def test_reloading_carries_a_monotonic_timestamp(abstract_socket: socket.socket) -> None:
    assert sdnotify.reloading()
    lines = abstract_socket.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
    assert int(lines[1].split("=")[1]) > 0


def test_a_missing_socket_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # systemd 254+ form, not used locally
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "1", None),
        ("0", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdogsec(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert sdnotify.watchdog_interval() == expected


def _drain(sock: socket.socket) -> list[bytes]:
    sock.settimeout(0.01)
    out = []
    try:
        while True:
            out.append(sock.recv(4096))
    except TimeoutError:
        return out


@pytest.mark.parametrize(("healthy", "pings"), [(True, True), (False, False)])
def test_watchdog_loop_pings_only_while_healthy(
    monkeypatch: pytest.MonkeyPatch, abstract_socket: socket.socket, healthy: bool, pings: bool
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # 0.1 s: a ping every 0.05 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    async def run() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sdnotify.watchdog_loop(lambda: healthy), 0.3)

    asyncio.run(run())
    got = _drain(abstract_socket)
    assert (len(got) >= 3 and set(got) == {b"WATCHDOG=1"}) if pings else got == []


def test_watchdog_loop_returns_when_no_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    asyncio.run(asyncio.wait_for(sdnotify.watchdog_loop(), 1))


def test_listen_fds_for_another_pid_returns_nothing_and_clears_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "qwen-appliance.socket")
    assert sdnotify.listen_fds() == []
    assert not any(k.startswith("LISTEN_") for k in os.environ)


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def _run_wrapped(
    script: str, pass_fds: tuple[int, ...] = (), connect: int | None = None
) -> dict[str, object]:
    """Run CHILD under a bash wrapper that sets fd 3 and LISTEN_* and then execs Python (same pid)."""
    cmd = ["bash", "-c", script + ' exec "$PY" -c "$CHILD"']
    env = {**os.environ, "PY": sys.executable, "CHILD": CHILD}
    proc = subprocess.Popen(cmd, env=env, pass_fds=pass_fds, stdout=subprocess.PIPE, text=True)
    reply = b""
    if connect is not None:
        with socket.create_connection(("127.0.0.1", connect), timeout=20) as conn:
            reply = conn.recv(100)
    out, _ = proc.communicate(timeout=30)
    info: dict[str, object] = json.loads(out)
    if connect is not None:
        assert reply == b"served by the inherited socket"
    return info


def test_listen_fds_adopts_an_inherited_socket_as_fd_3() -> None:
    with _listener() as sock:
        fd, port = sock.fileno(), sock.getsockname()[1]
        info = _run_wrapped(f"exec 3<&{fd} {fd}<&-; export LISTEN_FDS=1 LISTEN_PID=$$;", (fd,), port)
    assert info == {
        "count": 1,
        "fds": [3],
        "env_left": [],
        "inheritable": [False],
        "addresses": [["127.0.0.1", port]],
    }


def test_listen_fds_ignores_sockets_meant_for_another_process() -> None:
    with _listener() as sock:
        fd = sock.fileno()
        info = _run_wrapped(f"exec 3<&{fd}; export LISTEN_FDS=1 LISTEN_PID=$PPID;", (fd,))
    assert info["count"] == 0 and info["env_left"] == []


def test_listen_fds_refuses_a_non_socket() -> None:
    info = _run_wrapped("exec 3</dev/null; export LISTEN_FDS=1 LISTEN_PID=$$;")
    assert "fd 3 from systemd is not a socket" in str(info["error"])


def test_listen_fds_refuses_a_socket_that_does_not_listen() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fd = sock.fileno()
        info = _run_wrapped(f"exec 3<&{fd} {fd}<&-; export LISTEN_FDS=1 LISTEN_PID=$$;", (fd,))
    assert "not a listening stream socket" in str(info["error"])


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate absent")
def test_listen_fds_under_systemd_socket_activate() -> None:
    """systemd's own tool binds the port, waits for a connection and execs the program with LISTEN_*."""
    with _listener() as probe:
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        conn = _connect_retrying(port)
        with conn:
            assert conn.recv(100) == b"served by the inherited socket"
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    info = json.loads(out)
    assert info["count"] == 1 and info["fds"] == [3] and info["env_left"] == [], err


def _connect_retrying(port: int) -> socket.socket:
    for _ in range(200):
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=20)
        except ConnectionRefusedError:
            time.sleep(0.02)
    raise AssertionError(f"nothing listens on {port}")
