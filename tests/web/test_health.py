"""Health, readiness gating and metrics of the real daemon, on a machine with or without a GPU."""

from __future__ import annotations

import signal
from pathlib import Path

import llama_cpp
from conftest import DaemonFactory, TinyModel, add_client, free_port, make_setup
from helpers import run_cli, wait_for

from appliance.admin.init import InitResult
from appliance.engine.gpu import GpuMonitor

TOKENS: dict[str, str] = {}


def prepare(setup: InitResult) -> None:
    TOKENS["admin"] = add_client(setup.policy, "ops", scopes=("admin", "metrics"))


def test_health_report_and_metrics(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(prepare=prepare)
    with d.client() as c:
        assert (
            c.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            ).status_code
            == 200
        )
        assert c.get("/api/v1/health").status_code == 403  # chat clients are not admins
        assert c.get("/metrics").status_code == 403
    with d.client(token=TOKENS["admin"]) as c:
        h = c.get("/api/v1/health").json()
        text = c.get("/metrics").text
    gpu, offload = h["gpu"], h["engine"]["gpu_offload"]
    assert isinstance(gpu["available"], bool) and (gpu["available"] or gpu["reason"])
    assert d.readyz()["gpu_offload"] == {"supported": offload["supported"], "active": offload["active"]}
    assert isinstance(offload["supported"], bool) and h["not_ready"] == []
    assert h["host"]["audit_dir_free_mb"] > 0 and h["host"]["memory_total_mb"] > 0
    assert 360 <= h["certificates"]["server_days_left"] <= 365
    assert h["policy"]["sha256"] and h["queue"]["waiting"] == 0
    assert 'qwa_requests_total{client="tester",route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'qwa_requests_total{client="tester",route="/api/v1/health",status="403"} 1.0' in text
    assert 'qwa_refusals_total{reason="permission_error"}' in text
    assert "qwa_audit_write_seconds_count" in text
    assert f"qwa_gpu_available {1.0 if gpu['available'] else 0.0}" in text
    assert "qwa_time_to_first_token_seconds_count 1.0" in text
    assert 'qwa_certificate_expiry_days{certificate="server"}' in text
    assert "qwa_completion_tokens_total 3.0" in text


def test_readyz_503_while_a_critical_condition_holds(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    policy = d.setup.policy
    base = policy.read_text()
    with d.client() as c:
        assert c.get("/readyz").status_code == 200
        policy.write_text(base + "\n[health]\nmin_audit_free_mb = 900000000\n")
        d.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: c.get("/readyz").status_code == 503)
        body = c.get("/readyz").json()
        assert "audit disk" in body["reasons"][0] and "min_audit_free_mb" in body["reasons"][0]
        policy.write_text(base)
        assert wait_for(lambda: c.get("/readyz").status_code == 200)


def test_require_gpu_refuses_cpu_fallback(tmp_path: Path, tiny_model: TinyModel) -> None:
    """n_gpu_layers = 0 makes it CPU inference on every box; the refusal names the first reason that holds."""
    setup = make_setup(
        tmp_path / "s",
        tiny_model,
        free_port(),
        {"threads = 1 ": "require_gpu = true\nthreads = 1 ", "n_gpu_layers = -1": "n_gpu_layers = 0"},
    )
    r = run_cli("serve", "--policy", str(setup.policy))
    assert r.returncode == 2
    assert "require_gpu = true" in r.stderr and "GGML_CUDA" in r.stderr
    monitor = GpuMonitor()
    gpu_found = monitor.poll_once()["available"]
    monitor.stop()
    if not llama_cpp.llama_supports_gpu_offload():
        assert "no GPU offload" in r.stderr
    else:
        assert ("[model] n_gpu_layers = 0" if gpu_found else "no usable GPU") in r.stderr
