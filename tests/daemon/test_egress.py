"""Zero egress: a full cycle (start, model load, text and image requests, reload, stop) connects nowhere.

The daemon runs in a network namespace that has only loopback (`unshare -n`; the drill is root-only, as CI
is), under `strace -f`. Every connect(), sendto(), sendmsg() or sendmmsg() naming an address, every bind()
and every open of a name-resolution file is read back from the trace: allowed are only the listener's own
bind, AF_UNIX datagrams to the local journal, syslog or systemd notify socket, and netlink (the kernel).
Replies to clients go out on accepted sockets (uvloop writes them), which name no address.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TinyModel, free_port, make_setup, png_bytes

pytestmark = pytest.mark.slow
NAME_FILES = ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf")
LOCAL_UNIX = ("/run/systemd/journal/socket", "/dev/log", "/run/systemd/notify")
ADDRESSED = re.compile(r"\b(connect|sendto|sendmsg|sendmmsg)\((\d+), (.*)")
BIND = re.compile(
    r"\bbind\(\d+, \{sa_family=AF_INET6?, sin6?_port=htons\((\d+)\), "
    r".*inet_(?:addr|pton)\((?:AF_INET6?, )?\"([^\"]+)\""
)


def outbound(trace: str) -> list[str]:
    """Calls that name an address other than a local AF_UNIX socket or netlink (kernel, not network)."""
    bad = []
    for line in trace.splitlines():
        m = ADDRESSED.search(line)
        if not m or "sa_family=" not in m.group(3):
            continue  # sendto/sendmsg on a connected socket (an accepted client) names no address
        if "sa_family=AF_NETLINK" in line:
            continue
        if "sa_family=AF_UNIX" in line and any(p in line for p in LOCAL_UNIX):
            continue
        bad.append(line.strip())
    return bad


def foreign_binds(trace: str, port: int) -> list[str]:
    """IP sockets bound anywhere but the listener (a resolver or an outbound client would need one)."""
    return [
        line.strip()
        for line in trace.splitlines()
        if "bind(" in line
        and "AF_INET" in line
        and not ((m := BIND.search(line)) and m.group(1) == str(port) and m.group(2) == "127.0.0.1")
    ]


def name_lookups(trace: str) -> list[str]:
    return [
        line.strip()
        for line in trace.splitlines()
        if re.search(r"\bopen(at)?\(", line) and any(f'"{f}"' in line for f in NAME_FILES)
    ]


def test_full_cycle_opens_no_outbound_connection(tmp_path: Path, tiny_model: TinyModel) -> None:
    assert shutil.which("strace"), "strace is missing: run `make test`, which installs it"
    assert os.geteuid() == 0, "the drill needs root for its network namespace (unshare -n)"
    port = free_port()
    setup = make_setup(tmp_path / "s", tiny_model, port)
    (setup.policy.parent / "token").write_text(setup.token)
    (setup.policy.parent / "data" / "scan.png").write_bytes(png_bytes())
    log = tmp_path / "strace.log"
    r = subprocess.run(
        [
            "unshare",
            "-n",
            sys.executable,
            str(ROOT / "tests/egress_cycle.py"),
            str(setup.policy.parent),
            str(port),
            str(log),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    daemon_log = (setup.policy.parent / "daemon.log").read_text(errors="replace")
    assert r.returncode == 0, r.stderr[-3000:] + daemon_log[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary == {"statuses": [200, 200, 200], "exit": 0}, (summary, daemon_log[-3000:])
    assert "policy reload (SIGHUP) accepted" in daemon_log
    trace = log.read_text(errors="replace")
    assert re.search(r"\baccept4?\(", trace), "strace saw no accepted connection: it missed the daemon"
    assert outbound(trace) == []
    assert foreign_binds(trace, port) == []
    assert name_lookups(trace) == []


def test_the_detectors_flag_what_they_must() -> None:
    """The trace readers themselves: a DNS query, an outbound TLS connect and a resolver read are caught."""
    trace = "\n".join(
        [
            '9 connect(7, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.0.0.1")}, 16) = -1',
            '9 sendto(7, "\\x12", 30, 0, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=0}, 28) = 30',  # noqa: E501
            '9 sendto(8, "\\x17\\x03", 120, 0, NULL, 0) = 120',
            '9 sendto(5, "x", 1, 0, {sa_family=AF_UNIX, sun_path="/run/systemd/journal/socket"}, 30) = 1',
            '9 openat(AT_FDCWD, "/etc/resolv.conf", O_RDONLY|O_CLOEXEC) = 9',
            '9 bind(6, {sa_family=AF_INET, sin_port=htons(0), sin_addr=inet_addr("0.0.0.0")}, 16) = 0',
            '9 bind(6, {sa_family=AF_INET, sin_port=htons(8443), sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
        ]
    )
    assert len(outbound(trace)) == 2
    assert len(name_lookups(trace)) == 1
    assert len(foreign_binds(trace, 8443)) == 1
