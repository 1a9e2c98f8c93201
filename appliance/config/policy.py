"""Load policy.toml into typed, validated objects; anything doubtful is refused, never defaulted open.

Every problem in the file is collected, so `policy check` can list them all at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import ipaddress
import os
import re
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config.settings import REQUIRED, SECTIONS, Setting, settings_in
from appliance.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # use with fullmatch
_RATE = re.compile(r"^\s*(\d{1,9})\s*/\s*(second|minute|hour|day)\s*$")
_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_INVALID = object()


@dataclass(frozen=True)
class Rate:
    """A request budget: `count` requests per `seconds`."""

    count: int
    seconds: int

    def __str__(self) -> str:
        unit = {v: k for k, v in _UNIT_SECONDS.items()}[self.seconds]
        return f"{self.count}/{unit}"


@dataclass(frozen=True)
class ServerPolicy:
    host: str
    port: int
    tls_cert: Path
    tls_key: Path
    client_ca: Path | None
    client_cert: str
    allow: tuple[Network, ...]
    trusted_proxies: tuple[Network, ...]
    revoked: frozenset[str]
    max_connections: int
    max_connections_per_source: int
    handshake_timeout_s: int
    refusal_records_per_second: int


@dataclass(frozen=True)
class ModelPolicy:
    path: Path
    mmproj: Path | None
    name: str | None
    n_gpu_layers: int
    n_ctx: int
    threads: int
    parallel: int
    prompt_cache: bool
    chat_template: str | None
    data_dir: Path | None
    image_min_tokens: int
    image_max_tokens: int
    require_gpu: bool
    use_mlock: bool
    split_mode: str
    main_gpu: int
    tensor_split: tuple[float, ...]
    sha256: str | None
    mmproj_sha256: str | None


@dataclass(frozen=True)
class LimitsPolicy:
    max_body_bytes: int
    max_image_bytes: int
    max_image_pixels: int
    max_images: int
    max_tokens: int
    max_queue: int
    response_cache_entries: int
    response_cache_ttl_s: int


@dataclass(frozen=True)
class AuditPolicy:
    dir: Path
    hmac_key_file: Path
    fsync: str
    fsync_interval_ms: int
    rotate_bytes: int
    retention_days: int
    forward: str
    forward_socket: Path | None
    fail_closed: bool


@dataclass(frozen=True)
class HealthPolicy:
    max_gpu_temp_c: int
    min_audit_free_mb: int
    fail_on_ecc_uncorrected: bool
    gpu_poll_seconds: int


@dataclass(frozen=True)
class Client:
    """One identity: a token, optionally bound to addresses and a certificate."""

    name: str
    token_sha256: str
    scopes: frozenset[str]
    allow: tuple[Network, ...] | None = None
    cert_cn: str | None = None
    cert_sha256: str | None = None
    expires: dt.date | None = None
    rate: Rate | None = None
    token_budget: Rate | None = None
    max_concurrent: int | None = None
    cache: bool = False
    disabled: bool = False


@dataclass(frozen=True)
class Policy:
    """A complete, validated policy; `digest` identifies exactly what was loaded."""

    file: Path
    digest: str
    server: ServerPolicy
    model: ModelPolicy
    limits: LimitsPolicy
    audit: AuditPolicy
    health: HealthPolicy
    clients: tuple[Client, ...]


class PolicyInvalid(ConfigError):
    """Every problem found in one policy file; `errors` lists them, the message shows them all."""

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.file, first.key, first.message.split(": ", 2)[-1], hint=first.hint)
        self.errors = errors

    def __str__(self) -> str:
        if len(self.errors) == 1:
            return str(self.errors[0])
        return f"{len(self.errors)} problems:\n" + "\n".join(f"  {e}" for e in self.errors)


class _Collector:
    """Gathers ConfigErrors for one file instead of stopping at the first."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.errors: list[ConfigError] = []

    def add(self, key: str | None, message: str, hint: str | None = None) -> Any:
        self.errors.append(ConfigError(self.file, key, message, hint=hint))
        return _INVALID

    def raise_if_any(self) -> None:
        if self.errors:
            raise PolicyInvalid(self.errors)


def load_policy(file: Path | str) -> Policy:
    """Read and validate a policy file; raises PolicyInvalid naming the file, each key and a hint."""
    path = Path(file)
    try:
        raw = read_stable(path)
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read policy file ({exc.strerror})",
                          hint="run `qwen-appliance init DIR` to create one") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(path, None, f"not valid TOML: {exc}",
                          hint="check quoting and brackets near the position shown") from None
    return _build(path, hashlib.sha256(raw).hexdigest(), doc)


def file_signature(st: os.stat_result) -> tuple[int, ...]:
    """What changes whenever a file's bytes change: inode, size and modification times."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_stable(path: Path, tries: int = 5) -> bytes:
    """The bytes of a file nobody is writing: the same inode, size and mtime before, after and by name.

    A file written in place can parse when only its first part is there; such a read is retried, then refused.
    """
    for _ in range(tries):
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            raw = f.read()
            after = os.fstat(f.fileno())
        if file_signature(before) == file_signature(after) == file_signature(os.stat(path)) \
                and len(raw) == after.st_size:
            return raw
        time.sleep(0.05)
    raise ConfigError(path, None, "the file kept changing while it was read",
                      hint="write policy files atomically: a new file in the same folder, then `mv` it "
                           "over the policy (`qwen-appliance token` and `cert revoke` do this)")


def _build(path: Path, digest: str, doc: dict[str, Any]) -> Policy:
    errs = _Collector(path)
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
    policy = Policy(file=path, digest=digest, server=ServerPolicy(host=host, port=port, **server),
                    model=ModelPolicy(**model), limits=LimitsPolicy(**limits),
                    audit=AuditPolicy(**audit), health=HealthPolicy(**health), clients=clients)
    _cross_check(errs, policy)
    errs.raise_if_any()
    return policy


def _section(errs: _Collector, base: Path, doc: dict[str, Any], name: str) -> dict[str, Any]:
    table = doc.get(name, {})
    if not isinstance(table, dict):
        errs.add(name, "must be a table", hint=f"write it as [{name}]")
        table = {}
    return _table(errs, base, table, settings_in(name), name)


def _table(errs: _Collector, base: Path, table: dict[str, Any], keys: tuple[Setting, ...],
           where: str) -> dict[str, Any]:
    known = {s.key: s for s in keys}
    for key in sorted(set(table) - set(known)):
        errs.add(f"{where}.{key}", "unknown key",
                 hint=f"known keys: {', '.join(known)}; see docs/policy.md")
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


def _value(errs: _Collector, base: Path, s: Setting, value: Any, key: str) -> Any:
    """Check one value against its declared kind; paths resolve against the policy's folder."""
    def bad(why: str) -> Any:
        return errs.add(key, why, hint=s.help)

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
    if not isinstance(value, str) or not sep or not host or not port_s.isdigit() \
            or not 0 < int(port_s) < 65536:
        return bad("must be HOST:PORT, e.g. \"0.0.0.0:8443\"")
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
        return bad("must be a list of address ranges like \"192.168.10.0/24\"")
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
        return bad("must look like \"60/minute\" (units: second, minute, hour, day)")
    return Rate(int(m.group(1)), _UNIT_SECONDS[m.group(2)])


def _floats(_s: Setting, value: Any, bad: Callable[[str], Any], _base: Path) -> Any:
    if not isinstance(value, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in value):
        return bad("must be a list of non-negative numbers, e.g. [3, 1]")
    return [float(v) for v in value]


_KINDS: dict[str, Callable[[Setting, Any, Callable[[str], Any], Path], Any]] = {
    "int": _int, "str": _str, "choice": _str, "bool": _bool, "path": _path, "listen": _listen,
    "list[str]": _strlist, "cidrs": _cidrs, "hex": _hex, "hexlist": _hexlist, "date": _date,
    "rate": _rate, "floats": _floats,
}


def _clients(errs: _Collector, base: Path, items: Any) -> tuple[Client, ...]:
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        errs.add("clients", "must be an array of tables", hint="write each client as [[clients]]")
        return ()
    clients: list[Client] = []
    seen: set[str] = set()
    for n, item in enumerate(items):
        where = f"clients[{n}]"
        values = _table(errs, base, item, settings_in("clients"), where)
        if isinstance(values["name"], str) and not CLIENT_NAME.fullmatch(values["name"]):
            errs.add(f"{where}.name", f"invalid client name {values['name']!r}",
                     hint="letters, digits, '.', '_' and '-', at most 64")
        if values["token_sha256"] is not _INVALID and isinstance(values["token_sha256"], str) \
                and not _HEX64.fullmatch(values["token_sha256"].lower()):
            errs.add(f"{where}.token_sha256", "must be 64 hex digits",
                     hint="create clients with `qwen-appliance token create NAME`")
        if {str(values["name"]), str(values["token_sha256"]).lower()} & seen:
            errs.add(where, "duplicate client name or token",
                     hint="every client needs its own name and token")
        seen |= {str(values["name"]), str(values["token_sha256"]).lower()}
        if _INVALID not in values.values() and REQUIRED not in values.values():
            values["token_sha256"] = values["token_sha256"].lower()
            if values["allow"] is not None:
                values["allow"] = tuple(values["allow"])
            clients.append(Client(**values))
    return tuple(clients)


def _cross_check(errs: _Collector, policy: Policy) -> None:
    """Rules that involve several keys at once."""
    srv, lim = policy.server, policy.limits
    if srv.client_cert != "off" and srv.client_ca is None:
        errs.add("server.client_ca", f"missing while client_cert is {srv.client_cert!r}",
                 hint="point it at the CA that signs client certificates")
    if lim.max_image_bytes > lim.max_body_bytes:
        errs.add("limits.max_image_bytes", "larger than limits.max_body_bytes",
                 hint="an image arrives inside the body; lower it")
    for key in ("sha256", "mmproj_sha256"):
        value = getattr(policy.model, key)
        if value is not None and not _HEX64.fullmatch(value.lower()):
            errs.add(f"model.{key}", "must be 64 hex digits", hint="use `sha256sum FILE`")
    if not policy.clients:
        errs.add("clients", "no client is defined, so nobody could use the appliance",
                 hint="add one with `qwen-appliance token create NAME --policy FILE`")
    for n, client in enumerate(policy.clients):
        _check_client(errs, srv, client, f"clients[{n}]")


def _check_client(errs: _Collector, srv: ServerPolicy, client: Client, where: str) -> None:
    for net in client.allow or ():
        if not any(net.version == s.version and net.subnet_of(s) for s in srv.allow):  # type: ignore[arg-type]
            errs.add(f"{where}.allow", f"{net} lies outside [server] allow",
                     hint="a client range must be inside the network gate's ranges")
    if (client.cert_cn or client.cert_sha256) and srv.client_cert == "off":
        errs.add(f"{where}.cert_cn", "binds a certificate, but [server] client_cert is \"off\"",
                 hint="set client_cert = \"required\" or \"optional\"")


SERVICE_USER = "qwen-appliance"  # the packaged daemon's account (systemd/qwen-appliance.sysusers)
_MAX_LINKS = 40


def _local_users() -> dict[int, str]:
    """uid → name from /etc/passwd itself: NSS (nscd, LDAP) would open sockets from the daemon."""
    users: dict[int, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/passwd").read_text(errors="replace").splitlines():
            fields = line.split(":")
            if len(fields) > 2 and fields[2].isdigit():
                users.setdefault(int(fields[2]), fields[0])
    return users


def trusted_owners() -> frozenset[int]:
    """Who may own a trusted file or folder: root, this process's user, and the service account."""
    uids = {0, os.geteuid()}
    uids.update(uid for uid, name in _local_users().items() if name == SERVICE_USER)
    return frozenset(uids)


def _owner_name(uid: int) -> str:
    name = _local_users().get(uid)
    return f"{uid} ({name})" if name else str(uid)


def _walk(path: Path, links: list[int]) -> tuple[Path, list[tuple[Path, os.stat_result]]]:
    """Resolve `path` by hand: its real path and (entry, lstat) of every folder and link passed through."""
    cur, seen = Path("/"), [(Path("/"), os.lstat("/"))]
    for name in (path if path.is_absolute() else Path.cwd() / path).parts[1:]:
        if name == "..":
            cur = cur.parent
            continue
        entry = cur / name
        st = os.lstat(entry)
        seen.append((entry, st))
        if not stat.S_ISLNK(st.st_mode):
            cur = entry
            continue
        links[0] += 1
        if links[0] > _MAX_LINKS:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", str(path))
        target = Path(os.readlink(entry))
        cur, more = _walk(target if target.is_absolute() else cur / target, links)
        seen += more[1:]
    return cur, seen


def _check_chain(errs: _Collector, path: Path, key: str | None) -> os.stat_result | None:
    """Every folder and link that leads to `path` must be owned by a trusted user and not writable by others.

    A sticky folder others can write (/tmp) is fine above the file's own folder: there nobody can rename
    entries they do not own, and every entry on the way is checked to be ours or root's.
    """
    owners = trusted_owners()
    try:
        real, seen = _walk(path, [0])
    except OSError as exc:
        errs.add(key, f"{path}: cannot read ({exc.strerror})", hint="check the path")
        return None
    for entry, st in dict(seen).items():  # each once, in order
        if st.st_uid not in owners:
            what = "symbolic link" if stat.S_ISLNK(st.st_mode) else "folder" if entry != real else "file"
            errs.add(key, f"{entry}: the {what} on the way to {path} is owned by {_owner_name(st.st_uid)}, "
                          "not root or the service user", hint=f"chown root {entry} (or move {path})")
        elif stat.S_ISDIR(st.st_mode) and entry != real and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) \
                and (not st.st_mode & stat.S_ISVTX or entry == real.parent):
            errs.add(key, f"{entry}: folder writable by group or others (mode {stat.S_IMODE(st.st_mode):o}), "
                          f"so they could replace {path}", hint=f"chmod go-w {entry}, or move {path} "
                          "to a folder only root and the service user can write")
    return seen[-1][1]


def check_file_modes(policy: Policy) -> None:
    """Refuse trusted files (policy, certificates, keys) others could change, replace or read.

    Checked: the owner of each file and of each folder and link on its way from /, and the modes.
    """
    errs = _Collector(policy.file)
    srv = policy.server
    for path, key in ((policy.file, None), (srv.tls_cert, "server.tls_cert"),
                      (srv.client_ca, "server.client_ca"), (srv.tls_key, "server.tls_key"),
                      (policy.audit.hmac_key_file, "audit.hmac_key_file")):
        if path is None:
            continue
        st = _check_chain(errs, path, key)
        if st is None:
            continue
        if not stat.S_ISREG(st.st_mode):
            errs.add(key, f"{path}: not a regular file", hint="point it at a file")
            continue
        mode = st.st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            errs.add(key, f"{path} is writable by group or others (mode {stat.S_IMODE(mode):o})",
                     hint=f"chmod go-w {path}")
        if key in ("server.tls_key", "audit.hmac_key_file") and mode & (stat.S_IRWXG | stat.S_IRWXO):
            errs.add(key, f"{path}: secret key is accessible by group or others "
                     f"(mode {stat.S_IMODE(mode):o})", hint=f"chmod 600 {path}")
    errs.raise_if_any()
