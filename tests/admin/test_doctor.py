"""`qwen-appliance doctor` on a real set-up: all checks run, failures are named with a hint."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import TinyModel, free_port, make_setup
from helpers import run_cli

from appliance.engine.gpu import GpuMonitor


def test_doctor_on_a_good_and_a_broken_setup(tmp_path: Path, tiny_model: TinyModel) -> None:
    setup = make_setup(tmp_path / "s", tiny_model, free_port())
    good = run_cli("doctor", "--policy", str(setup.policy))
    assert good.returncode == 0, good.stdout
    for check in (
        "policy valid",
        "file permissions",
        "certificates",
        "model files",
        "audit directory",
        "listen port",
        "llama.cpp build",
        "GPU (NVML)",
        "clock",
    ):
        assert check in good.stdout
    assert "matches its pinned SHA-256" in good.stdout and "0 failed" in good.stdout
    monitor = GpuMonitor()  # the box's own answer: a GPU box passes this check, a GPU-less one warns
    snap = monitor.poll_once()
    monitor.stop()
    if snap["available"]:
        assert "PASS  GPU (NVML)" in good.stdout and f"driver {snap['driver_version']}" in good.stdout
    else:
        assert f"no GPU: {snap['reason']}" in good.stdout

    os.chmod(setup.policy.parent / "tls/server.key", 0o644)
    (setup.policy.parent / "audit.key").unlink()
    bad = run_cli("doctor", "--policy", str(setup.policy))
    assert bad.returncode == 2
    assert "FAIL  file permissions" in bad.stdout and "chmod 600" in bad.stdout
    assert "FAIL  audit directory" in bad.stdout and "audit keygen" in bad.stdout
    assert "Traceback" not in bad.stdout + bad.stderr


def test_doctor_without_a_policy_still_reports(tmp_path: Path) -> None:
    r = run_cli("doctor", "--policy", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "FAIL  policy valid" in r.stdout and "skipped" in r.stdout
