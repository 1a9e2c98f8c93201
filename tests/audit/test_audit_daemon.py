"""The audit trail of the real daemon: every request recorded first, no content, full disk, SIGKILL."""

from __future__ import annotations

import base64
import io
import json
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from conftest import ROOT, Daemon, DaemonFactory, TinyModel, data_uri, free_port, make_setup, png_bytes
from helpers import by_request, records, run_cli, wait_for
from PIL import Image, PngImagePlugin

from appliance.audit.log import list_files, load_hmac_key
from appliance.audit.verify import verify

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


def audit_key(d: Daemon) -> bytes:
    return load_hmac_key(d.setup.policy.parent / "audit.key")


def test_every_request_and_refusal_is_recorded(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    seen: dict[str, int] = {}
    with d.client() as c:
        for r in (
            c.post("/v1/chat/completions", json=CHAT),
            c.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer x"}),
            c.post("/v1/chat/completions", json={"messages": "no"}),
            c.get("/nowhere"),
            c.get("/healthz"),
        ):
            seen[r.headers["x-request-id"]] = r.status_code
        with c.stream("POST", "/v1/chat/completions", json=dict(CHAT, stream=True)) as s:
            list(s.iter_lines())
            seen[s.headers["x-request-id"]] = 200
            stream_id = s.headers["x-request-id"]
    assert d.stop() == 0
    recs = records(d)
    index = by_request(recs)
    for rid, status in seen.items():
        assert index[rid][0]["status"] == status, index[rid]
    assert [r["event"] for r in index[stream_id]] == ["request", "request.complete"]
    assert index[stream_id][1]["completion_tokens"] >= 1
    refused = [r for r in recs if r.get("status") == 401]
    assert refused and refused[0]["reason"].startswith("authentication_error")
    events = [r["event"] for r in recs]
    assert events[:3] == ["audit.start", "daemon.start", "model.load"]
    assert events[-2:] == ["daemon.stop", "audit.seal"]
    assert verify(d.setup.policy.parent / "audit", audit_key(d), expect_sealed=True).ok


def png_with_text(marker: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", marker)
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (10, 200, 10)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_canaries_never_written_anywhere(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    marks = {
        k: f"CANARY{k.upper()}{random.randrange(10**9)}"
        for k in ("prompt", "system", "image", "token", "api", "reply")
    }
    image = png_with_text(marks["image"])
    with d.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={
                "max_tokens": 4,
                "messages": [
                    {"role": "system", "content": marks["system"]},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": marks["prompt"]},
                            {"type": "image_url", "image_url": {"url": data_uri(image)}},
                        ],
                    },
                    {"role": "assistant", "content": marks["reply"]},
                    {"role": "user", "content": "ok"},
                ],
            },
        )
        assert r.status_code == 200
        assert c.post("/api/v1/chat", json={"prompt": marks["api"], "max_tokens": 2}).status_code == 200
        bad = c.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {marks['token']}"})
        assert bad.status_code == 401
    assert d.stop() == 0
    written = [p for p in d.setup.policy.parent.rglob("*") if p.is_file()] + [d.log_path]
    assert any(p.parent.name == "audit" for p in written)
    for path in written:
        blob = path.read_bytes()
        for mark in marks.values():
            assert mark.encode() not in blob, (mark, path)
            assert base64.b64encode(mark.encode())[:16] not in blob, (mark, path)


def test_audit_hmac_finds_a_known_prompt_and_image(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    d = daemon_factory()
    image = png_bytes((1, 2, 3))
    (tmp_path / "doc.png").write_bytes(image)
    with d.client() as c:
        r = c.post(
            "/api/v1/chat",
            json={
                "prompt": "Quarterly risk of client 4711",
                "image": base64.b64encode(image).decode(),
                "max_tokens": 2,
            },
        )
    rid = r.headers["x-request-id"]
    rec = by_request(records(d))[rid][0]
    policy = str(d.setup.policy)
    text = subprocess.run(
        [sys.executable, "-m", "appliance", "audit", "hmac", "--policy", policy],
        input=b"Quarterly risk of client 4711",
        capture_output=True,
        cwd=ROOT,
    )
    img = subprocess.run(
        [sys.executable, "-m", "appliance", "audit", "hmac", "--policy", policy, "--image"],
        input=image,
        capture_output=True,
        cwd=ROOT,
    )
    assert text.stdout.decode().strip() == rec["prompt_hmac"]
    assert img.stdout.decode().strip() == rec["image_hmac"][0]
    assert rec["images"] == [{"width": 64, "height": 64, "bytes": len(image), "format": "PNG"}]


def test_full_disk_refuses_then_recovers(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    audit_file = list_files(d.setup.policy.parent / "audit")[-1]
    limit = audit_file.stat().st_size + 200  # less than one more request record
    resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    ok: list[str] = []
    with d.client() as c:
        for _ in range(3):
            r = c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 503, r.text
            assert "audit" in r.json()["error"]["message"] and "choices" not in r.text
        ready = c.get("/readyz")
        assert ready.status_code == 503
        resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert wait_for(lambda: c.get("/readyz").status_code == 200)
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
        ok.append(r.headers["x-request-id"])
    assert d.stop() == 0
    assert ok[0] in by_request(records(d))
    assert verify(d.setup.policy.parent / "audit", audit_key(d), expect_sealed=True).ok
    # (the "NOT writable" line itself is lost: the file-size limit also stops the daemon's own log file)
    assert "audit trail writable again" in d.log()


def test_audit_dir_unusable_at_start(tmp_path: Path, tiny_model: TinyModel) -> None:
    setup = make_setup(tmp_path / "s", tiny_model, free_port())
    (setup.policy.parent / "blocker").write_text("a file, not a directory")
    setup.policy.write_text(setup.policy.read_text().replace('dir = "audit"', 'dir = "blocker/audit"'))
    r = run_cli("serve", "--policy", str(setup.policy))
    assert r.returncode == 2 and "audit trail cannot be written" in r.stderr and "hint" in r.stderr


def test_sigkill_at_random_moments_keeps_the_chain(tmp_path: Path, tiny_model: TinyModel) -> None:
    """20 crash cycles under load: every line parses, the chain verifies, every 200 is in the log."""
    from conftest import start_daemon

    port = free_port()
    setup = make_setup(tmp_path / "s", tiny_model, port)
    acknowledged: list[str] = []
    rng = random.Random(7)
    audit_dir = setup.policy.parent / "audit"
    for cycle in range(20):
        d = start_daemon(setup, port, tmp_path / f"d{cycle}.log")
        stop = threading.Event()

        def load(d: Daemon = d, stop: threading.Event = stop) -> None:
            with d.client(timeout=10) as c:
                while not stop.is_set():
                    try:
                        r = c.post("/v1/chat/completions", json=CHAT)
                    except httpx.HTTPError:
                        return
                    if r.status_code == 200:
                        acknowledged.append(r.headers["x-request-id"])

        workers = [threading.Thread(target=load) for _ in range(3)]
        for w in workers:
            w.start()
        time.sleep(rng.uniform(0.05, 0.6))
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        stop.set()
        for w in workers:
            w.join(10)
        if cycle % 5 == 4:  # a power cut mid-write leaves half a record
            with list_files(audit_dir)[-1].open("ab") as f:
                f.write(b'{"ts":"2026-11-25T00:00:00.000Z","seq":99999,"event":"requ')
            continue
        r = verify(audit_dir, load_hmac_key(setup.policy.parent / "audit.key"))
        assert r.ok, (cycle, r.problem)
    d = start_daemon(setup, port, tmp_path / "final.log")
    d.stop()
    r = verify(audit_dir, load_hmac_key(setup.policy.parent / "audit.key"), expect_sealed=True)
    assert r.ok, r.problem
    recs = [json.loads(x) for p in list_files(audit_dir) for x in p.read_bytes().splitlines()]
    logged = {x.get("request_id") for x in recs}
    assert len(acknowledged) > 20
    assert not set(acknowledged) - logged
    assert sum(1 for x in recs if x["event"] == "audit.repair") == 4


def test_a_broken_socket_unit_stops_start_up_with_the_trail_sealed(
    tmp_path: Path, tiny_model: TinyModel
) -> None:
    """Issue 12: LISTEN_FDS naming a file, not a socket, ends in exit 2 with a hint, never a traceback with
    the trail unsealed (ListenFdsError is a SetupError, so start-up writes daemon.stop and the seal)."""
    setup = make_setup(tmp_path / "s", tiny_model, free_port())
    script = (
        f"exec 3</dev/null; export LISTEN_PID=$$ LISTEN_FDS=1; exec {sys.executable} -m appliance "
        f"serve --policy {setup.policy}"
    )
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "fd 3 from systemd is not a socket" in r.stderr and "hint" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    checked = run_cli("audit", "verify", "--policy", str(setup.policy), "--expect-sealed")
    assert checked.returncode == 0, checked.stderr
    stop = [
        x
        for x in (
            json.loads(line)
            for p in list_files(setup.policy.parent / "audit")
            for line in p.read_bytes().splitlines()
        )
        if x["event"] == "daemon.stop"
    ]
    assert stop and "not a socket" in stop[-1]["reason"]
