"""Editing policy.toml in place: the one owner of every change a command makes to the admin's file.

Edits are spliced into the admin's text, so every byte outside the touched table stays as it was; each
result is re-parsed and validated by the daemon's own loader before it replaces the file, atomically.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit

from appliance import files
from appliance.config import live as livepolicy
from appliance.config.load import load_policy
from appliance.errors import ConfigError, SetupError


def append_client(policy: Path, text: str, doc: dict[str, Any], entry: dict[str, Any]) -> None:
    """Add one [[clients]] table after the last client, leaving the rest of the file as it was."""
    table = _render(entry, "\r\n" if "\r\n" in text else "\n")
    _edit(policy, text, _insert(text, table), {**doc, "clients": [*clients(policy, doc), entry]})


def remove_client(policy: Path, text: str, doc: dict[str, Any], index: int) -> None:
    """Cut the index-th [[clients]] table (with its own comments) out of the file."""
    rest = [c for i, c in enumerate(clients(policy, doc)) if i != index]
    _edit(policy, text, _remove(text, index), {**doc, "clients": rest})


def add_revoked(policy: Path, fingerprint: str) -> bool:
    """Append a fingerprint to [server] revoked (False if already there), written like a token edit."""
    text = read_text(policy)
    doc = parse(policy, text)
    server = doc.get("server")
    if not isinstance(server, dict):
        raise ConfigError(
            policy,
            "server",
            "missing [server] table",
            hint="pass the policy.toml that `qwen-appliance init` wrote",
        )
    current = server.get("revoked", [])
    if not isinstance(current, list) or not all(isinstance(v, str) for v in current):
        raise ConfigError(
            policy,
            "server.revoked",
            "must be a list of SHA-256 fingerprints",
            hint='write it as revoked = ["64 hex digits", ...]',
        )
    if fingerprint in (v.lower().replace(":", "") for v in current):
        return False
    edited = tomlkit.parse(text)
    table: Any = edited["server"]
    if "revoked" in table:
        table["revoked"].append(fingerprint)
    else:
        table["revoked"] = [fingerprint]
    expected = {**doc, "server": {**server, "revoked": [*current, fingerprint]}}
    _edit(policy, text, tomlkit.dumps(edited), expected)
    return True


def confirm_in_force(policy: Path) -> str:
    """After an edit: tell a running daemon (SIGHUP) and return once the new file is in force."""
    written = load_policy(policy)
    return livepolicy.confirm(policy, written.audit.dir, written.digest)


# --- the file as lines: find each [[clients]] table's own lines --------------------------------------


def _lines(text: str) -> list[str]:
    """Split on '\\n' only (TOML's line ending), keeping the endings, so ''.join() gives the text back."""
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def _string_end(line: str, i: int) -> int:
    """Index just past the one-line string opening at line[i]."""
    quote, j = line[i], i + 1
    while j < len(line) and line[j] != quote:
        j += 2 if quote == '"' and line[j] == "\\" else 1
    return j + 1


def _ml_end(line: str, i: int, delim: str) -> int:
    """Index just past the multi-line string's closing delimiter on this line, or -1 if it goes on."""
    j = i
    while j < len(line):
        if delim == '"""' and line[j] == "\\":
            j += 2
        elif line.startswith(delim, j):
            j += 3
            return j + min(2, len(line[j:]) - len(line[j:].lstrip(delim[0])))
        else:
            j += 1
    return -1


def _scan(line: str, ml: str | None, depth: int) -> tuple[str | None, int]:
    """Carry multi-line-string and bracket state across a line, so '[' inside a value is no header."""
    i = 0
    while i < len(line):
        if ml:
            end = _ml_end(line, i, ml)
            if end < 0:
                return ml, depth
            i, ml = end, None
        elif line.startswith(('"""', "'''"), i):
            ml, i = line[i : i + 3], i + 3
        elif line[i] in "\"'":
            i = _string_end(line, i)
        elif line[i] == "#":
            break
        else:
            depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(line[i], 0)
            i += 1
    return ml, depth


def _kinds(lines: list[str]) -> list[str]:
    """Each line's role: 'header KEY' / 'header [KEY]' (array table), 'blank', 'comment' or 'value'."""
    kinds: list[str] = []
    ml: str | None = None
    depth = 0
    for line in lines:
        bare = line.strip()
        if ml is None and depth == 0 and bare.startswith("["):
            inner = bare[2:] if bare.startswith("[[") else bare[1:]
            key = re.sub(r"[\s\"']", "", inner.split("]", 1)[0])
            kinds.append(f"header [{key}]" if bare.startswith("[[") else f"header {key}")
            continue
        kinds.append(
            "value"
            if ml or depth
            else "blank"
            if not bare
            else "comment"
            if bare.startswith("#")
            else "value"
        )
        ml, depth = _scan(line, ml, depth)
    return kinds


@dataclass(frozen=True)
class Span:
    """Line range [start, end) a [[clients]] table owns: its leading comment, header, keys, trailing notes."""

    start: int
    end: int


def _client_spans(kinds: list[str]) -> list[Span]:
    """One span per [[clients]] header, in file order (the order TOML gives the array)."""
    spans: list[Span] = []
    for i, kind in enumerate(kinds):
        if kind != "header [clients]":
            continue
        end = i + 1
        while end < len(kinds) and not (
            kinds[end].startswith("header")
            and not kinds[end].startswith(("header clients.", "header [clients."))
        ):
            end += 1
        spans.append(Span(_lead_start(kinds, i), _own_end(kinds, i, end)))
    return spans


def _lead_start(kinds: list[str], header: int) -> int:
    """Comment lines directly above the header (no blank line between) describe this client."""
    start = header
    while start > 0 and kinds[start - 1] == "comment":
        start -= 1
    return start


def _own_end(kinds: list[str], header: int, next_header: int) -> int:
    """Past the last value and the comments glued under it, unless those glue onto the next header."""
    content = [i for i in range(header + 1, next_header) if kinds[i] not in ("blank", "comment")]
    last = content[-1] if content else header
    end = last + 1
    while end < next_header and kinds[end] == "comment":
        end += 1
    return last + 1 if end == next_header < len(kinds) else end


# --- reading, splicing and writing ------------------------------------------------------------------


def read_text(policy: Path) -> str:
    """The policy's exact text, so every byte outside an edit can be kept."""
    try:
        return policy.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(
            policy,
            None,
            f"cannot read policy file ({exc.strerror})",
            hint="pass the policy.toml that `qwen-appliance init` wrote",
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(policy, None, "not UTF-8 text", hint="TOML files are UTF-8") from None


def parse(policy: Path, text: str) -> dict[str, Any]:
    """The text as TOML, without the daemon's checks, so even a rejected policy can be read."""
    try:
        return files.load_toml(text)
    except files.TOMLDecodeError as exc:
        raise ConfigError(
            policy, None, f"not valid TOML: {exc}", hint="check quoting and brackets near the position shown"
        ) from None


def clients(policy: Path, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The [[clients]] tables, as raw dicts."""
    found = doc.get("clients", [])
    if not isinstance(found, list) or not all(isinstance(c, dict) for c in found):
        raise ConfigError(
            policy, "clients", "must be an array of tables", hint="write each client as a [[clients]] table"
        )
    return found


def _render(entry: dict[str, Any], newline: str) -> str:
    """The new table as TOML, via tomlkit so every string is quoted and escaped correctly."""
    table = tomlkit.table()
    for key, value in entry.items():
        table[key] = value
    aot = tomlkit.aot()
    aot.append(table)
    doc = tomlkit.document()
    doc["clients"] = aot
    return tomlkit.dumps(doc).replace("\n", newline)


def _insert(text: str, table: str) -> str:
    """Place the table after the last client (or at the end), preceded by one blank line."""
    lines = _lines(text)
    spans = _client_spans(_kinds(lines))
    at = spans[-1].end if spans else len(lines)
    newline = "\r\n" if "\r\n" in text else "\n"
    head = "".join(lines[:at])
    if head and not head.endswith("\n"):
        head += newline
    tail = "".join(lines[at:])
    after = newline if tail and tail.strip(" \t")[:1] not in ("\n", "\r") else ""
    return head + newline + table + after + tail


def _remove(text: str, index: int) -> str:
    """Cut the index-th [[clients]] table with its own comments and the blank line that set it apart."""
    lines = _lines(text)
    kinds = _kinds(lines)
    span = _client_spans(kinds)[index]
    start = span.start
    if span.end == len(lines) or kinds[span.end] == "blank":
        while start > 0 and kinds[start - 1] == "blank":
            start -= 1
    return "".join(lines[:start] + lines[span.end :])


def _check_mode(policy: Path) -> os.stat_result:
    """Refuse to edit a file others can change: its content decides who gets in."""
    st = policy.stat()
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            policy,
            None,
            f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})",
            hint=f"chmod go-w {policy}",
        )
    return st


def _validate(tmp: Path, policy: Path) -> None:
    """Run the daemon's own loader on the new bytes, reporting errors against the real file name."""
    try:
        load_policy(tmp)
    except ConfigError as exc:
        raise SetupError(str(exc).replace(str(tmp), str(policy)) + f"\n{policy} was not changed.") from None


def _commit(policy: Path, old: str, new: str) -> None:
    """Validate the new text, then swap it in atomically with the old file's mode and owner."""
    real = Path(os.path.realpath(policy))
    st = _check_mode(real)

    def check(tmp: Path) -> None:
        _validate(tmp, policy)
        if real.read_bytes() != old.encode("utf-8"):
            raise SetupError(
                f"{policy} changed while this command ran; nothing was written", hint="run the command again"
            )

    try:
        files.atomic_write(
            real, new.encode("utf-8"), stat.S_IMODE(st.st_mode), owner=(st.st_uid, st.st_gid), check=check
        )
    except PermissionError as exc:
        raise SetupError(
            f"{policy}: cannot write it with its owner {st.st_uid}:{st.st_gid} kept ({exc.strerror})",
            hint="run as root or as the file's owner",
        ) from None


def _edit(policy: Path, old: str, new: str, expected: dict[str, Any]) -> None:
    """Guard the splice: the new text must parse to exactly the intended document before it is written."""
    if parse(policy, new) != expected:
        raise SetupError(
            f"{policy}: cannot edit this file's layout safely; nothing was written",
            hint=f"make the change by hand, then run `qwen-appliance policy check {policy}`",
        )
    _commit(policy, old, new)
