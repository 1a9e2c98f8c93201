"""TLS quality of the running daemon, judged by sslyze against Mozilla's "intermediate" profile."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import ROOT, Daemon

SSLYZE = ROOT / ".venv-tools/bin/python"


def test_mozilla_intermediate_compliant(daemon: Daemon, tmp_path: Path) -> None:
    assert SSLYZE.exists(), "sslyze's environment is missing: run `make test`, which creates it"
    s = daemon.setup
    out = tmp_path / "scan.json"
    r = subprocess.run(
        [
            str(SSLYZE),
            "-m",
            "sslyze",
            "--mozilla_config=intermediate",
            "--certinfo_ca_file",
            str(s.ca_cert),
            "--cert",
            str(s.client_cert),
            "--key",
            str(s.client_key),
            f"--json_out={out}",
            daemon.url.removeprefix("https://"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert f"{daemon.url.removeprefix('https://')}: OK - Compliant." in r.stdout, r.stdout[-2000:]
    scan = json.loads(out.read_text())["server_scan_results"][0]["scan_result"]
    for old in (
        "ssl_2_0_cipher_suites",
        "ssl_3_0_cipher_suites",
        "tls_1_0_cipher_suites",
        "tls_1_1_cipher_suites",
    ):
        assert scan[old]["result"]["accepted_cipher_suites"] == [], old
    assert scan["tls_1_3_cipher_suites"]["result"]["accepted_cipher_suites"]
    assert scan["tls_compression"]["result"]["supports_compression"] is False
    assert scan["heartbleed"]["result"]["is_vulnerable_to_heartbleed"] is False
