"""The audit log on real files: chain, seals, rotation, retention, repair and every kind of tampering."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from appliance.admin.cli import main
from appliance.audit.log import AuditLog, list_files, load_hmac_key, new_hmac_key
from appliance.audit.verify import verify
from appliance.config.policy import AuditPolicy


class Clock:
    """A controllable wall clock (seconds since the epoch)."""

    def __init__(self, start: float = 1_795_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def key(audit_dir: Path) -> bytes:
    """The audit key of a trail made by make_log (the file `k` next to the audit folder)."""
    return load_hmac_key(audit_dir.parent / "k")


def make_key(tmp_path: Path) -> None:
    if not (tmp_path / "k").exists():
        (tmp_path / "k").write_text(new_hmac_key())
        (tmp_path / "k").chmod(0o600)


def make_log(tmp_path: Path, clock: Clock, rotate: int = 4096, days: int = 30) -> AuditLog:
    make_key(tmp_path)
    log = AuditLog(
        AuditPolicy.with_defaults(
            dir=tmp_path / "audit", hmac_key_file=tmp_path / "k", rotate_bytes=rotate, retention_days=days
        ),
        clock=clock,
    )
    log.open()
    return log


def fill(log: AuditLog, n: int, clock: Clock) -> None:
    for i in range(n):
        clock.now += 1
        log.write("request", request_id=f"r{i:04d}", route="/v1/chat/completions", status=200)


@pytest.fixture
def trail(tmp_path: Path) -> Path:
    clock = Clock()
    log = make_log(tmp_path, clock)
    fill(log, 120, clock)
    log.close()
    files = list_files(tmp_path / "audit")
    assert len(files) >= 4, "rotation by size should have produced several files"
    return tmp_path / "audit"


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_intact_trail_verifies_with_modes(trail: Path) -> None:
    r = verify(trail, key(trail), expect_sealed=True)
    assert r.ok, r.problem
    assert r.files == len(list_files(trail)) and r.records > 120
    assert trail.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in list_files(trail))
    first = json.loads(lines(list_files(trail)[1])[0])
    assert first["event"] == "audit.rotate"  # the chain runs on across files


def test_one_edited_byte_is_named(trail: Path) -> None:
    target = list_files(trail)[1]
    data = bytearray(target.read_bytes())
    i = data.index(b'"r00')
    data[i + 3] = ord("9")  # r00xx -> r90xx: still valid JSON
    target.write_bytes(bytes(data))
    r = verify(trail, key(trail))
    assert not r.ok and target.name in str(r.problem) and "edited" in str(r.problem)


def test_deleted_line_is_named(trail: Path) -> None:
    target = list_files(trail)[2]
    ls = lines(target)
    target.write_bytes(b"".join(ls[:3] + ls[4:]))
    r = verify(trail, key(trail))
    assert not r.ok and f"{target.name} line 4" in str(r.problem) and "missing" in str(r.problem)


def test_deleted_middle_file_is_named(trail: Path) -> None:
    files = list_files(trail)
    files[2].unlink()
    r = verify(trail, key(trail))
    assert not r.ok and files[3].name in str(r.problem) and "file deleted" in str(r.problem)


def test_reordered_lines_are_named(trail: Path) -> None:
    target = list_files(trail)[1]
    ls = lines(target)
    ls[4], ls[5] = ls[5], ls[4]
    target.write_bytes(b"".join(ls))
    r = verify(trail, key(trail))
    assert not r.ok and target.name in str(r.problem)


def test_dropped_final_lines_are_detected(trail: Path) -> None:
    files = list_files(trail)
    middle, last = files[1], files[-1]
    original = middle.read_bytes()
    middle.write_bytes(b"".join(lines(middle)[:-2]))
    r = verify(trail, key(trail))
    assert not r.ok and middle.name in str(r.problem) and "seal" in str(r.problem)
    middle.write_bytes(original)
    last.write_bytes(b"".join(lines(last)[:-1]))  # the shutdown seal is gone
    assert verify(trail, key(trail)).ok and not verify(trail, key(trail), expect_sealed=True).ok


def test_dropped_seal_of_newest_file(trail: Path) -> None:
    last = list_files(trail)[-1]
    last.write_bytes(b"".join(lines(last)[:-2]))
    assert verify(trail, key(trail)).ok  # could be a running daemon: reported as a note...
    assert "not sealed" in " ".join(verify(trail, key(trail)).notes)
    r = verify(trail, key(trail), expect_sealed=True)  # ...and a failure once the daemon is known stopped
    assert not r.ok and "not sealed" in str(r.problem)


def test_torn_tail_is_repaired_and_recorded(tmp_path: Path) -> None:
    clock = Clock()
    log = make_log(tmp_path, clock, rotate=10**9)
    fill(log, 5, clock)
    log._fd and os.close(log._fd)  # simulate a crash: no seal
    path = list_files(tmp_path / "audit")[-1]
    torn = b'{"ts":"2026-11-25T00:00:00.000Z","seq":6,"ev'
    with path.open("ab") as f:
        f.write(torn)
    assert not verify(tmp_path / "audit", key(tmp_path / "audit")).ok
    log = make_log(tmp_path, clock, rotate=10**9)
    log.close()
    recs = [json.loads(x) for x in path.read_bytes().splitlines()]
    repair = [r for r in recs if r["event"] == "audit.repair"]
    assert repair and repair[0]["bytes_removed"] == len(torn)
    assert verify(tmp_path / "audit", key(tmp_path / "audit"), expect_sealed=True).ok


def test_rotation_at_utc_midnight(tmp_path: Path) -> None:
    clock = Clock(1_795_046_390.0)  # 2026-11-18 23:59:50 UTC
    log = make_log(tmp_path, clock, rotate=10**9)
    fill(log, 5, clock)
    clock.now += 20  # past midnight
    fill(log, 2, clock)
    log.close()
    files = list_files(tmp_path / "audit")
    assert [f.name.split("-")[2][:8] for f in files] == ["20261118", "20261119"]
    assert verify(tmp_path / "audit", key(tmp_path / "audit"), expect_sealed=True).ok


def test_retention_deletes_and_records_and_chain_still_verifies(tmp_path: Path) -> None:
    clock = Clock()
    log = make_log(tmp_path, clock, rotate=4096, days=30)
    fill(log, 60, clock)
    old = list_files(tmp_path / "audit")[:2]
    for p in old:
        os.utime(p, (clock.now - 40 * 86400, clock.now - 40 * 86400))
    deleted = log.purge()
    log.close()
    assert deleted == [p.name for p in old]
    recs = [json.loads(x) for p in list_files(tmp_path / "audit") for x in p.read_bytes().splitlines()]
    assert [r["file"] for r in recs if r["event"] == "audit.retention_delete"] == deleted
    r = verify(tmp_path / "audit", key(tmp_path / "audit"), expect_sealed=True)
    assert r.ok, r.problem
    assert any("deleted by retention" in n for n in r.notes)


def test_control_characters_never_reach_the_file(tmp_path: Path) -> None:
    clock = Clock()
    log = make_log(tmp_path, clock)
    log.write("request", reason='evil\n{"event":"forged"}\x1b[31m\u2028x', route="/a\rb")
    log.close()
    text = list_files(tmp_path / "audit")[0].read_text()
    assert "forged" in text and text.count("\n") == 3  # three records: the start, the request, the seal
    rec = json.loads(text.splitlines()[1])
    assert rec["reason"] == 'evil{"event":"forged"}[31mx' and rec["route"] == "/ab"


def test_verify_cli_exit_codes(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    k = str(trail.parent / "k")
    assert main(["audit", "verify", str(trail), "--key", k, "--expect-sealed"]) == 0
    assert "OK" in capsys.readouterr().out
    list_files(trail)[1].unlink()
    assert main(["audit", "verify", str(trail), "--key", k]) == 2
    assert "BROKEN" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["journald", "syslog"])
def test_records_are_forwarded_to_a_local_socket(tmp_path: Path, kind: str) -> None:
    import socket

    sink_path = tmp_path / "sink.sock"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(sink_path))
    sink.settimeout(5)
    clock = Clock()
    make_key(tmp_path)
    log = AuditLog(
        AuditPolicy.with_defaults(
            dir=tmp_path / "audit", hmac_key_file=tmp_path / "k", forward=kind, forward_socket=sink_path
        ),
        clock=clock,
    )
    log.open()
    log.write("request", request_id="abc", client="teller-03", status=401, reason="authentication_error")
    assert '"event":"audit.start"' in sink.recv(65536).decode()  # the start is forwarded too
    got = sink.recv(65536).decode()
    line = list_files(tmp_path / "audit")[0].read_text().splitlines()[1]  # after audit.start
    assert line in got  # the very same JSON record, for the SIEM to verify the chain too
    if kind == "journald":
        assert "SYSLOG_IDENTIFIER=qwen-appliance-audit\n" in got and "QWA_STATUS=401\n" in got
        assert "PRIORITY=5\n" in got
    else:
        assert got.startswith("<134>1 ") and '[qwa@32473 event="request" seq="2" status="401"' in got
    sink.close()
    log.write("request", request_id="def", status=200)  # a missing listener never fails the record
    assert log.forwarder is not None and log.forwarder.dropped == 1
    log.close()
    assert verify(tmp_path / "audit", key(tmp_path / "audit"), expect_sealed=True).ok
