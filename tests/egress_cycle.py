"""One full daemon cycle under strace, run by tests/test_egress.py inside a loopback-only network namespace.

Usage: python tests/egress_cycle.py SETUP_DIR PORT STRACE_LOG -> prints a JSON summary on stdout.
Start-up, model load, a text and an image request, a reload, shutdown: every socket, bind, connect,
addressed send, accept and open the daemon makes lands in STRACE_LOG.
"""

from __future__ import annotations

import base64
import fcntl
import json
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, png_bytes

SIOCSIFFLAGS, IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x8914, 0x1, 0x8, 0x40
TRACE = "trace=socket,bind,connect,sendto,sendmsg,sendmmsg,accept,accept4,openat,open"


def loopback_up() -> None:
    """A new network namespace has `lo` down; bring it up without iproute2."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING))


def client(setup: Path, port: int) -> httpx.Client:
    import ssl

    ctx = ssl.create_default_context(cafile=str(setup / "tls/ca.crt"))
    ctx.load_cert_chain(str(setup / "clients/tester/client.crt"), str(setup / "clients/tester/client.key"))
    token = (setup / "token").read_text().strip()
    return httpx.Client(
        base_url=f"https://127.0.0.1:{port}",
        verify=ctx,
        timeout=30,
        headers={"authorization": f"Bearer {token}"},
    )


def wait_ready(c: httpx.Client, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if c.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit(f"daemon not ready (exit {proc.poll()})")


def cycle(setup: Path, port: int, c: httpx.Client, proc: subprocess.Popen[bytes]) -> dict[str, object]:
    wait_ready(c, proc)
    image = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    text = c.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    )
    pic = c.post(
        "/v1/chat/completions",
        json={
            "max_tokens": 4,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image}},
                        {"type": "text", "text": "what?"},
                    ],
                }
            ],
        },
    )
    daemon = psutil.Process(proc.pid).children()[0]  # signals go to the daemon, not to strace
    daemon.send_signal(signal.SIGHUP)
    time.sleep(1.5)
    after = c.post("/api/v1/chat", json={"prompt": "again", "max_tokens": 2})
    daemon.send_signal(signal.SIGTERM)
    code = proc.wait(60)  # strace exits with its tracee's status
    return {"statuses": [text.status_code, pic.status_code, after.status_code], "exit": code}


def main() -> None:
    setup, port, log = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    loopback_up()
    cmd = [
        "strace",
        "-f",
        "-qq",
        "-e",
        TRACE,
        "-o",
        log,
        sys.executable,
        "-m",
        "appliance",
        "serve",
        "--policy",
        str(setup / "policy.toml"),
    ]
    with open(setup / "daemon.log", "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            with client(setup, port) as c:
                print(json.dumps(cycle(setup, port, c, proc)))
        finally:
            for child in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
                child.kill()  # a failed drill leaves no daemon behind in the namespace
            proc.wait(30)


if __name__ == "__main__":
    main()
