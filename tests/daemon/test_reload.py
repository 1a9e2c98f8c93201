"""Live policy reload: SIGHUP and file changes, valid and invalid policies, certificates, under load."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

from conftest import Daemon, DaemonFactory, TinyModel, add_client, free_port, make_setup
from helpers import LONG_EDITS, run_cli, wait_for

from appliance.security import pki

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


def status(d: Daemon, token: str | None = None) -> int:
    with d.client(token=token) as c:
        return c.post("/v1/chat/completions", json=CHAT).status_code


def hup(d: Daemon) -> None:
    d.proc.send_signal(signal.SIGHUP)


def test_valid_reload_while_a_request_runs(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(LONG_EDITS)
    long = {
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 3000,
        "temperature": 0,
        "stream": True,
    }
    with d.client() as c, c.stream("POST", "/v1/chat/completions", json=long) as stream:
        lines = stream.iter_lines()
        next(lines)
        token = add_client(d.setup.policy, "zed")
        hup(d)
        assert wait_for(lambda: status(d, token) == 200)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"  # the in-flight request finished under the old policy
    assert "policy reload (SIGHUP) accepted" in d.log() or "(file changed) accepted" in d.log()
    assert status(d) == 200


def test_invalid_policy_is_rejected_whole_and_old_one_stays(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    policy = d.setup.policy
    good = policy.read_text()
    token = add_client(policy, "zed")
    hup(d)
    assert wait_for(lambda: status(d, token) == 200)
    policy.write_text(
        good.replace("max_queue = 16", "max_queue = 0").replace("[limits]", "[limits]\nspeed = 3")
    )
    hup(d)
    assert wait_for(lambda: "REJECTED" in d.log())
    log = d.log()
    assert str(policy) in log and "limits.max_queue" in log and "limits.speed" in log
    assert "hint" in log
    assert status(d, token) == 200 and status(d) == 200  # zed still exists: old policy in force


def test_file_change_alone_reloads(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    policy = d.setup.policy
    good = policy.read_text()
    token = add_client(policy, "zed")
    assert wait_for(lambda: status(d, token) == 200)  # no signal: the watcher saw the change
    policy.write_text(good)  # revoke zed by removing its table
    assert wait_for(lambda: status(d, token) == 401)
    assert "(file changed) accepted" in d.log()


def served_cert_sha256(d: Daemon) -> str:
    import socket

    ctx = d.ssl_context()
    with (
        socket.create_connection(("127.0.0.1", int(d.url.rsplit(":", 1)[1]))) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der
    return hashlib.sha256(der).hexdigest()


def test_certificates_are_reread_on_reload(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    tls = d.setup.policy.parent / "tls"
    before = served_cert_sha256(d)
    ca = pki.load(tls / "ca.crt", tls / "ca.key")
    fresh = pki.new_server_cert(ca, ["127.0.0.1"])
    pki.save(fresh, tls / "server.crt", tls / "server.key")
    from cryptography.hazmat.primitives import serialization

    want = hashlib.sha256(fresh.cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    hup(d)
    assert wait_for(lambda: served_cert_sha256(d) == want)
    assert want != before
    assert status(d) == 200


def test_reload_storm_under_load_drops_nothing(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    codes: list[int] = []

    def worker() -> None:
        with d.client() as c:
            for _ in range(8):
                codes.append(c.post("/v1/chat/completions", json=CHAT).status_code)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(15):
        hup(d)
        time.sleep(0.05)
    for t in threads:
        t.join(120)
    assert codes == [200] * 32
    assert d.proc.poll() is None
    assert d.log().count("policy reload (SIGHUP) accepted") >= 1


def test_unsafe_file_modes_refused(tmp_path: Path, tiny_model: TinyModel) -> None:
    setup = make_setup(tmp_path / "s", tiny_model, free_port())
    os.chmod(setup.policy, 0o664)
    r = run_cli("serve", "--policy", str(setup.policy))
    assert r.returncode == 2 and "chmod go-w" in r.stderr and str(setup.policy) in r.stderr
    os.chmod(setup.policy, 0o644)
    os.chmod(setup.policy.parent / "tls/server.crt", 0o666)  # noqa: S103 - the unsafe mode under test
    r = run_cli("policy", "check", str(setup.policy))
    assert r.returncode == 2 and "server.crt is writable by group or others" in r.stderr


def test_policy_check_cli(tmp_path: Path, tiny_model: TinyModel) -> None:
    setup = make_setup(tmp_path / "s", tiny_model, free_port())
    ok = run_cli("policy", "check", str(setup.policy))
    assert ok.returncode == 0 and "OK" in ok.stdout
    setup.policy.write_text(
        setup.policy.read_text()
        .replace("max_queue = 16", "max_queue = 0")
        .replace("n_ctx = 4096", "n_ctx = 1")
    )
    bad = run_cli("policy", "check", str(setup.policy))
    assert bad.returncode == 2
    assert "2 problems" in bad.stderr and "limits.max_queue" in bad.stderr
    assert "model.n_ctx" in bad.stderr
