"""API fuzzing: schemathesis, every check, against the real daemon over mutual TLS with a real token.

The OpenAPI document is the daemon's own (`GET /openapi.json`, scope admin); the run is seeded and bounded,
so it is deterministic and finishes in about a minute on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, Daemon, DaemonFactory, add_client, png_bytes

from appliance.admin.init import InitResult

pytestmark = pytest.mark.slow
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
# Per operation; with the coverage phase this sends about 1,000 cases in under a minute.
MAX_EXAMPLES = int(os.environ.get("QWA_FUZZ_EXAMPLES", "300"))
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx"]
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "413", "415"]
"""
FUZZ_EDITS = {
    "max_tokens = 2048": "max_tokens = 16",
    "n_ctx = 4096": "n_ctx = 32768",
    "max_images = 8": "max_images = 3",
    "max_body_bytes = 20_000_000": "max_body_bytes = 4_000_000",
    "max_image_bytes = 10_000_000": "max_image_bytes = 1_000_000",
}


def prepare(tokens: dict[str, str]) -> object:
    def go(setup: InitResult) -> None:
        data = setup.policy.parent / "data"
        data.mkdir(exist_ok=True)
        (data / "scan.png").write_bytes(png_bytes())
        (data / "photo.jpg").write_bytes(png_bytes((10, 90, 200), fmt="JPEG"))
        tokens["admin"] = add_client(setup.policy, "auditor", scopes=("chat", "models", "metrics", "admin"))

    return go


def fetch_schema(d: Daemon, admin: str, out: Path) -> Path:
    """Admin scope gets the document; the chat-only client gets 403; there is no docs UI."""
    with d.client() as c:
        assert c.get("/openapi.json").status_code == 403
    with d.client(token=admin) as c:
        for ui in ("/schema", "/schema/swagger", "/docs", "/redoc"):  # no docs UI, not even for admin
            assert c.get(ui).status_code == 404, ui
    with d.client(token=admin) as c:
        r = c.get("/openapi.json")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    out.write_text(json.dumps(doc))
    return out


def run_schemathesis(d: Daemon, admin: str, schema: Path, work: Path) -> subprocess.CompletedProcess[str]:
    (work / "schemathesis.toml").write_text(CONFIG)
    s = d.setup
    env = dict(
        os.environ,
        SCHEMATHESIS_HOOKS="schemathesis_hooks",
        PYTHONPATH=str(ROOT / "tests"),
        QWA_FUZZ_MAX_IMAGES="3",
        QWA_FUZZ_DATA_FILES="scan.png,photo.jpg",
        NO_COLOR="1",
    )
    cmd = [
        str(SCHEMATHESIS),
        "--config-file",
        str(work / "schemathesis.toml"),
        "run",
        str(schema),
        "--url",
        d.url,
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "20261125",
        "--workers",
        "2",
        "--phases",
        "examples,coverage,fuzzing",
        "--generation-database",
        "none",
        "--request-timeout",
        "30",
        "--output-sanitize",
        "false",
        "--tls-verify",
        str(s.ca_cert),
        "--request-cert",
        str(s.client_cert),
        "--request-cert-key",
        str(s.client_key),
        "-H",
        f"Authorization: Bearer {admin}",
        "--report",
        "ndjson",
        "--report-ndjson-path",
        str(work / "events.ndjson"),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env, cwd=work)


def cases_run(events: Path) -> int:
    """The number of test cases schemathesis generated and sent, from its event log."""
    finished = [
        json.loads(line)["ScenarioFinished"]
        for line in events.read_text().splitlines()
        if line.startswith('{"ScenarioFinished"')
    ]
    return sum(len(f["recorder"].get("cases", {})) for f in finished)


def test_schemathesis_all_checks(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    tokens: dict[str, str] = {}
    d = daemon_factory(FUZZ_EDITS, prepare=prepare(tokens))  # type: ignore[arg-type]
    schema = fetch_schema(d, tokens["admin"], tmp_path / "openapi.json")
    r = run_schemathesis(d, tokens["admin"], schema, tmp_path)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-3000:]
    count = cases_run(tmp_path / "events.ndjson")
    print(f"schemathesis sent {count} generated cases")
    assert count >= 500, r.stdout[-3000:]
    assert d.proc.poll() is None
    assert "Traceback" not in d.log() and " ERROR " not in d.log()


def test_document_describes_every_api_route(tmp_path: Path) -> None:
    """No route is missing from the contract (the browser console's HTML pages are not API routes)."""
    from types import SimpleNamespace

    from appliance.admin.init import init
    from appliance.config.load import load_policy
    from appliance.web import openapi, routes
    from appliance.web.app import build_app

    setup = init(
        tmp_path / "s", listen="127.0.0.1:9443", model=tmp_path / "m.gguf", mmproj=None, client="tester"
    )
    policy = load_policy(setup.policy)
    gate = build_app(SimpleNamespace(policy=policy, trail=None))  # type: ignore[arg-type]
    served = {
        (r.path, m)
        for r in gate.app.routes
        for m in r.methods  # type: ignore[attr-defined]
        if m not in ("HEAD", "OPTIONS") and not r.path.startswith("/console")
    }
    doc = openapi.document(policy, SimpleNamespace(name="tiny"))  # type: ignore[arg-type]
    described = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    assert served == described
    assert routes.ROUTE_SCOPES["/openapi.json"] == "admin"
