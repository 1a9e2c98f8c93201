"""`qwen-appliance audit verify DIR`: prove the chain across audit files is whole, or name the first break."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audit import GENESIS, line_hash, list_files


@dataclass
class VerifyResult:
    """OK with counts, or the first problem with its file and line."""

    files: int = 0
    records: int = 0
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


class _Break(Exception):
    def __init__(self, path: Path, line: int, what: str) -> None:
        super().__init__(f"{path.name} line {line}: {what}")


def verify(directory: Path, expect_sealed: bool = False) -> VerifyResult:
    """Check parse, sequence, hash chain, seals and retention records across all files."""
    result = VerifyResult()
    files = list_files(directory) if directory.is_dir() else []
    if not files:
        result.problem = f"{directory}: no audit files found"
        return result
    try:
        records = [_read(p) for p in files]
        purged = {r["last_hash"]: r for recs in records for _, r, _ in recs
                  if r.get("event") == "audit.retention_delete" and isinstance(r.get("last_hash"), str)}
        _walk(files, records, purged, result, expect_sealed)
    except _Break as exc:
        result.problem = str(exc)
    return result


def _read(path: Path) -> list[tuple[int, dict[str, Any], bytes]]:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        raise _Break(path, data.count(b"\n") + 1, "torn last line (no newline); the daemon repairs "
                                                  "this at start-up")
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
    return isinstance(rec, dict) and type(rec.get("seq")) is int and isinstance(rec.get("prev"), str) \
        and isinstance(rec.get("event"), str)


def _walk(files: list[Path], records: list[list[tuple[int, dict[str, Any], bytes]]],
          purged: dict[str, dict[str, Any]], result: VerifyResult, expect_sealed: bool) -> None:
    prev_hash: str | None = None
    prev_seq: int | None = None
    for i, (path, recs) in enumerate(zip(files, records, strict=True)):
        if not recs:
            raise _Break(path, 0, "empty audit file")
        for n, rec, line in recs:
            _check_link(path, n, rec, prev_hash, prev_seq, purged, result)
            prev_hash, prev_seq = line_hash(line), int(rec["seq"])
            result.records += 1
        _check_seal(path, recs, last=i == len(files) - 1, expect_sealed=expect_sealed, result=result)
        result.files += 1


def _check_link(path: Path, n: int, rec: dict[str, Any], prev_hash: str | None,
                prev_seq: int | None, purged: dict[str, dict[str, Any]], result: VerifyResult) -> None:
    seq, prev = int(rec["seq"]), rec["prev"]
    if prev_hash is None:  # the very first record present
        if prev == GENESIS and seq == 1:
            return
        if prev in purged:
            result.notes.append(f"records before seq {seq} were deleted by retention "
                                f"({purged[prev]['file']}, recorded at seq {purged[prev]['seq']})")
            return
        raise _Break(path, n, f"chain starts at seq {seq} but no retention record explains the "
                              "missing earlier records (a file was deleted)")
    if seq != (prev_seq or 0) + 1:
        what = "missing" if seq > (prev_seq or 0) + 1 else "out of order"
        raise _Break(path, n, f"seq {seq} follows seq {prev_seq}: records {what} "
                              "(lines or a whole file deleted, or lines reordered)")
    if prev != prev_hash:
        raise _Break(path, n, "prev does not match the previous record's hash (the previous line "
                              "was edited)")


def _check_seal(path: Path, recs: list[tuple[int, dict[str, Any], bytes]], last: bool,
                expect_sealed: bool, result: VerifyResult) -> None:
    n, rec, _ = recs[-1]
    if rec.get("event") == "audit.seal":
        if rec.get("file_records") != len(recs):
            raise _Break(path, n, f"seal counts {rec.get('file_records')} records, the file has "
                                  f"{len(recs)}")
        if last and rec.get("reason") == "rotation":  # a rotation seal always has a next file
            raise _Break(path, n, "sealed for rotation, but the file after it is missing (deleted)")
        return
    if not last:
        raise _Break(path, n, "file does not end with its seal (its final lines were removed)")
    msg = (f"{path.name} is not sealed: the daemon is running, was killed, or the file's final lines "
           "were removed")
    if expect_sealed:
        raise _Break(path, n, "not sealed: " + msg.split(": ", 1)[1])
    result.notes.append(msg)
