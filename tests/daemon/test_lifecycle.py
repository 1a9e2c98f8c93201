"""Daemon life: queue limits, cancellation on disconnect, clean SIGTERM, refusing to start on bad input."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx
from conftest import DaemonFactory, TinyModel, free_port, make_setup
from helpers import LONG, LONG_EDITS, SHORT, run_cli, wait_for


def test_queue_full_gets_503_and_disconnect_cancels(daemon_factory: DaemonFactory) -> None:
    # One slot, so B must wait (with more slots B would be decoded alongside A: test_batching.py).
    d = daemon_factory({**LONG_EDITS, "max_queue = 16": "max_queue = 1", "parallel = 4": "parallel = 1"})
    results: dict[str, int] = {}
    with d.client() as a, a.stream("POST", "/v1/chat/completions", json=LONG) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()  # keep a reference: a collected iterator closes the stream
        next(lines)  # generation A is running

        def post_b() -> None:
            with d.client() as c:
                results["b"] = c.post("/v1/chat/completions", json=SHORT).status_code

        waiting = threading.Thread(target=post_b)
        waiting.start()  # B waits in the queue (max_queue = 1)
        assert wait_for(lambda: d.readyz()["queue"]["waiting"] == 1)
        with d.client() as c:
            full = c.post("/v1/chat/completions", json=SHORT)
        assert full.status_code == 503, full.text
        assert int(full.headers["retry-after"]) >= 1
        assert full.json()["error"]["type"] == "overloaded_error"
    # Leaving the stream early disconnects A; its generation stops and B runs.
    waiting.join(60)
    assert results == {"b": 200}
    assert wait_for(lambda: "cancelled after" in d.log())
    with d.client() as c:
        assert c.post("/v1/chat/completions", json=SHORT).status_code == 200


def test_sigterm_drains_in_flight_request_and_exits_zero(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(LONG_EDITS)
    body = dict(LONG, stream=False, max_tokens=8000)
    out: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: out.update(r=d.client().post("/v1/chat/completions", json=body)))
    t.start()
    assert wait_for(lambda: d.readyz()["queue"]["busy"])
    assert d.stop(signal.SIGTERM) == 0
    t.join(30)
    assert out["r"].status_code == 200
    assert out["r"].json()["usage"]["completion_tokens"] == 8000
    assert "Finished server process" in d.log()


def test_tiny_model_warning_and_model_facts_logged(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    log = d.log()
    assert "SMOKE-TEST MODEL" in log
    active = d.readyz()["gpu_offload"]["active"]  # a CUDA build on a GPU box offloads the tiny model too
    assert "sha256" in log and ("GPU offload ACTIVE" if active else "GPU offload not active") in log


def test_serve_refuses_bad_policy_and_missing_model(tmp_path: Path, tiny_model: TinyModel) -> None:
    setup = make_setup(tmp_path / "s", tiny_model, free_port())
    policy = setup.policy
    text = policy.read_text()
    policy.write_text(text.replace("max_queue = 16", "max_queue = -1"))
    r = run_cli("serve", "--policy", str(policy))
    assert r.returncode == 2
    assert str(policy) in r.stderr and "limits.max_queue" in r.stderr and "hint" in r.stderr
    policy.write_text(text.replace(str(tiny_model.model), str(tmp_path / "nope.gguf")))
    r = run_cli("serve", "--policy", str(policy))
    assert r.returncode == 2 and "nope.gguf" in r.stderr
    (tmp_path / "s/tls/server.key").chmod(0o644)
    policy.write_text(text)
    r = run_cli("serve", "--policy", str(policy))
    assert r.returncode == 2 and "chmod 600" in r.stderr


def test_init_json_and_file_modes(tmp_path: Path) -> None:
    r = run_cli("init", str(tmp_path / "s"), "--listen", "127.0.0.1:9555", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"policy", "url", "token", "ca_cert", "client_cert", "client_key"}
    assert out["url"] == "https://127.0.0.1:9555" and out["token"].startswith("qwa_")
    for key in ("client_key",):
        assert Path(out[key]).stat().st_mode & 0o077 == 0
    for key_file in (tmp_path / "s/tls").glob("*.key"):
        assert key_file.stat().st_mode & 0o777 == 0o600
    assert out["token"] not in Path(out["policy"]).read_text()
    again = run_cli("init", str(tmp_path / "s"))
    assert again.returncode == 2 and "already exists" in again.stderr
    check = run_cli("policy", "check", out["policy"])
    assert check.returncode == 2 and "models/model.gguf" in check.stderr


def test_non_streaming_client_that_leaves_cancels_its_generation(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(LONG_EDITS)
    body = dict(LONG, stream=False)
    with d.client(timeout=1.0) as c:
        try:
            c.post("/v1/chat/completions", json=body)
            raise AssertionError("30000 tokens should not finish within the client's timeout")
        except httpx.ReadTimeout:
            pass
    assert wait_for(lambda: "cancelled after" in d.log())
    assert not d.readyz()["queue"]["busy"]


def test_text_only_model_refuses_images(daemon_factory: DaemonFactory, tiny_model: TinyModel) -> None:
    d = daemon_factory({f'mmproj = "{tiny_model.mmproj}"': "# no mmproj"})
    assert d.readyz()["images"] is False
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with d.client() as c:
        text = c.post("/v1/chat/completions", json=SHORT)
        r = c.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": [image]}], "max_tokens": 2}
        )
    assert text.status_code == 200
    assert r.status_code == 400 and "mmproj" in r.json()["error"]["message"]


def test_port_in_use_is_a_clear_error(tmp_path: Path, tiny_model: TinyModel) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        setup = make_setup(tmp_path / "s", tiny_model, port)
        r = run_cli("serve", "--policy", str(setup.policy))
    assert r.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "hint" in r.stderr
