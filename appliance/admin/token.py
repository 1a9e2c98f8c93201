"""`qwen-appliance token ...`: create, list and revoke client tokens in policy.toml.

Edits are spliced into the admin's text, so every byte outside the touched [[clients]] table stays as it
was; tomlkit renders the new table, and each result is re-parsed and validated before it replaces the file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit

from appliance.config import live as livepolicy
from appliance.config.policy import CLIENT_NAME, load_policy
from appliance.config.settings import settings_in
from appliance.errors import ConfigError, SetupError
from appliance.security import pki
from appliance.security.tokens import new_token, token_digest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_RATE = re.compile(r"^([1-9][0-9]{0,8})/(second|minute|hour|day)$")
_DAYS = re.compile(r"^([1-9][0-9]{0,4})d$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SCOPES: tuple[str, ...] = next(s.choices for s in settings_in("clients") if s.key == "scopes")
RELOAD_NOTE = ("A running daemon picks this up on reload (`systemctl reload qwen-appliance`) "
               "or automatically when the file changes.")


def register(sub: Any) -> None:
    """Add `token create|list|revoke` to the CLI (each sets `handler`)."""
    tok = sub.add_parser("token", help="create, list and revoke client tokens in policy.toml")
    tsub = tok.add_subparsers(dest="token_command", required=True)

    p = tsub.add_parser("create", help="add a client with a new token (printed once)")
    p.add_argument("name", help="client name: letters, digits, '.', '_', '-'; at most 64")
    p.add_argument("--scope", dest="scopes", action="append", metavar="SCOPE",
                   help=f"repeatable; one of {', '.join(_SCOPES)} (default chat)")
    p.add_argument("--expires", metavar="90d|YYYY-MM-DD", help="last day (UTC) the token works")
    p.add_argument("--allow", action="append", metavar="CIDR", help="address range (repeatable)")
    p.add_argument("--cert-cn", metavar="CN", help="client certificate subject CN required")
    p.add_argument("--cert-sha256", metavar="HEX",
                   help="client certificate required: its SHA-256 as issued (`cert list` sha256, "
                   "`openssl x509 -fingerprint -sha256`) or of its signed part (tbs sha256)")
    p.add_argument("--rate", metavar="N/UNIT", help="e.g. 60/minute (second|minute|hour|day)")
    p.add_argument("--max-concurrent", type=int, metavar="N", help="requests in flight at once")
    p.add_argument("--policy", type=Path, required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_create)

    p = tsub.add_parser("list", help="show clients (never tokens or digests)")
    p.add_argument("--policy", type=Path, required=True)
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(handler=_list)

    p = tsub.add_parser("revoke", help="remove a client's [[clients]] table")
    p.add_argument("name")
    p.add_argument("--policy", type=Path, required=True)
    p.set_defaults(handler=_revoke)


# --- argument checks: each names the policy file and the key it would write ---------------------------


def _check_name(policy: Path, name: str, existing: list[dict[str, Any]]) -> None:
    if not CLIENT_NAME.fullmatch(name):
        raise ConfigError(policy, "clients.name", f"invalid client name {name!r}",
                          hint="letters, digits, '.', '_' and '-', starting with a letter or digit, "
                               "at most 64")
    if any(c.get("name") == name for c in existing):
        raise ConfigError(policy, "clients.name", f"a client named {name!r} already exists",
                          hint=f"pick another name, or `qwen-appliance token revoke {name}` first")


def _scopes(policy: Path, given: list[str] | None) -> list[str]:
    """Repeatable or comma-separated; an unknown scope is refused rather than silently dropped."""
    scopes: list[str] = []
    for scope in (s.strip() for item in (given or ["chat"]) for s in item.split(",")):
        if scope not in _SCOPES:
            raise ConfigError(policy, "clients.scopes", f"unknown scope {scope!r}",
                              hint=f"allowed: {', '.join(_SCOPES)}")
        if scope not in scopes:
            scopes.append(scope)
    return scopes


def _networks(policy: Path, given: list[str]) -> list[str]:
    """Strict: 10.1.2.3/24 is refused, as the daemon does, since it is usually a typo for a host."""
    nets: list[str] = []
    for value in given:
        try:
            nets.append(str(ipaddress.ip_network(value.strip(), strict=True)))
        except ValueError as exc:
            raise ConfigError(policy, "clients.allow", f"{value!r} is not an address range ({exc})",
                              hint="e.g. 10.20.30.0/24, 10.20.30.7 or fd00::/64, with the host "
                                   "bits zero") from None
    return nets


def _expiry(policy: Path, value: str, today: dt.date | None = None) -> dt.date:
    """`90d` (from today, UTC) or an ISO date; a day already past would create a dead token."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    m = _DAYS.fullmatch(value.strip())
    try:
        day = today + dt.timedelta(days=int(m.group(1))) if m else dt.date.fromisoformat(value.strip())
    except ValueError:
        raise ConfigError(policy, "clients.expires", f"{value!r} is neither a duration nor a date",
                          hint="write e.g. 90d (days from today, UTC) or 2027-03-01") from None
    if day < today:
        raise ConfigError(policy, "clients.expires", f"{day} is already past",
                          hint="the token is accepted up to and including this day (UTC)")
    return day


def _rate(policy: Path, value: str) -> str:
    """Same grammar as the daemon's `rate` key, so a created entry always loads."""
    text = re.sub(r"\s+", "", value)
    if not _RATE.fullmatch(text):
        raise ConfigError(policy, "clients.rate", f"{value!r} is not a rate",
                          hint="write COUNT/UNIT, e.g. 60/minute; units: second, minute, hour, day")
    return text


def _cert_binding(policy: Path, cn: str | None, sha256: str | None) -> dict[str, str]:
    """Fingerprints are accepted as openssl prints them (colons, upper case) and stored normalised."""
    out: dict[str, str] = {}
    if cn is not None:
        if not cn.strip() or len(cn) > 64 or not cn.isprintable():
            raise ConfigError(policy, "clients.cert_cn", f"{cn!r} is not a certificate CN",
                              hint="1 to 64 printable characters, as in `qwen-appliance cert list`")
        out["cert_cn"] = cn
    if sha256 is not None:
        digest = sha256.strip().lower().replace(":", "")
        if not _HEX64.fullmatch(digest):
            raise ConfigError(policy, "clients.cert_sha256", "must be 64 hex digits (a SHA-256)",
                              hint="`qwen-appliance cert list CERT` prints it (sha256, or tbs sha256)")
        out["cert_sha256"] = digest
    return out


def _entry(policy: Path, args: argparse.Namespace, existing: list[dict[str, Any]]) -> dict[str, Any]:
    """Every value of the new [[clients]] table except the digest, checked; only the keys given."""
    _check_name(policy, args.name, existing)
    entry: dict[str, Any] = {"name": args.name, "scopes": _scopes(policy, args.scopes)}
    if args.allow:
        entry["allow"] = _networks(policy, args.allow)
    entry.update(_cert_binding(policy, args.cert_cn, args.cert_sha256))
    if args.expires is not None:
        entry["expires"] = _expiry(policy, args.expires)
    if args.rate is not None:
        entry["rate"] = _rate(policy, args.rate)
    if args.max_concurrent is not None:
        if args.max_concurrent < 1:
            raise ConfigError(policy, "clients.max_concurrent", "must be at least 1",
                              hint="leave it out for no per-client limit")
        entry["max_concurrent"] = args.max_concurrent
    return entry


# --- the policy file as text: find each [[clients]] table's own lines ---------------------------------


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
            ml, i = line[i:i + 3], i + 3
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
        kinds.append("value" if ml or depth else "blank" if not bare else
                     "comment" if bare.startswith("#") else "value")
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
        while end < len(kinds) and not (kinds[end].startswith("header") and
                                        not kinds[end].startswith(("header clients.",
                                                                   "header [clients."))):
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


def _read(policy: Path) -> str:
    try:
        return policy.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(policy, None, f"cannot read policy file ({exc.strerror})",
                          hint="pass the policy.toml that `qwen-appliance init` wrote") from None
    except UnicodeDecodeError:
        raise ConfigError(policy, None, "not UTF-8 text", hint="TOML files are UTF-8") from None


def _parse(policy: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(policy, None, f"not valid TOML: {exc}",
                          hint="check quoting and brackets near the position shown") from None


def _clients(policy: Path, doc: dict[str, Any]) -> list[dict[str, Any]]:
    clients = doc.get("clients", [])
    if not isinstance(clients, list) or not all(isinstance(c, dict) for c in clients):
        raise ConfigError(policy, "clients", "must be an array of tables",
                          hint="write each client as a [[clients]] table")
    return clients


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
    return "".join(lines[:start] + lines[span.end:])


def _check_mode(policy: Path) -> os.stat_result:
    """Refuse to edit a file others can change: its content decides who gets in."""
    st = policy.stat()
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(policy, None, f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})",
                          hint=f"chmod go-w {policy}")
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
            raise SetupError(f"{policy} changed while this command ran; nothing was written",
                             hint="run the command again")

    try:
        pki.atomic_write(real, new.encode("utf-8"), stat.S_IMODE(st.st_mode),
                         owner=(st.st_uid, st.st_gid), check=check)
    except PermissionError as exc:
        raise SetupError(f"{policy}: cannot write it with its owner {st.st_uid}:{st.st_gid} kept "
                         f"({exc.strerror})", hint="run as root or as the file's owner") from None


def _edit(policy: Path, old: str, new: str, expected: dict[str, Any]) -> None:
    """Guard the splice: the new text must parse to exactly the intended document before it is written."""
    if _parse(policy, new) != expected:
        raise SetupError(f"{policy}: cannot edit this file's layout safely; nothing was written",
                         hint="make the change by hand, then run `qwen-appliance check`")
    _commit(policy, old, new)


# --- the commands ---------------------------------------------------------------------------------


def _create(args: argparse.Namespace) -> int:
    """Write the digest first; the token is printed only once the file holds it."""
    policy: Path = args.policy
    text = _read(policy)
    doc = _parse(policy, text)
    clients = _clients(policy, doc)
    entry = _entry(policy, args, clients)
    token = new_token()
    entry = {"name": entry.pop("name"), "token_sha256": token_digest(token), **entry}
    _edit(policy, text, _insert(text, _render(entry, "\r\n" if "\r\n" in text else "\n")),
          {**doc, "clients": [*clients, entry]})
    expires = entry["expires"].isoformat() if "expires" in entry else None
    if args.json:
        print(json.dumps({"name": args.name, "token": token, "scopes": entry["scopes"],
                          "expires": expires}))
        return 0
    print(f"Added client {args.name!r} to {policy} (scopes {', '.join(entry['scopes'])}"
          f"{', expires ' + expires if expires else ''}).\n\n  token  {token}\n\n"
          "This token is shown only this once; the policy stores only its SHA-256. Hand it to the "
          f"client over a trusted channel.\n{RELOAD_NOTE}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    """Remove one client; the last one cannot go, since the daemon refuses a policy without clients."""
    policy: Path = args.policy
    text = _read(policy)
    doc = _parse(policy, text)
    clients = _clients(policy, doc)
    names = [c.get("name") for c in clients]
    if args.name not in names:
        raise ConfigError(policy, "clients.name", f"no client named {args.name!r}",
                          hint="`qwen-appliance token list --policy FILE` shows the names")
    if len(clients) == 1:
        raise ConfigError(policy, "clients", f"{args.name!r} is the only client; the daemon refuses a "
                          "policy without clients", hint="create its replacement first with "
                          "`qwen-appliance token create`, or stop the daemon")
    index = names.index(args.name)
    rest = [c for i, c in enumerate(clients) if i != index]
    _edit(policy, text, _remove(text, index), {**doc, "clients": rest})
    print(f"Revoked client {args.name!r} in {policy}.", flush=True)
    print(confirm_in_force(policy))
    print("Its TLS certificate is still signed by the CA; to refuse it as well: "
          "`qwen-appliance cert revoke CERT --policy FILE`.")
    return 0


def add_revoked(policy: Path, fingerprint: str) -> bool:
    """Append a fingerprint to [server] revoked (False if already there), written like a token edit."""
    text = _read(policy)
    doc = _parse(policy, text)
    server = doc.get("server")
    if not isinstance(server, dict):
        raise ConfigError(policy, "server", "missing [server] table",
                          hint="pass the policy.toml that `qwen-appliance init` wrote")
    current = server.get("revoked", [])
    if not isinstance(current, list) or not all(isinstance(v, str) for v in current):
        raise ConfigError(policy, "server.revoked", "must be a list of SHA-256 fingerprints",
                          hint='write it as revoked = ["64 hex digits", ...]')
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


def _summary(client: dict[str, Any], today: dt.date) -> dict[str, Any]:
    """What an admin may see about a client: no token, and no digest beyond an 8-hex prefix."""
    expires = client.get("expires")
    if isinstance(expires, dt.datetime):
        expires = expires.date()
    cert_sha = client.get("cert_sha256")
    return {
        "name": client.get("name"),
        "scopes": [str(x) for x in client.get("scopes", ["chat"])],
        "expires": expires.isoformat() if isinstance(expires, dt.date) else None,
        "expired": isinstance(expires, dt.date) and expires < today,
        "disabled": bool(client.get("disabled", False)),
        "allow": [str(x) for x in client.get("allow") or []],
        "cert_cn": client.get("cert_cn"),
        "cert_sha256_prefix": str(cert_sha).lower().replace(":", "")[:8] if cert_sha else None,
        "rate": client.get("rate"),
        "max_concurrent": client.get("max_concurrent"),
    }


def _row(s: dict[str, Any]) -> list[str]:
    cert = ", ".join(x for x in (f"CN={s['cert_cn']}" if s["cert_cn"] else "",
                                 f"sha256={s['cert_sha256_prefix']}…" if s["cert_sha256_prefix"]
                                 else "") if x)
    limits = ", ".join(x for x in (s["rate"] or "", f"{s['max_concurrent']} at once"
                                   if s["max_concurrent"] else "") if x)
    expires = (s["expires"] or "never") + (" EXPIRED" if s["expired"] else "")
    return [str(s["name"]), ",".join(s["scopes"]), expires, "yes" if s["disabled"] else "no",
            ",".join(s["allow"]) or "any", cert or "-", limits or "-"]


def _list(args: argparse.Namespace) -> int:
    """Read the raw file, so even a policy the daemon rejects can be inspected."""
    policy: Path = args.policy
    today = dt.datetime.now(dt.timezone.utc).date()
    rows = [_summary(c, today) for c in _clients(policy, _parse(policy, _read(policy)))]
    if args.json:
        print(json.dumps(rows))
        return 0
    table = [["NAME", "SCOPES", "EXPIRES", "DISABLED", "ALLOW", "CERTIFICATE", "LIMITS"],
             *(_row(s) for s in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0
