"""The audit trail: content-free JSON Lines, MAC-chained across rotated files, fsynced, fail-closed.

Each line ends with `mac`, an HMAC-SHA256 over the line under a chain key derived from the audit key,
and carries `prev`, the MAC of the line before it (across files): edits, deletions, reordering and missing
files are detectable, and rewriting the chain needs the key. A `seal` closes each file at rotation and
shutdown; each start writes an `audit.start` naming the record it continues from. Strings that could hold
customer data are stored only as HMAC-SHA256 digests (under the audit key itself, not the chain key).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.audit.forward import Forwarder
from appliance.config.policy import AuditPolicy
from appliance.errors import ConfigError, ServiceError
from appliance.text import strip_control_deep

log = logging.getLogger("appliance.audit.log")

GENESIS = "0" * 64
FILE_RE = re.compile(r"^audit-(\d{12})-(\d{8}T\d{6}Z)\.jsonl$")
FIELD_ORDER = (
    "ts",
    "seq",
    "event",
    "request_id",
    "client",
    "cert_sha256",
    "source_ip",
    "method",
    "route",
    "status",
    "reason",
    "model_sha256",
    "prompt_tokens",
    "completion_tokens",
    "images",
    "prompt_hmac",
    "image_hmac",
    "duration_ms",
    "queue_ms",
)
MAC_SUFFIX = re.compile(rb',"mac":"([0-9a-f]{64})"\}$')
CHAIN_LABEL = b"qwen-appliance audit chain v1"


class AuditUnavailable(ServiceError):
    """A record could not be made durable now; with fail_closed the request must not be answered (503)."""


def line_hash(line: bytes) -> str:
    """The legacy (unkeyed) chain link: SHA-256 of a record line without its newline."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def chain_key(audit_key: bytes) -> bytes:
    """The chain MAC key: HMAC(audit key, label), so chain MACs and content digests use separate keys."""
    return hmac.new(audit_key, CHAIN_LABEL, hashlib.sha256).digest()


def seal_line(key: bytes, body: bytes) -> tuple[bytes, str]:
    """Append `"mac"` (HMAC-SHA256 of the JSON object `body` under the chain key) as its last field."""
    mac = hmac.new(key, body, hashlib.sha256).hexdigest()
    return body[:-1] + b',"mac":"' + mac.encode() + b'"}', mac


def split_mac(line: bytes) -> tuple[bytes, str] | None:
    """(the body the MAC covers, the MAC) of a keyed line; None for a legacy or malformed one."""
    m = MAC_SUFFIX.search(line.rstrip(b"\n"))
    if m is None:
        return None
    return line[: m.start()] + b"}", m.group(1).decode()


def link_of(line: bytes) -> str:
    """What the next record's `prev` holds: the line's MAC, or its SHA-256 for a legacy line."""
    parts = split_mac(line)
    return parts[1] if parts is not None else line_hash(line)


def load_hmac_key(path: Path) -> bytes:
    """The audit HMAC key: 32+ random bytes, hex-encoded, readable by the owner only."""
    try:
        st = path.stat()
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            path,
            "audit.hmac_key_file",
            f"cannot read ({exc.strerror})",
            hint="`qwen-appliance init` creates it; or `qwen-appliance audit keygen FILE`",
        ) from None
    if st.st_mode & 0o077:
        raise ConfigError(
            path, "audit.hmac_key_file", "key is accessible by group or others", hint=f"chmod 600 {path}"
        )
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 32:
        raise ConfigError(
            path,
            "audit.hmac_key_file",
            "must hold at least 32 random bytes as hex",
            hint="create one with `qwen-appliance audit keygen FILE`",
        )
    return key


def new_hmac_key() -> str:
    return secrets.token_hex(32) + "\n"


class Hmac:
    """Digests that let equal prompts be correlated and known documents be found, but never read back."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def text(self, value: str) -> str:
        return hmac.new(self._key, value.encode("utf-8"), hashlib.sha256).hexdigest()

    def image(self, sha256_hex: str) -> str:
        """Images are digested as HMAC(key, SHA-256(file bytes)), so a file on disk can be matched."""
        return hmac.new(self._key, bytes.fromhex(sha256_hex), hashlib.sha256).hexdigest()


class AuditLog:
    """Appends records under one lock: one write and (by default) one fsync per record."""

    def __init__(self, cfg: AuditPolicy, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self._key = chain_key(load_hmac_key(cfg.hmac_key_file))
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._seq = 0
        self._prev = GENESIS
        self._last_fsync = 0.0
        self._file_records = 0
        self._pending: tuple[str, dict[str, Any]] | None = None  # a new file's first record, still owed
        self.failing: str | None = None
        self.write_seconds = 0.0
        self.failures = 0
        self.forwarder = Forwarder(cfg.forward, cfg.forward_socket) if cfg.forward != "none" else None

    # --- opening ------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory (0700), repair a torn tail, continue the chain, and record the start."""
        d = self.cfg.dir
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(d, 0o700)
        files, removed = _drop_empty_tail(list_files(d))
        repaired = 0
        if files:
            repaired = _repair_tail(files[-1])
            self._resume(files[-1])
        last = files[-1] if files else None
        sealed = last is not None and _sealed(last)
        # An unsealed last file (a crash) is continued; after a seal, a new file begins.
        self._open_file(last if last is not None and not sealed else None)
        if removed:
            log.warning("audit: removed empty newest file(s) %s", ", ".join(removed))
        log.info("audit trail continues after seq %d of %s", self._seq, last.name if last else "-")
        self.write(
            "audit.start",
            previous_file=last.name if last else None,
            previous_seq=self._seq if last else None,
            previous_mac=self._prev if last else None,
            previous_sealed=sealed if last else None,
            removed_empty_files=removed or None,
        )
        if repaired:
            self.write(
                "audit.repair",
                reason=f"truncated a torn last line of {repaired} bytes",
                file=last.name if last else None,
                bytes_removed=repaired,
            )

    def _resume(self, last: Path) -> None:
        lines = last.read_bytes().splitlines()
        if lines:
            rec = json.loads(lines[-1])
            self._seq = int(rec["seq"])
            self._prev = link_of(lines[-1])

    def _today(self) -> str:
        return dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc).strftime("%Y%m%d")

    def _open_file(self, existing: Path | None) -> None:
        if existing is None:
            stamp = dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            existing = self.cfg.dir / f"audit-{self._seq + 1:012d}-{stamp}.jsonl"
        fd = os.open(existing, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._fd, self._path, self._size, self._file_records = fd, existing, 0, 0
        os.fchmod(fd, 0o600)
        self._size = os.fstat(fd).st_size
        self._file_records = sum(1 for _ in existing.open("rb")) if self._size else 0

    # --- writing ------------------------------------------------------------------------------

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one record durably; raises AuditUnavailable when it could not be written."""
        started = time.perf_counter()
        with self._lock:
            try:
                self._rotate_if_due()
                record = self._append(event, fields)
            except OSError as exc:
                self._fail(exc)
                raise AuditUnavailable(
                    f"audit record could not be written ({exc.strerror})",
                    hint="free space in the audit directory or fix its permissions",
                ) from None
            if self.failing:
                log.warning("audit trail writable again after: %s", self.failing)
                self.failing = None
        self.write_seconds = time.perf_counter() - started
        return record

    def _append(self, event: str, fields: dict[str, Any]) -> dict[str, Any]:
        assert self._fd is not None
        now = dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc)
        record: dict[str, Any] = {
            "ts": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "seq": self._seq + 1,
            "event": event,
        }
        extra = {k: v for k, v in fields.items() if v is not None}
        record.update({k: extra.pop(k) for k in FIELD_ORDER if k in extra})
        record.update(sorted(extra.items()))
        record["prev"] = self._prev
        record = strip_control_deep(record)  # no log injection
        body = json.dumps(record, separators=(",", ":"), ensure_ascii=True).encode()
        line, record["mac"] = seal_line(self._key, body)
        self._write_all(line + b"\n")
        self._seq += 1
        self._prev = record["mac"]
        self._file_records += 1
        if self.forwarder is not None:
            self.forwarder.send(record, line + b"\n")
        return record

    def _write_all(self, line: bytes) -> None:
        """One append; a short or failed write is undone so the file never holds half a record."""
        assert self._fd is not None
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(28, "short write")
            if (
                self.cfg.fsync == "always"
                or (time.monotonic() - self._last_fsync) * 1000 >= self.cfg.fsync_interval_ms
            ):
                os.fsync(self._fd)
                self._last_fsync = time.monotonic()
        except OSError:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                log.error("audit: could not undo a partial write in %s", self._path)
            raise
        self._size += len(line)

    def _fail(self, exc: OSError) -> None:
        self.failures += 1
        if self.failing is None:
            log.error("audit trail NOT writable (%s): refusing requests while it fails", exc.strerror)
        self.failing = exc.strerror or str(exc)

    # --- rotation, retention, shutdown --------------------------------------------------------

    def _rotate_if_due(self) -> None:
        """Seal and begin a new file at the size or day limit; a rotation cut short is finished first."""
        self._write_owed()
        assert self._path is not None and self._fd is not None
        if self._size < self.cfg.rotate_bytes and _file_day(self._path) == self._today():
            return
        reason = "size" if self._size >= self.cfg.rotate_bytes else "day"
        old = self._path
        self._seal("rotation")
        os.close(self._fd)
        self._fd = None  # never write to a closed descriptor number (it may belong to a socket now)
        self._pending = ("audit.rotate", {"reason": reason, "previous_file": old.name})
        self._write_owed()

    def _write_owed(self) -> None:
        """A new file's first record that a full disk stopped: opened and written before anything else."""
        if self._pending is None:
            return
        if self._fd is None:
            self._open_file(None)
        self._append(*self._pending)
        self._pending = None

    def _seal(self, why: str) -> None:
        self._append("audit.seal", {"reason": why, "file_records": self._file_records + 1})
        assert self._fd is not None
        os.fsync(self._fd)

    def close(self) -> None:
        """Seal the current file so that dropping its final lines later is detectable."""
        with self._lock:
            if self._fd is None and self._pending is None:
                return
            try:
                self._write_owed()
                self._seal("shutdown")
                point = f"{self._seq}:{self._prev[:16]}"  # seq + MAC: no later start can re-create it
                log.info(
                    "audit trail sealed at seq %d in %s (a known point: `audit verify --expect-through %s`)",
                    self._seq,
                    self._path,
                    point,
                )
            except OSError as exc:
                log.error("audit: could not write the shutdown seal (%s)", exc.strerror)
            if self._fd is not None:
                os.close(self._fd)
            self._fd, self._pending = None, None

    def purge(self) -> list[str]:
        """Delete files past retention (never the current one), recording each deletion first."""
        cutoff = self.clock() - self.cfg.retention_days * 86400
        deleted = []
        for path in list_files(self.cfg.dir):
            if path == self._path or _file_end_time(path) >= cutoff:
                continue
            lines = path.read_bytes().splitlines()
            last = json.loads(lines[-1]) if lines else {}
            self.write(
                "audit.retention_delete",
                file=path.name,
                last_seq=last.get("seq"),
                last_hash=link_of(lines[-1]) if lines else None,
                reason=f"older than {self.cfg.retention_days} days",
            )
            path.unlink()
            deleted.append(path.name)
        return deleted


def list_files(directory: Path) -> list[Path]:
    """Audit files in chain order (by the first sequence number in their names)."""
    files = [p for p in directory.iterdir() if FILE_RE.match(p.name)]
    return sorted(files, key=lambda p: int(FILE_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def _sealed(path: Path) -> bool:
    lines = path.read_bytes().splitlines()
    return bool(lines) and json.loads(lines[-1]).get("event") == "audit.seal"


def _drop_empty_tail(files: list[Path]) -> tuple[list[Path], list[str]]:
    """Remove empty newest files (created, then never written: a disk that filled up at rotation)."""
    removed = []
    while files and files[-1].stat().st_size == 0:
        files[-1].unlink()
        removed.append(files.pop().name)
    return files, removed


def _file_day(path: Path) -> str:
    m = FILE_RE.match(path.name)
    return m.group(2)[:8] if m else ""


def _file_end_time(path: Path) -> float:
    return path.stat().st_mtime


def _repair_tail(path: Path) -> int:
    """Truncate a last line that lacks its newline (a write torn by a crash); returns bytes removed."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with path.open("r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(data) - keep
