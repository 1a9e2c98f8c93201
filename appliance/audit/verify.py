"""`qwen-appliance audit verify DIR`: prove the chain across audit files is whole, or name the first break.

With the audit key every record's MAC is checked, so a trail rewritten without the key fails; without it
(structure only) the links are checked but nothing proves who wrote them.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.audit.log import GENESIS, chain_key, line_hash, list_files, split_mac

Record = tuple[int, dict[str, Any], bytes]
STRUCTURE_ONLY = (
    "STRUCTURE ONLY: no key, so no MAC was checked; this proves nothing against someone who "
    "rewrote the trail (pass --policy or --key)"
)


@dataclass(frozen=True)
class Expect:
    """What the admin knows beyond the files: stopped daemon, a last point, the legacy part."""

    sealed: bool = False
    through_seq: int | None = None
    through_time: dt.datetime | None = None
    through_mac: str | None = None  # with through_seq: the MAC (prefix) that record must carry
    legacy_through: int = 0


@dataclass
class VerifyResult:
    """OK with counts, or the first problem with its file and line."""

    files: int = 0
    records: int = 0
    problem: str | None = None
    notes: list[str] = field(default_factory=list)
    keyed: bool = True
    legacy: int = 0
    last_seq: int | None = None
    last_ts: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


class _Break(Exception):
    def __init__(self, path: Path, line: int, what: str) -> None:
        super().__init__(f"{path.name} line {line}: {what}")


@dataclass
class _Cursor:
    """The record before the one being checked."""

    link: str | None = None
    seq: int | None = None
    keyed: bool | None = None
    path: Path | None = None
    rec: dict[str, Any] | None = None


def verify(
    directory: Path, key: bytes | None, expect_sealed: bool = False, expect: Expect | None = None
) -> VerifyResult:
    """Check parse, MACs (with `key`), sequence, links, seals, starts and retention across all files."""
    expect = expect or Expect(sealed=expect_sealed)
    result = VerifyResult(keyed=key is not None)
    files = list_files(directory) if directory.is_dir() else []
    if not files:
        result.problem = f"{directory}: no audit files found"
        return result
    try:
        records = [_read(p) for p in files]
        purged = {
            r["last_hash"]: r
            for recs in records
            for _, r, _ in recs
            if r.get("event") == "audit.retention_delete" and isinstance(r.get("last_hash"), str)
        }
        _walk(files, records, purged, result, chain_key(key) if key is not None else None, expect)
        _check_end(files[-1], records[-1], result, expect)
    except _Break as exc:
        result.problem = str(exc)
    _summarise(result)
    return result


def _read(path: Path) -> list[Record]:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        raise _Break(
            path, data.count(b"\n") + 1, "torn last line (no newline); the daemon repairs this at start-up"
        )
    out = []
    for n, line in enumerate(data.splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not _well_formed(rec):  # a hand-made line must not crash the checker (unhashable prev, ...)
            raise _Break(path, n, "not a valid audit record (edited or corrupted)")
        out.append((n, rec, line))
    return out


def _well_formed(rec: Any) -> bool:
    return (
        isinstance(rec, dict)
        and type(rec.get("seq")) is int
        and isinstance(rec.get("prev"), str)
        and isinstance(rec.get("event"), str)
        and isinstance(rec.get("mac", ""), str)
    )


def _walk(
    files: list[Path],
    records: list[list[Record]],
    purged: dict[str, dict[str, Any]],
    result: VerifyResult,
    key: bytes | None,
    expect: Expect,
) -> None:
    cur = _Cursor()
    for i, (path, recs) in enumerate(zip(files, records, strict=True)):
        if not recs:
            raise _Break(path, 0, "empty audit file")
        for n, rec, line in recs:
            link, keyed = _check_mac(path, n, rec, line, key)
            _check_mode(path, n, rec, keyed, cur, expect, result)
            _check_link(path, n, rec, cur, purged, result)
            if keyed:
                _check_boundary(path, n, rec, first=n == recs[0][0], cur=cur, purged=purged, result=result)
            if cur.rec is not None and cur.rec.get("event") == "audit.seal" and cur.path == path:
                raise _Break(path, n, "a record follows the file's seal (appended after sealing)")
            _check_known_point(path, n, rec, expect)
            cur = _Cursor(link, int(rec["seq"]), keyed, path, rec)
            result.records += 1
        _check_seal(path, recs, last=i == len(files) - 1, expect_sealed=expect.sealed, result=result)
        result.files += 1


def _check_known_point(path: Path, n: int, rec: dict[str, Any], expect: Expect) -> None:
    """A seq alone can be reached again after deleting files; the noted MAC cannot, without the key."""
    if expect.through_mac is None or int(rec["seq"]) != expect.through_seq:
        return
    if not str(rec.get("mac", "")).startswith(expect.through_mac):
        raise _Break(
            path,
            n,
            f"the record at seq {expect.through_seq} is not the known point (its MAC differs): records "
            "from there on were deleted and the seq numbers written again",
        )


def _check_mac(path: Path, n: int, rec: dict[str, Any], line: bytes, key: bytes | None) -> tuple[str, bool]:
    """(the link the next record must carry, whether this record is keyed); a wrong MAC is a break."""
    if "mac" not in rec:
        return line_hash(line), False
    parts = split_mac(line)
    if parts is None or parts[1] != rec["mac"]:
        raise _Break(path, n, "malformed mac field (edited)")
    body, mac = parts
    if key is not None:
        expected = hmac.new(key, body, "sha256").hexdigest()
        if not hmac.compare_digest(expected, mac):
            raise _Break(
                path,
                n,
                "MAC does not match: the record was edited, or written without the "
                "audit key (a rewritten trail), or the key is not this trail's",
            )
    return mac, True


def _check_mode(
    path: Path, n: int, rec: dict[str, Any], keyed: bool, cur: _Cursor, expect: Expect, result: VerifyResult
) -> None:
    """Unkeyed (legacy plain SHA-256) records only before the first keyed one, up to --legacy-through."""
    if keyed:
        return
    seq = int(rec["seq"])
    if cur.keyed:
        raise _Break(path, n, f"seq {seq} has no MAC after keyed records (rewritten without the key)")
    if seq > expect.legacy_through:
        raise _Break(
            path,
            n,
            f"seq {seq} has no MAC: chained with plain SHA-256 only, which anyone can "
            "recompute; if this part was written before keyed chaining, pass "
            "--legacy-through with the last seq the old version wrote",
        )
    result.legacy += 1


def _check_link(
    path: Path,
    n: int,
    rec: dict[str, Any],
    cur: _Cursor,
    purged: dict[str, dict[str, Any]],
    result: VerifyResult,
) -> None:
    seq, prev = int(rec["seq"]), rec["prev"]
    if cur.link is None:  # the very first record present
        if prev == GENESIS and seq == 1:
            return
        if prev in purged:
            result.notes.append(
                f"records before seq {seq} were deleted by retention "
                f"({purged[prev]['file']}, recorded at seq {purged[prev]['seq']})"
            )
            return
        raise _Break(
            path,
            n,
            f"chain starts at seq {seq} but no retention record explains the "
            "missing earlier records (a file was deleted)",
        )
    if seq != (cur.seq or 0) + 1:
        what = "missing" if seq > (cur.seq or 0) + 1 else "out of order"
        raise _Break(
            path,
            n,
            f"seq {seq} follows seq {cur.seq}: records {what} "
            "(lines or a whole file deleted, or lines reordered)",
        )
    if prev != cur.link:
        raise _Break(path, n, "prev does not match the previous record's MAC (the previous line was edited)")


def _check_boundary(
    path: Path,
    n: int,
    rec: dict[str, Any],
    first: bool,
    cur: _Cursor,
    purged: dict[str, dict[str, Any]],
    result: VerifyResult,
) -> None:
    """A keyed file begins with audit.start or audit.rotate, and each names the record it follows."""
    event = rec["event"]
    if first and event not in ("audit.start", "audit.rotate"):
        raise _Break(
            path,
            n,
            "file does not begin with a start or rotation record (its first lines "
            "were removed, or the file was replaced)",
        )
    if event == "audit.rotate":
        if cur.rec is None:  # the first record present: its predecessor was deleted by retention
            named = rec["prev"] in purged and purged[rec["prev"]].get("file") == rec.get("previous_file")
        else:
            named = (
                cur.rec.get("event") == "audit.seal"
                and cur.rec.get("reason") == "rotation"
                and cur.path is not None
                and rec.get("previous_file") == cur.path.name
            )
        if not first or not named:
            raise _Break(
                path,
                n,
                "rotation record does not follow the rotation seal of the file it "
                "names (a file was replaced or renamed)",
            )
    elif event == "audit.start":
        _check_start(path, n, rec, first, cur, purged, result)


def _check_start(
    path: Path,
    n: int,
    rec: dict[str, Any],
    first: bool,
    cur: _Cursor,
    purged: dict[str, dict[str, Any]],
    result: VerifyResult,
) -> None:
    """A start names the file, seq and MAC it continues from; after a crash it continues that file."""
    if cur.link is None:
        named = (rec.get("previous_file") is None and rec["seq"] == 1) or (
            rec["prev"] in purged and rec.get("previous_mac") == rec["prev"]
        )
    else:
        sealed = cur.rec is not None and cur.rec.get("event") == "audit.seal"
        named = (
            cur.path is not None
            and rec.get("previous_file") == cur.path.name
            and rec.get("previous_seq") == cur.seq
            and rec.get("previous_mac") == cur.link
            and rec.get("previous_sealed") is sealed
            and first == sealed
        )
        if named and not sealed:
            result.notes.append(
                f"the daemon stopped without a seal before seq {rec['seq']} "
                f"({cur.path.name if cur.path else '-'}): a crash or a kill"
            )
    if not named:
        raise _Break(
            path,
            n,
            "start record does not name the record before it (previous_file, "
            "previous_seq, previous_mac): files were deleted, replaced or reordered",
        )


def _check_seal(
    path: Path, recs: list[Record], last: bool, expect_sealed: bool, result: VerifyResult
) -> None:
    n, rec, _ = recs[-1]
    if rec.get("event") == "audit.seal":
        if rec.get("file_records") != len(recs):
            raise _Break(path, n, f"seal counts {rec.get('file_records')} records, the file has {len(recs)}")
        if last and rec.get("reason") == "rotation":  # a rotation seal always has a next file
            raise _Break(path, n, "sealed for rotation, but the file after it is missing (deleted)")
        return
    if not last:
        raise _Break(path, n, "file does not end with its seal (its final lines were removed)")
    msg = (
        f"{path.name} is not sealed: the daemon is running, was killed, or the file's final lines "
        "were removed"
    )
    if expect_sealed:
        raise _Break(path, n, "not sealed: " + msg.split(": ", 1)[1])
    result.notes.append(msg)


def _check_end(path: Path, recs: list[Record], result: VerifyResult, expect: Expect) -> None:
    """The trail must reach the admin's known last point; a seal alone cannot prove nothing came after."""
    n, rec, _ = recs[-1]
    result.last_seq, result.last_ts = int(rec["seq"]), str(rec.get("ts"))
    where = f"the trail ends at seq {result.last_seq} ({result.last_ts})"
    if expect.through_seq is not None and result.last_seq < expect.through_seq:
        raise _Break(
            path,
            n,
            f"{where}, before the expected seq {expect.through_seq}: later records "
            "are missing (newest files deleted, or cut back to a seal)",
        )
    if expect.through_time is not None and _ts(rec) < expect.through_time:
        raise _Break(
            path,
            n,
            f"{where}, before the expected time {expect.through_time.isoformat()}: "
            "later records are missing (newest files deleted, or cut back to a seal)",
        )
    if expect.through_seq is None and expect.through_time is None and rec.get("event") == "audit.seal":
        result.notes.append(
            f"{where}; files deleted after a seal leave no trace in the files: "
            "compare with a known point (--expect-through SEQ:MAC, from the stop line) or the forwarded copy"
        )


def _ts(rec: dict[str, Any]) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(str(rec.get("ts")).replace("Z", "+00:00"))
    except ValueError:
        return dt.datetime.min.replace(tzinfo=dt.timezone.utc)


def _summarise(result: VerifyResult) -> None:
    if result.legacy:
        result.notes.append(
            f"{result.legacy} legacy records (seq up to the first keyed one) are chained "
            "with plain SHA-256 only; only the keyed record after them protects them"
        )
    if not result.keyed:
        result.notes.insert(0, STRUCTURE_ONLY)


def parse_through(value: str) -> tuple[int | None, dt.datetime | None, str | None]:
    """`--expect-through`: SEQ, SEQ:MAC (as the daemon logs at each stop), or an ISO 8601 time (UTC unless
    it names a zone)."""
    seq, _, mac = value.partition(":")
    if seq.isdigit() and (not mac or re.fullmatch(r"[0-9a-f]{8,64}", mac)):
        return int(seq), None, mac or None
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--expect-through {value!r}: give SEQ, SEQ:MAC (8 to 64 lower-case hex digits) or an ISO 8601 "
            "time such as 2026-11-18T23:59:50Z"
        ) from None
    return None, when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc), None
