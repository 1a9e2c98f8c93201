"""Load policy.toml into typed, validated objects; anything doubtful is refused, never defaulted open.

Every problem in the file is collected, so `policy check` can list them all at once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.config.policy import (
    UNIT_SECONDS,
    AuditPolicy,
    Client,
    HealthPolicy,
    LimitsPolicy,
    ModelPolicy,
    Policy,
    Rate,
    ServerPolicy,
)
from appliance.config.settings import REQUIRED, SECTIONS, Setting, settings_in
from appliance.config.trusted import read_stable
from appliance.errors import ConfigError, Problems
from appliance.files import tomllib

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # use with fullmatch
_RATE = re.compile(r"^\s*(\d{1,9})\s*/\s*(second|minute|hour|day)\s*$")
_INVALID = object()


def load_policy(file: Path | str) -> Policy:
    """Read and validate a policy file; raises PolicyInvalid naming the file, each key and a hint."""
    path = Path(file)
    try:
        raw = read_stable(path)
    except OSError as exc:
        raise ConfigError(
            path,
            None,
            f"cannot read policy file ({exc.strerror})",
            hint="run `qwen-appliance init DIR` to create one",
        ) from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            path, None, f"not valid TOML: {exc}", hint="check quoting and brackets near the position shown"
        ) from None
    return _build(path, hashlib.sha256(raw).hexdigest(), doc)


def _build(path: Path, digest: str, doc: dict[str, Any]) -> Policy:
    errs = Problems(path)
    for name in sorted(set(doc) - set(SECTIONS)):
        errs.add(name, "unknown section", hint=f"known sections: {', '.join(SECTIONS)}")
    base = path.resolve().parent
    server = _section(errs, base, doc, "server")
    model = _section(errs, base, doc, "model")
    limits = _section(errs, base, doc, "limits")
    audit = _section(errs, base, doc, "audit")
    health = _section(errs, base, doc, "health")
    clients = _clients(errs, base, doc.get("clients", []))
    errs.raise_if_any()
    host, port = server.pop("listen")
    server["allow"] = tuple(server["allow"])
    server["trusted_proxies"] = tuple(server["trusted_proxies"])
    server["revoked"] = frozenset(server["revoked"])
    model["tensor_split"] = tuple(model["tensor_split"])
    policy = Policy(
        file=path,
        digest=digest,
        server=ServerPolicy(host=host, port=port, **server),
        model=ModelPolicy(**model),
        limits=LimitsPolicy(**limits),
        audit=AuditPolicy(**audit),
        health=HealthPolicy(**health),
        clients=clients,
    )
    _cross_check(errs, policy)
    errs.raise_if_any()
    return policy


def _section(errs: Problems, base: Path, doc: dict[str, Any], name: str) -> dict[str, Any]:
    table = doc.get(name, {})
    if not isinstance(table, dict):
        errs.add(name, "must be a table", hint=f"write it as [{name}]")
        table = {}
    return _table(errs, base, table, settings_in(name), name)


def _table(
    errs: Problems, base: Path, table: dict[str, Any], keys: tuple[Setting, ...], where: str
) -> dict[str, Any]:
    known = {s.key: s for s in keys}
    for key in sorted(set(table) - set(known)):
        errs.add(f"{where}.{key}", "unknown key", hint=f"known keys: {', '.join(known)}; see docs/policy.md")
    out: dict[str, Any] = {}
    for key, setting in known.items():
        if key not in table:
            if setting.default is REQUIRED:
                errs.add(f"{where}.{key}", "missing", hint=setting.help)
                out[key] = REQUIRED
            elif setting.default is not None and setting.kind in ("path", "cidrs", "floats", "hexlist"):
                out[key] = _value(errs, base, setting, setting.default, f"{where}.{key}")
            else:
                out[key] = setting.default
            continue
        out[key] = _value(errs, base, setting, table[key], f"{where}.{key}")
    return out


def _value(errs: Problems, base: Path, s: Setting, value: Any, key: str) -> Any:
    """Check one value against its declared kind; paths resolve against the policy's folder."""

    def bad(why: str) -> Any:
        errs.add(key, why, hint=s.help)
        return _INVALID

    checker = _KINDS.get(s.kind)
    if checker is None:  # pragma: no cover - a settings-table mistake
        raise AssertionError(f"unknown setting kind {s.kind}")
    return checker(s, value, bad, base)


def _int(s: Setting, value: Any, bad: Callable[[str], Any], _base: Path) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        return bad(f"must be an integer, not {type(value).__name__}")
    if s.minimum is not None and value < s.minimum:
        return bad(f"must be at least {s.minimum}")
    if s.maximum is not None and value > s.maximum:
        return bad(f"must be at most {s.maximum}")
    return value


def _str(s: Setting, value: Any, bad: Callable[[str], Any], _base: Path) -> Any:
    if not isinstance(value, str):
        return bad(f"must be a string, not {type(value).__name__}")
    if s.choices and value not in s.choices:
        return bad(f"must be one of {', '.join(s.choices)}")
    return value


def _bool(_s: Setting, value: Any, bad: Callable[[str], Any], _base: Path) -> Any:
    return value if isinstance(value, bool) else bad("must be true or false")


def _path(s: Setting, value: Any, bad: Callable[[str], Any], base: Path) -> Any:
    if not isinstance(value, str) or not value or "\x00" in value:
        return bad("must be a non-empty path string")
    try:
        return (base / Path(value).expanduser()).resolve()
    except RuntimeError:  # "~nosuchuser/...": expanduser cannot find that home directory
        return bad(f"{value!r}: no such user's home directory")


def _listen(_s: Setting, value: Any, bad: Callable[[str], Any], _base: Path) -> Any:
    host, sep, port_s = str(value).rpartition(":")
    host = host.strip("[]")
    if (
        not isinstance(value, str)
        or not sep
        or not host
        or not port_s.isdigit()
        or not 0 < int(port_s) < 65536
    ):
        return bad('must be HOST:PORT, e.g. "0.0.0.0:8443"')
    return host, int(port_s)


def _strlist(s: Setting, value: Any, bad: Callable[[str], Any], _base: Path) -> Any:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return bad("must be a list of strings")
    wrong = [v for v in value if s.choices and v not in s.choices]
    if wrong:
        return bad(f"unknown value {wrong[0]!r}; allowed: {', '.join(s.choices)}")
    return frozenset(value)


def _cidrs(_s: Setting, value: Any, bad: Callable[[str], Any], _base: Path) -> Any:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return bad('must be a list of address ranges like "192.168.10.0/24"')
    nets = []
    for v in value:
        try:
            nets.append(ipaddress.ip_network(v, strict=True))
        except ValueError as exc:
            return bad(f"{v!r} is not an address range ({exc})")
    return nets


def _hex(_s: Setting, value: Any, bad: Callable[[str], Any], _base: Path) -> Any:
    digest = value.lower().replace(":", "") if isinstance(value, str) else ""
    return digest if _HEX64.fullmatch(digest) else bad("must be 64 hex digits (a SHA-256)")


def _hexlist(s: Setting, value: Any, bad: Callable[[str], Any], base: Path) -> Any:
    if not isinstance(value, list):
        return bad("must be a list of SHA-256 fingerprints")
    out = [_hex(s, v, bad, base) for v in value]
    return _INVALID if _INVALID in out else out


def _date(_s: Setting, value: Any, bad: Callable[[str], Any], _base: Path) -> Any:
    if isinstance(value, dt.datetime) or not isinstance(value, dt.date):
        return bad("must be a date without quotes, e.g. 2027-03-01")
    return value


def _rate(_s: Setting, value: Any, bad: Callable[[str], Any], _base: Path) -> Any:
    m = _RATE.fullmatch(value) if isinstance(value, str) else None
    if not m or int(m.group(1)) < 1:
        return bad('must look like "60/minute" (units: second, minute, hour, day)')
    return Rate(int(m.group(1)), UNIT_SECONDS[m.group(2)])


def _floats(_s: Setting, value: Any, bad: Callable[[str], Any], _base: Path) -> Any:
    if not isinstance(value, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        return bad("must be a list of non-negative numbers, e.g. [3, 1]")
    return [float(v) for v in value]


_KINDS: dict[str, Callable[[Setting, Any, Callable[[str], Any], Path], Any]] = {
    "int": _int,
    "str": _str,
    "choice": _str,
    "bool": _bool,
    "path": _path,
    "listen": _listen,
    "list[str]": _strlist,
    "cidrs": _cidrs,
    "hex": _hex,
    "hexlist": _hexlist,
    "date": _date,
    "rate": _rate,
    "floats": _floats,
}


def _clients(errs: Problems, base: Path, items: Any) -> tuple[Client, ...]:
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        errs.add("clients", "must be an array of tables", hint="write each client as [[clients]]")
        return ()
    clients: list[Client] = []
    seen: set[str] = set()
    for n, item in enumerate(items):
        where = f"clients[{n}]"
        values = _table(errs, base, item, settings_in("clients"), where)
        if isinstance(values["name"], str) and not CLIENT_NAME.fullmatch(values["name"]):
            errs.add(
                f"{where}.name",
                f"invalid client name {values['name']!r}",
                hint="letters, digits, '.', '_' and '-', at most 64",
            )
        if (
            values["token_sha256"] is not _INVALID
            and isinstance(values["token_sha256"], str)
            and not _HEX64.fullmatch(values["token_sha256"].lower())
        ):
            errs.add(
                f"{where}.token_sha256",
                "must be 64 hex digits",
                hint="create clients with `qwen-appliance token create NAME`",
            )
        if {str(values["name"]), str(values["token_sha256"]).lower()} & seen:
            errs.add(
                where, "duplicate client name or token", hint="every client needs its own name and token"
            )
        seen |= {str(values["name"]), str(values["token_sha256"]).lower()}
        if _INVALID not in values.values() and REQUIRED not in values.values():
            values["token_sha256"] = values["token_sha256"].lower()
            if values["allow"] is not None:
                values["allow"] = tuple(values["allow"])
            clients.append(Client(**values))
    return tuple(clients)


def _cross_check(errs: Problems, policy: Policy) -> None:
    """Rules that involve several keys at once."""
    srv, lim = policy.server, policy.limits
    if srv.client_cert != "off" and srv.client_ca is None:
        errs.add(
            "server.client_ca",
            f"missing while client_cert is {srv.client_cert!r}",
            hint="point it at the CA that signs client certificates",
        )
    if lim.max_image_bytes > lim.max_body_bytes:
        errs.add(
            "limits.max_image_bytes",
            "larger than limits.max_body_bytes",
            hint="an image arrives inside the body; lower it",
        )
    for key in ("sha256", "mmproj_sha256"):
        value = getattr(policy.model, key)
        if value is not None and not _HEX64.fullmatch(value.lower()):
            errs.add(f"model.{key}", "must be 64 hex digits", hint="use `sha256sum FILE`")
    if not policy.clients:
        errs.add(
            "clients",
            "no client is defined, so nobody could use the appliance",
            hint="add one with `qwen-appliance token create NAME --policy FILE`",
        )
    for n, client in enumerate(policy.clients):
        _check_client(errs, srv, client, f"clients[{n}]")


def _check_client(errs: Problems, srv: ServerPolicy, client: Client, where: str) -> None:
    for net in client.allow or ():
        if not any(net.version == s.version and net.subnet_of(s) for s in srv.allow):  # type: ignore[arg-type]
            errs.add(
                f"{where}.allow",
                f"{net} lies outside [server] allow",
                hint="a client range must be inside the network gate's ranges",
            )
    if (client.cert_cn or client.cert_sha256) and srv.client_cert == "off":
        errs.add(
            f"{where}.cert_cn",
            'binds a certificate, but [server] client_cert is "off"',
            hint='set client_cert = "required" or "optional"',
        )
