"""Issue 11 defect 7: idle sockets cannot use up the daemon's file descriptors.

Connections are capped in total and per source address, a socket that completes no TLS handshake is closed
after the handshake deadline, and every shed connection is counted and logged.
"""

from __future__ import annotations

import configparser
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from conftest import ROOT, Daemon, DaemonFactory, TinyModel, add_client, free_port, make_setup
from helpers import run_cli, wait_for
from rawtls import REFUSED, ask, metric, port

from appliance.admin.init import InitResult
from appliance.config.settings import SETTINGS
from appliance.daemon.connections import FD_RESERVE

ATTACKER = "127.0.0.23"


def idle(d: Daemon, n: int, source: str = ATTACKER) -> list[socket.socket]:
    """n TCP connections that never start TLS."""
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port(d)), timeout=5, source_address=(source, 0))
        out.append(s)
    return out


def closed(s: socket.socket, wait: float = 0.05) -> bool:
    """EOF or reset: the server let go of it; a timeout means it still holds it."""
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def with_metrics_client(tokens: dict[str, str]) -> Callable[[InitResult], None]:
    def prepare(setup: InitResult) -> None:
        tokens["m"] = add_client(setup.policy, "watcher", ("metrics",))

    return prepare


def test_one_source_cannot_lock_out_another(daemon_factory: DaemonFactory) -> None:
    tokens: dict[str, str] = {}
    d = daemon_factory(
        {
            "max_connections_per_source = 64": "max_connections_per_source = 8",
            "handshake_timeout_s = 10": "handshake_timeout_s = 3",
        },
        prepare=with_metrics_client(tokens),
    )
    flood = idle(d, 40)
    started = time.monotonic()
    t0 = time.monotonic()
    assert ask(d, (d.setup.client_cert, d.setup.client_key)) == 200  # from 127.0.0.1
    assert time.monotonic() - t0 < 2.0, "another source had to wait"
    assert wait_for(lambda: sum(closed(s) for s in flood) >= 32, timeout=5)  # over the cap: shed at once
    held = [s for s in flood if not closed(s)]
    assert len(held) == 8
    assert wait_for(lambda: all(closed(s) for s in held), timeout=6)  # the handshake deadline
    assert time.monotonic() - started >= 2.5, "closed before the deadline"
    for s in flood:
        s.close()
    assert metric(d, tokens["m"], "qwa_connections_shed_total", reason="source_cap") >= 32
    assert wait_for(
        lambda: metric(d, tokens["m"], "qwa_connections_shed_total", reason="handshake_timeout") >= 8
    )
    log = d.log()
    assert "closed connections below TLS" in log and ATTACKER in log
    assert "max_connections_per_source = 8" in log
    assert log.count("closed connections below TLS") <= 3, "shedding must not flood the log"
    assert ask(d, (d.setup.client_cert, d.setup.client_key), source=ATTACKER) == 200  # freed again


def test_a_stalled_handshake_is_cut_off_too(daemon_factory: DaemonFactory) -> None:
    """Half a ClientHello, then silence: closed at the handshake deadline, not uvicorn's 60 s."""
    d = daemon_factory({"handshake_timeout_s = 10": "handshake_timeout_s = 2"})
    s = socket.create_connection(("127.0.0.1", port(d)), timeout=5)
    s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    started = time.monotonic()
    assert wait_for(lambda: closed(s), timeout=6)
    assert 1.5 <= time.monotonic() - started < 5
    s.close()


def test_total_cap_sheds_everyone_and_recovers(daemon_factory: DaemonFactory) -> None:
    tokens: dict[str, str] = {}
    d = daemon_factory(
        {
            "max_connections = 1000": "max_connections = 6",
            "handshake_timeout_s = 10": "handshake_timeout_s = 2",
        },
        prepare=with_metrics_client(tokens),
    )
    flood = idle(d, 6)
    assert ask(d, (d.setup.client_cert, d.setup.client_key)) == REFUSED  # full: shed before TLS
    assert wait_for(lambda: all(closed(s) for s in flood), timeout=5)
    for s in flood:
        s.close()
    assert wait_for(lambda: ask(d, (d.setup.client_cert, d.setup.client_key)) == 200, timeout=5)
    assert metric(d, tokens["m"], "qwa_connections_shed_total", reason="total_cap") >= 1
    assert "max_connections = 6" in d.log()


def test_caps_follow_a_reload(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory({"handshake_timeout_s = 10": "handshake_timeout_s = 5"})
    text = d.setup.policy.read_text()
    d.setup.policy.write_text(
        text.replace("max_connections_per_source = 64", "max_connections_per_source = 2")
    )
    assert wait_for(lambda: "(file changed) accepted" in d.log() or "(SIGHUP) accepted" in d.log())
    flood = idle(d, 5)
    assert wait_for(lambda: sum(closed(s) for s in flood) == 3, timeout=3)
    for s in flood:
        s.close()


def test_connection_cap_must_fit_the_descriptor_limit(tmp_path: Path, tiny_model: TinyModel) -> None:
    """A cap the process cannot hold is refused at start-up, naming the key and LimitNOFILE."""
    setup = make_setup(
        tmp_path / "s", tiny_model, free_port(), {"max_connections = 1000": "max_connections = 5000"}
    )
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = 1024 if hard == resource.RLIM_INFINITY else min(hard, 1024)

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    r = subprocess.run(
        [sys.executable, "-m", "appliance", "serve", "--policy", str(setup.policy)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        preexec_fn=low,
    )
    assert r.returncode == 2, r.stderr
    assert "server.max_connections" in r.stderr and "LimitNOFILE" in r.stderr
    assert run_cli("policy", "check", str(setup.policy)).returncode == 0  # a valid policy, on another host


def test_unit_file_descriptor_limit_is_above_the_cap() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((ROOT / "systemd/qwen-appliance.service").read_text())
    nofile = int(unit["Service"]["LimitNOFILE"])
    default = next(s.default for s in SETTINGS if s.dotted == "server.max_connections")
    assert nofile >= default + FD_RESERVE
