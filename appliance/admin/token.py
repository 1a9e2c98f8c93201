"""`qwen-appliance token ...`: create, list and revoke client tokens in policy.toml.

The file is changed only through appliance.config.edit, which keeps every byte outside the touched
[[clients]] table and validates the result before it replaces the file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import re
from pathlib import Path
from typing import Any

from appliance.config import edit
from appliance.config.load import CLIENT_NAME
from appliance.config.settings import settings_in
from appliance.errors import ConfigError
from appliance.security.tokens import new_token, token_digest

_RATE = re.compile(r"^([1-9][0-9]{0,8})/(second|minute|hour|day)$")
_DAYS = re.compile(r"^([1-9][0-9]{0,4})d$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SCOPES: tuple[str, ...] = next(s.choices for s in settings_in("clients") if s.key == "scopes")
RELOAD_NOTE = (
    "A running daemon picks this up on reload (`systemctl reload qwen-appliance`) "
    "or automatically when the file changes."
)


def register(sub: Any) -> None:
    """Add `token create|list|revoke` to the CLI (each sets `handler`)."""
    tok = sub.add_parser("token", help="create, list and revoke client tokens in policy.toml")
    tsub = tok.add_subparsers(dest="token_command", required=True)

    p = tsub.add_parser("create", help="add a client with a new token (printed once)")
    p.add_argument("name", help="client name: letters, digits, '.', '_', '-'; at most 64")
    p.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        metavar="SCOPE",
        help=f"repeatable; one of {', '.join(_SCOPES)} (default chat)",
    )
    p.add_argument("--expires", metavar="90d|YYYY-MM-DD", help="last day (UTC) the token works")
    p.add_argument("--allow", action="append", metavar="CIDR", help="address range (repeatable)")
    p.add_argument("--cert-cn", metavar="CN", help="client certificate subject CN required")
    p.add_argument(
        "--cert-sha256",
        metavar="HEX",
        help="client certificate required: its SHA-256 as issued (`cert list` sha256, "
        "`openssl x509 -fingerprint -sha256`) or of its signed part (tbs sha256)",
    )
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
        raise ConfigError(
            policy,
            "clients.name",
            f"invalid client name {name!r}",
            hint="letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64",
        )
    if any(c.get("name") == name for c in existing):
        raise ConfigError(
            policy,
            "clients.name",
            f"a client named {name!r} already exists",
            hint=f"pick another name, or `qwen-appliance token revoke {name}` first",
        )


def _scopes(policy: Path, given: list[str] | None) -> list[str]:
    """Repeatable or comma-separated; an unknown scope is refused rather than silently dropped."""
    scopes: list[str] = []
    for scope in (s.strip() for item in (given or ["chat"]) for s in item.split(",")):
        if scope not in _SCOPES:
            raise ConfigError(
                policy, "clients.scopes", f"unknown scope {scope!r}", hint=f"allowed: {', '.join(_SCOPES)}"
            )
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
            raise ConfigError(
                policy,
                "clients.allow",
                f"{value!r} is not an address range ({exc})",
                hint="e.g. 10.20.30.0/24, 10.20.30.7 or fd00::/64, with the host bits zero",
            ) from None
    return nets


def _expiry(policy: Path, value: str, today: dt.date | None = None) -> dt.date:
    """`90d` (from today, UTC) or an ISO date; a day already past would create a dead token."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    m = _DAYS.fullmatch(value.strip())
    try:
        day = today + dt.timedelta(days=int(m.group(1))) if m else dt.date.fromisoformat(value.strip())
    except ValueError:
        raise ConfigError(
            policy,
            "clients.expires",
            f"{value!r} is neither a duration nor a date",
            hint="write e.g. 90d (days from today, UTC) or 2027-03-01",
        ) from None
    if day < today:
        raise ConfigError(
            policy,
            "clients.expires",
            f"{day} is already past",
            hint="the token is accepted up to and including this day (UTC)",
        )
    return day


def _rate(policy: Path, value: str) -> str:
    """Same grammar as the daemon's `rate` key, so a created entry always loads."""
    text = re.sub(r"\s+", "", value)
    if not _RATE.fullmatch(text):
        raise ConfigError(
            policy,
            "clients.rate",
            f"{value!r} is not a rate",
            hint="write COUNT/UNIT, e.g. 60/minute; units: second, minute, hour, day",
        )
    return text


def _cert_binding(policy: Path, cn: str | None, sha256: str | None) -> dict[str, str]:
    """Fingerprints are accepted as openssl prints them (colons, upper case) and stored normalised."""
    out: dict[str, str] = {}
    if cn is not None:
        if not cn.strip() or len(cn) > 64 or not cn.isprintable():
            raise ConfigError(
                policy,
                "clients.cert_cn",
                f"{cn!r} is not a certificate CN",
                hint="1 to 64 printable characters, as in `qwen-appliance cert list`",
            )
        out["cert_cn"] = cn
    if sha256 is not None:
        digest = sha256.strip().lower().replace(":", "")
        if not _HEX64.fullmatch(digest):
            raise ConfigError(
                policy,
                "clients.cert_sha256",
                "must be 64 hex digits (a SHA-256)",
                hint="`qwen-appliance cert list CERT` prints it (sha256, or tbs sha256)",
            )
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
            raise ConfigError(
                policy,
                "clients.max_concurrent",
                "must be at least 1",
                hint="leave it out for no per-client limit",
            )
        entry["max_concurrent"] = args.max_concurrent
    return entry


# --- the commands ---------------------------------------------------------------------------------


def _create(args: argparse.Namespace) -> int:
    """Write the digest first; the token is printed only once the file holds it."""
    policy: Path = args.policy
    text = edit.read_text(policy)
    doc = edit.parse(policy, text)
    entry = _entry(policy, args, edit.clients(policy, doc))
    token = new_token()
    entry = {"name": entry.pop("name"), "token_sha256": token_digest(token), **entry}
    edit.append_client(policy, text, doc, entry)
    expires = entry["expires"].isoformat() if "expires" in entry else None
    if args.json:
        print(json.dumps({"name": args.name, "token": token, "scopes": entry["scopes"], "expires": expires}))
        return 0
    print(
        f"Added client {args.name!r} to {policy} (scopes {', '.join(entry['scopes'])}"
        f"{', expires ' + expires if expires else ''}).\n\n  token  {token}\n\n"
        "This token is shown only this once; the policy stores only its SHA-256. Hand it to the "
        f"client over a trusted channel.\n{RELOAD_NOTE}"
    )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    """Remove one client; the last one cannot go, since the daemon refuses a policy without clients."""
    policy: Path = args.policy
    text = edit.read_text(policy)
    doc = edit.parse(policy, text)
    clients = edit.clients(policy, doc)
    names = [c.get("name") for c in clients]
    if args.name not in names:
        raise ConfigError(
            policy,
            "clients.name",
            f"no client named {args.name!r}",
            hint="`qwen-appliance token list --policy FILE` shows the names",
        )
    if len(clients) == 1:
        raise ConfigError(
            policy,
            "clients",
            f"{args.name!r} is the only client; the daemon refuses a policy without clients",
            hint="create its replacement first with `qwen-appliance token create`, or stop the daemon",
        )
    edit.remove_client(policy, text, doc, names.index(args.name))
    print(f"Revoked client {args.name!r} in {policy}.", flush=True)
    print(edit.confirm_in_force(policy))
    print(
        "Its TLS certificate is still signed by the CA; to refuse it as well: "
        "`qwen-appliance cert revoke CERT --policy FILE`."
    )
    return 0


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
    cert = ", ".join(
        x
        for x in (
            f"CN={s['cert_cn']}" if s["cert_cn"] else "",
            f"sha256={s['cert_sha256_prefix']}…" if s["cert_sha256_prefix"] else "",
        )
        if x
    )
    limits = ", ".join(
        x for x in (s["rate"] or "", f"{s['max_concurrent']} at once" if s["max_concurrent"] else "") if x
    )
    expires = (s["expires"] or "never") + (" EXPIRED" if s["expired"] else "")
    return [
        str(s["name"]),
        ",".join(s["scopes"]),
        expires,
        "yes" if s["disabled"] else "no",
        ",".join(s["allow"]) or "any",
        cert or "-",
        limits or "-",
    ]


def _list(args: argparse.Namespace) -> int:
    """Read the raw file, so even a policy the daemon rejects can be inspected."""
    policy: Path = args.policy
    today = dt.datetime.now(dt.timezone.utc).date()
    rows = [_summary(c, today) for c in edit.clients(policy, edit.parse(policy, edit.read_text(policy)))]
    if args.json:
        print(json.dumps(rows))
        return 0
    table = [
        ["NAME", "SCOPES", "EXPIRES", "DISABLED", "ALLOW", "CERTIFICATE", "LIMITS"],
        *(_row(s) for s in rows),
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0
