"""Static analysis as a test, so CI catches a regression: bandit at medium severity finds nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

BANDIT = Path(sys.executable).parent / "bandit"


def test_bandit_medium_and_high_clean() -> None:
    """Every accepted finding carries an inline `# nosec BXXX` with its reason; anything new fails here."""
    r = subprocess.run(
        [str(BANDIT), "-r", "appliance", "-ll", "-q", "-f", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    report = json.loads(r.stdout)
    found = [
        f"{i['filename']}:{i['line_number']} {i['test_id']} {i['issue_text']}" for i in report["results"]
    ]
    assert found == [], "\n".join(found)
    assert r.returncode == 0 and not report["errors"], r.stderr[-2000:]
