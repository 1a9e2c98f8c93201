"""Issue 11, defect 11: `token revoke` and `cert revoke` return only once a running daemon enforces the
new policy, so the very next request (no sleep) is refused; they say so when no daemon runs, and fail when
the daemon rejects the file.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import Daemon, DaemonFactory, add_client, issue_client_cert
from helpers import cli_main as _cli

from appliance import files
from appliance.config.live import STATUS_NAME
from appliance.security import pki


def _start(daemon_factory: DaemonFactory) -> tuple[Daemon, dict[str, str]]:
    tokens: dict[str, str] = {}

    def prepare(setup) -> None:  # type: ignore[no-untyped-def]
        tokens["victim"] = add_client(setup.policy, "victim", ("models",))
        tokens["other"] = add_client(setup.policy, "other", ("models",))

    return daemon_factory(prepare=prepare), tokens


def _models(d: Daemon, token: str, cert: tuple[Path, Path] | None = None) -> int:
    with d.client(token=token, cert=cert, timeout=10) as c:
        return c.get("/v1/models").status_code


def test_token_revoke_is_in_force_when_it_returns(
    daemon_factory: DaemonFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    d, tokens = _start(daemon_factory)
    assert _models(d, tokens["victim"]) == 200
    rc, out, err = _cli(capsys, "token", "revoke", "victim", "--policy", d.setup.policy)
    assert _models(d, tokens["victim"]) == 401  # immediately: no sleep, no polling
    assert rc == 0 and f"pid {d.proc.pid}) now enforces" in out, err
    assert _models(d, tokens["other"]) == 200
    assert "policy reload (SIGHUP) accepted" in d.log()


def test_cert_revoke_is_in_force_when_it_returns(
    daemon_factory: DaemonFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    d, tokens = _start(daemon_factory)
    crt, key, fingerprint = issue_client_cert(d.setup, "laptop")
    assert _models(d, tokens["other"], cert=(crt, key)) == 200
    rc, out, err = _cli(capsys, "cert", "revoke", crt, "--policy", d.setup.policy)
    assert _models(d, tokens["other"], cert=(crt, key)) == 403
    assert rc == 0 and "now enforces" in out and fingerprint in out, err
    assert fingerprint in d.setup.policy.read_text()
    assert _models(d, tokens["other"]) == 200  # the set-up's own certificate still works
    rc, out, _ = _cli(capsys, "cert", "revoke", "--sha256", fingerprint.upper(), "--policy", d.setup.policy)
    assert rc == 0 and "Already revoked" in out
    ca = d.setup.policy.parent / "tls/ca.crt"
    rc, _, err = _cli(capsys, "cert", "revoke", ca, "--policy", d.setup.policy)
    assert rc == 2 and "is a CA certificate" in err


def test_revoke_fails_when_the_daemon_rejects_the_new_policy(
    daemon_factory: DaemonFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI validates the policy itself; a server certificate that no longer matches its key is only
    found by the daemon, which keeps the old policy: the command must say so and fail."""
    d, tokens = _start(daemon_factory)
    tls = d.setup.policy.parent / "tls"
    stranger = pki.new_server_cert(pki.new_ca("another CA"), [])
    files.write_public(tls / "server.crt", pki.cert_pem(stranger.cert))
    rc, out, err = _cli(capsys, "token", "revoke", "victim", "--policy", d.setup.policy)
    assert rc == 2 and "REJECTED" in err and "server.tls" in err, (out, err)
    assert "Revoked client 'victim'" in out  # the file did change: the admin is told both
    assert _models(d, tokens["victim"]) == 200  # the old policy is still the one enforced


def test_no_daemon_running_is_said_and_succeeds(
    daemon_factory: DaemonFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    d, _ = _start(daemon_factory)
    status = d.setup.policy.parent / "audit" / STATUS_NAME
    assert json.loads(status.read_text())["pid"] == d.proc.pid
    d.stop(signal.SIGKILL)  # a crash leaves a stale status file behind
    assert status.exists()
    rc, out, _ = _cli(capsys, "token", "revoke", "victim", "--policy", d.setup.policy)
    assert rc == 0 and "No daemon is running" in out
    assert 'name = "victim"' not in d.setup.policy.read_text()
