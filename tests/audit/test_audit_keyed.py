"""The keyed audit chain (issue 11, defects 4 and 5): rewrites without the key, start links, cut-back trails.

Every trail here is written by the real AuditLog on real files; every attack edits those files the way the
outside attacker did, then `audit verify` (the function and the CLI) must say BROKEN.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from appliance.admin.cli import main
from appliance.audit.log import (
    GENESIS,
    AuditLog,
    chain_key,
    line_hash,
    link_of,
    list_files,
    load_hmac_key,
    new_hmac_key,
    seal_line,
)
from appliance.audit.verify import Expect, verify
from appliance.config.policy import AuditPolicy


class Clock:
    def __init__(self, start: float = 1_795_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def key_file(root: Path) -> Path:
    path = root / "audit.key"
    if not path.exists():
        path.write_text(new_hmac_key())
        path.chmod(0o600)
    return path


def run(root: Path, clock: Clock, n: int, sealed: bool = True, rotate: int = 3000) -> None:
    """One daemon run: start, n requests from two clients (mallory's refused), then a seal or a crash."""
    log = AuditLog(
        AuditPolicy.with_defaults(dir=root / "audit", hmac_key_file=key_file(root), rotate_bytes=rotate),
        clock=clock,
    )
    log.open()
    for i in range(n):
        clock.now += 1
        who = "mallory" if i % 3 == 0 else "alice"
        log.write(
            "request",
            request_id=f"{clock.now:.0f}{i:04d}",
            client=who,
            route="/v1/chat/completions",
            status=403 if who == "mallory" else 200,
        )
    if sealed:
        log.close()
    else:
        assert log._fd is not None
        os.close(log._fd)  # a SIGKILL: no seal
        log._fd = None


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Three runs: a clean one, a crashed one, a clean one; several rotations."""
    clock = Clock()
    run(tmp_path, clock, 30)
    run(tmp_path, clock, 10, sealed=False)
    run(tmp_path, clock, 30)
    assert len(list_files(tmp_path / "audit")) >= 4
    return tmp_path


def key(root: Path) -> bytes:
    return load_hmac_key(root / "audit.key")


def all_records(audit: Path) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, json.loads(x)) for p in list_files(audit) for x in p.read_bytes().splitlines()]


def rewrite(audit: Path, mac_key: bytes | None) -> None:
    """The attack: drop mallory's records, 403 -> 200, then recompute seq, prev, seals and start links.

    With mac_key None the links are plain SHA-256 (the old chain); otherwise keyed, with the given key.
    """
    out: dict[Path, list[bytes]] = {}
    seq, link, counts = 0, GENESIS, {}
    last: tuple[Path, int, str] | None = None
    for path, rec in all_records(audit):
        if rec.get("client") == "mallory":
            continue
        rec.pop("mac", None)
        if rec.get("status") == 403:
            rec["status"] = 200
        seq += 1
        rec["seq"], rec["prev"] = seq, link
        if rec["event"] == "audit.start" and last is not None:
            rec["previous_file"], rec["previous_seq"], rec["previous_mac"] = last
        counts[path] = counts.get(path, 0) + 1
        if rec["event"] == "audit.seal":
            rec["file_records"] = counts[path]
        body = json.dumps(rec, separators=(",", ":")).encode()
        line = body if mac_key is None else seal_line(chain_key(mac_key), body)[0]
        link = line_hash(line) if mac_key is None else link_of(line)
        out.setdefault(path, []).append(line)
        last = (path.name, seq, link)
    for path, lines in out.items():
        path.write_bytes(b"".join(x + b"\n" for x in lines))


def test_honest_trail_verifies_with_the_key_only(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = verify(root / "audit", key(root), expect=Expect(sealed=True))
    assert r.ok, r.problem
    assert r.keyed and r.legacy == 0 and r.records == len(all_records(root / "audit"))
    assert any("stopped without a seal" in n for n in r.notes)  # the crashed run is named
    assert not verify(root / "audit", hashlib.sha256(b"other").digest()).ok  # another appliance's key
    audit, kf = str(root / "audit"), str(root / "audit.key")
    assert main(["audit", "verify", audit, "--key", kf, "--expect-sealed"]) == 0
    assert "MACs and chain intact" in capsys.readouterr().out
    assert main(["audit", "verify", audit]) == 2  # no key: a clear refusal, not a silent pass
    err = capsys.readouterr().err
    assert "needs the audit key" in err and "--policy" in err and "--structure-only" in err
    assert main(["audit", "verify", audit, "--structure-only"]) == 0
    assert "STRUCTURE ONLY" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["plain-sha256", "wrong-key"])
def test_the_attackers_rewrite_fails(root: Path, how: str, capsys: pytest.CaptureFixture[str]) -> None:
    audit = root / "audit"
    honest = verify(audit, key(root), expect=Expect(sealed=True))
    assert honest.ok and any(r.get("status") == 403 for _, r in all_records(audit))
    rewrite(audit, None if how == "plain-sha256" else hashlib.sha256(b"a guess").digest())
    recs = [r for _, r in all_records(audit)]
    assert not any(r.get("client") == "mallory" or r.get("status") == 403 for r in recs)
    r = verify(audit, key(root), expect=Expect(sealed=True))
    assert not r.ok
    want = "has no MAC" if how == "plain-sha256" else "MAC does not match"
    assert want in str(r.problem), r.problem
    assert main(["audit", "verify", str(audit), "--key", str(root / "audit.key"), "--expect-sealed"]) == 2
    assert "BROKEN" in capsys.readouterr().err
    # The rewrite is structurally perfect: only the key tells it apart (which is what structure-only says).
    loose = verify(audit, None, expect=Expect(sealed=True, legacy_through=10**9))
    assert loose.ok and "proves nothing" in loose.notes[0]


def test_a_downgrade_after_keyed_records_fails_even_with_legacy_accepted(root: Path) -> None:
    rewrite(root / "audit", None)
    r = verify(root / "audit", key(root), expect=Expect(legacy_through=5))
    assert not r.ok and "seq 6 has no MAC" in str(r.problem)


def legacy_trail(root: Path, n: int) -> None:
    """What the old version wrote: plain SHA-256 links, a shutdown seal, no MAC, no start record."""
    audit = root / "audit"
    audit.mkdir(mode=0o700)
    lines, prev = [], GENESIS
    for i in range(1, n + 1):
        event = "audit.seal" if i == n else "request"
        rec: dict[str, Any] = {
            "ts": f"2026-11-01T00:00:{i:02d}.000Z",
            "seq": i,
            "event": event,
            "status": 200,
        }
        if i == n:
            rec.update(reason="shutdown", file_records=n)
        rec["prev"] = prev
        line = json.dumps(rec, separators=(",", ":")).encode()
        prev = line_hash(line)
        lines.append(line + b"\n")
    (audit / "audit-000000000001-20261101T000000Z.jsonl").write_bytes(b"".join(lines))


def test_legacy_trail_is_verified_as_legacy_and_the_upgrade_commits_to_it(tmp_path: Path) -> None:
    legacy_trail(tmp_path, 6)
    run(tmp_path, Clock(), 5)  # the new version continues it in a new file, keyed
    first_new = list_files(tmp_path / "audit")[1].read_bytes().splitlines()[0]
    assert json.loads(first_new)["event"] == "audit.start" and b'"mac":' in first_new
    r = verify(tmp_path / "audit", key(tmp_path), expect=Expect(sealed=True))
    assert not r.ok and "--legacy-through" in str(r.problem)  # never accepted silently
    r = verify(tmp_path / "audit", key(tmp_path), expect=Expect(sealed=True, legacy_through=6))
    assert r.ok, r.problem
    assert r.legacy == 6 and any("legacy" in n for n in r.notes)
    old = list_files(tmp_path / "audit")[0]  # rewriting the legacy part breaks the first keyed link
    old.write_bytes(
        old.read_bytes().replace(
            b'"seq":3,"event":"request","status":200', b'"seq":3,"event":"request","status":201'
        )
    )
    legacy = [json.loads(x) for x in old.read_bytes().splitlines()]
    prev, lines = GENESIS, []
    for rec in legacy:
        rec["prev"] = prev
        line = json.dumps(rec, separators=(",", ":")).encode()
        prev = line_hash(line)
        lines.append(line + b"\n")
    old.write_bytes(b"".join(lines))
    r = verify(tmp_path / "audit", key(tmp_path), expect=Expect(sealed=True, legacy_through=6))
    assert not r.ok and "prev does not match" in str(r.problem)


def test_start_records_name_their_predecessor(root: Path) -> None:
    recs = all_records(root / "audit")
    starts = [(i, r) for i, (_, r) in enumerate(recs) if r["event"] == "audit.start"]
    assert len(starts) == 3 and starts[0][1]["seq"] == 1 and "previous_file" not in starts[0][1]
    for i, rec in starts[1:]:
        path, before = recs[i - 1]
        assert rec["previous_file"] == path.name and rec["previous_seq"] == before["seq"]
        assert rec["previous_mac"] == rec["prev"] == before["mac"]
    assert [r["previous_sealed"] for _, r in starts[1:]] == [True, False]


def test_a_start_naming_the_wrong_predecessor_is_named(root: Path) -> None:
    """Even someone holding the key must keep the start links consistent with the files."""
    audit = root / "audit"
    for path, rec in all_records(audit):
        if rec["event"] == "audit.start" and rec.get("previous_sealed"):
            target = path
            break
    lines = target.read_bytes().splitlines()
    rec = json.loads(lines[0])
    rec["previous_file"] = "audit-000000000001-20200101T000000Z.jsonl"
    rec.pop("mac")
    lines[0] = seal_line(chain_key(key(root)), json.dumps(rec, separators=(",", ":")).encode())[0]
    target.write_bytes(b"".join(x + b"\n" for x in lines))  # its MAC is right; later prevs still match
    r = verify(audit, key(root))
    assert not r.ok and "start record does not name" in str(r.problem), r.problem


def test_deleting_the_newest_run_needs_a_known_point(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    audit = root / "audit"
    whole = verify(audit, key(root), expect=Expect(sealed=True))
    assert whole.last_seq is not None and whole.last_ts is not None
    last_start = max(
        p for p, r in all_records(audit) if r["event"] == "audit.start" and r.get("previous_sealed")
    )
    for p in list_files(audit):
        if p >= last_start:
            p.unlink()  # every file of the last clean run
    cut = verify(audit, key(root), expect=Expect(sealed=True))
    assert cut.ok and "files deleted after a seal leave no trace" in " ".join(cut.notes)
    assert cut.last_seq is not None and cut.last_seq < whole.last_seq  # the known residual risk
    by_seq = verify(audit, key(root), expect=Expect(sealed=True, through_seq=whole.last_seq))
    assert not by_seq.ok and f"before the expected seq {whole.last_seq}" in str(by_seq.problem)
    args = ["audit", "verify", str(audit), "--key", str(root / "audit.key")]
    assert main([*args, "--expect-through", str(whole.last_seq)]) == 2
    assert main([*args, "--expect-through", whole.last_ts]) == 2
    assert "before the expected time" in capsys.readouterr().err
    assert main([*args, "--expect-through", str(cut.last_seq)]) == 0
    assert main([*args, "--expect-through", "yesterday"]) == 2
    assert "ISO 8601" in capsys.readouterr().err


def test_cut_back_deleted_and_replaced_files(root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    audit = root / "audit"
    k = key(root)
    files = list_files(audit)
    saved = tmp_path_factory.mktemp("saved")
    shutil.copytree(audit, saved / "a")

    def fresh() -> None:
        shutil.rmtree(audit)
        shutil.copytree(saved / "a", audit)

    files[1].unlink()  # a middle file
    assert "file deleted" in str(verify(audit, k).problem) or "missing" in str(verify(audit, k).problem)
    fresh()
    last = files[-1]
    lines = last.read_bytes().splitlines(keepends=True)
    last.write_bytes(b"".join(lines[:-3]))  # the newest file cut back: its seal is gone
    assert not verify(audit, k, expect=Expect(sealed=True)).ok
    fresh()
    older = files[1].read_bytes().splitlines(keepends=True)[:4]  # an older copy, taken while running
    files[1].write_bytes(b"".join(older))
    r = verify(audit, k)
    assert not r.ok and files[1].name in str(r.problem)
    fresh()
    files[0].unlink()  # the oldest file, without a retention record
    r = verify(audit, k)
    assert not r.ok and "no retention record" in str(r.problem)


def test_a_rotation_cut_short_is_finished_first_and_no_closed_descriptor_is_used(tmp_path: Path) -> None:
    """The new file cannot be created (a directory holds its name: EISDIR); the next write finishes it."""
    import datetime as dt

    from appliance.audit.log import AuditUnavailable

    clock = Clock()
    log = AuditLog(
        AuditPolicy.with_defaults(dir=tmp_path / "audit", hmac_key_file=key_file(tmp_path), rotate_bytes=600),
        clock=clock,
    )
    log.open()
    log.write("request", status=200, route="/x" * 200)  # past rotate_bytes: the next write rotates
    clock.now += 1
    stamp = dt.datetime.fromtimestamp(clock.now, dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    blocker = tmp_path / "audit" / f"audit-000000000004-{stamp}.jsonl"
    blocker.mkdir()
    with pytest.raises(AuditUnavailable):
        log.write("request", status=200)
    assert log._fd is None and log.failing  # sealed and closed: nothing may be written to the old number
    blocker.rmdir()
    clock.now += 1
    log.write("request", status=201)
    log.close()
    recs = all_records(tmp_path / "audit")
    assert [r["event"] for _, r in recs] == [
        "audit.start",
        "request",
        "audit.seal",
        "audit.rotate",
        "request",
        "audit.seal",
    ]
    assert recs[3][1]["previous_file"] == recs[0][0].name and recs[4][1]["status"] == 201
    r = verify(tmp_path / "audit", key(tmp_path), expect=Expect(sealed=True))
    assert r.ok, r.problem


def test_a_known_point_with_its_mac_survives_seq_numbers_written_again(
    root: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Found after issue 11: delete the newest run while stopped, and the next start writes the same seq
    numbers again, so SEQ and TIME known points pass; the MAC noted with the seq cannot be re-created."""
    audit = root / "audit"
    with caplog.at_level(logging.INFO, logger="appliance.audit.log"):
        run(root, Clock(start=1_796_000_000.0), 5)  # the admin notes the stop line's known point
    point = re.search(r"--expect-through (\d+:[0-9a-f]{16})", caplog.text)
    assert point, caplog.text
    seq = int(point.group(1).split(":")[0])
    last_start = max(p for p, r in all_records(audit) if r["event"] == "audit.start")
    for p in list_files(audit):
        if p >= last_start:
            p.unlink()
    run(
        root, Clock(start=1_797_000_000.0), 12
    )  # the next start re-uses the deleted seq numbers and passes them
    args = ["audit", "verify", str(audit), "--key", str(root / "audit.key"), "--expect-sealed"]
    assert main([*args, "--expect-through", str(seq)]) == 0  # a bare seq is fooled: the residual risk
    capsys.readouterr()
    assert main([*args, "--expect-through", point.group(1)]) == 2
    assert f"record at seq {seq} is not the known point" in capsys.readouterr().err
    assert main([*args, "--expect-through", f"{seq}:XYZ"]) == 2
