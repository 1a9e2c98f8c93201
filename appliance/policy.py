"""Load policy.toml into typed, validated objects; anything doubtful is refused, never defaulted open."""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .settings import REQUIRED, SECTIONS, Setting, settings_in

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ServerPolicy:
    host: str
    port: int
    tls_cert: Path
    tls_key: Path
    client_ca: Path | None
    client_cert: str


@dataclass(frozen=True)
class ModelPolicy:
    path: Path
    mmproj: Path | None
    name: str | None
    n_gpu_layers: int
    n_ctx: int
    threads: int
    chat_template: str | None
    data_dir: Path | None
    image_min_tokens: int
    image_max_tokens: int
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


@dataclass(frozen=True)
class Client:
    name: str
    token_sha256: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class Policy:
    """A complete, validated policy; `digest` identifies exactly what was loaded."""

    file: Path
    digest: str
    server: ServerPolicy
    model: ModelPolicy
    limits: LimitsPolicy
    clients: tuple[Client, ...]


def load_policy(file: Path | str) -> Policy:
    """Read and validate a policy file; raises ConfigError naming the file, key and a hint."""
    path = Path(file)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read policy file ({exc.strerror})",
                          hint="run `qwen-appliance init DIR` to create one") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(path, None, f"not valid TOML: {exc}",
                          hint="check quoting and brackets near the position shown") from None
    return _build(path, hashlib.sha256(raw).hexdigest(), doc)


def _build(path: Path, digest: str, doc: dict[str, Any]) -> Policy:
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise ConfigError(path, unknown[0], "unknown section",
                          hint=f"known sections: {', '.join(SECTIONS)}")
    base = path.resolve().parent
    server = _section(path, base, doc, "server")
    model = _section(path, base, doc, "model")
    limits = _section(path, base, doc, "limits")
    clients = _clients(path, base, doc.get("clients", []))
    host, port = server.pop("listen")
    policy = Policy(
        file=path, digest=digest,
        server=ServerPolicy(host=host, port=port, **server),
        model=ModelPolicy(**model),
        limits=LimitsPolicy(**limits),
        clients=clients,
    )
    _cross_check(policy)
    return policy


def _section(path: Path, base: Path, doc: dict[str, Any], name: str) -> dict[str, Any]:
    table = doc.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(path, name, "must be a table", hint=f"write it as [{name}]")
    return _table(path, base, table, settings_in(name), name)


def _table(
    path: Path, base: Path, table: dict[str, Any], keys: tuple[Setting, ...], where: str
) -> dict[str, Any]:
    known = {s.key: s for s in keys}
    extra = sorted(set(table) - set(known))
    if extra:
        raise ConfigError(path, f"{where}.{extra[0]}", "unknown key",
                          hint=f"known keys: {', '.join(known)}; see docs/policy.md")
    out: dict[str, Any] = {}
    for key, setting in known.items():
        if key not in table:
            if setting.default is REQUIRED:
                raise ConfigError(path, f"{where}.{key}", "missing", hint=setting.help)
            out[key] = setting.default
            continue
        out[key] = _value(path, base, setting, table[key], f"{where}.{key}")
    return out


def _value(path: Path, base: Path, s: Setting, value: Any, key: str) -> Any:
    """Check one value against its declared kind; paths resolve against the policy's folder."""
    def bad(why: str) -> ConfigError:
        return ConfigError(path, key, why, hint=s.help)

    if s.kind in ("str", "path", "choice", "listen") and not isinstance(value, str):
        raise bad(f"must be a string, not {type(value).__name__}")
    if s.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"must be an integer, not {type(value).__name__}")
        if s.minimum is not None and value < s.minimum:
            raise bad(f"must be at least {s.minimum}")
        if s.maximum is not None and value > s.maximum:
            raise bad(f"must be at most {s.maximum}")
        return value
    if s.kind == "bool" and not isinstance(value, bool):
        raise bad("must be true or false")
    if s.kind == "choice" and value not in s.choices:
        raise bad(f"must be one of {', '.join(s.choices)}")
    if s.kind == "path":
        if not value or "\x00" in value:
            raise bad("must be a non-empty path")
        return (base / Path(value).expanduser()).resolve()
    if s.kind == "listen":
        return _listen(bad, value)
    if s.kind == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("must be a list of strings")
        wrong = [v for v in value if s.choices and v not in s.choices]
        if wrong:
            raise bad(f"unknown value {wrong[0]!r}; allowed: {', '.join(s.choices)}")
        return frozenset(value)
    return value


def _listen(bad: Any, value: str) -> tuple[str, int]:
    host, sep, port_s = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise bad("must be HOST:PORT, e.g. \"0.0.0.0:8443\"")
    return host, int(port_s)


def _clients(path: Path, base: Path, items: Any) -> tuple[Client, ...]:
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(path, "clients", "must be an array of tables",
                          hint="write each client as [[clients]]")
    clients: list[Client] = []
    seen_names: set[str] = set()
    seen_tokens: set[str] = set()
    for n, item in enumerate(items):
        where = f"clients[{n}]"
        values = _table(path, base, item, settings_in("clients"), where)
        name, digest = values["name"], values["token_sha256"].lower()
        if not _NAME.match(name):
            raise ConfigError(path, f"{where}.name", f"invalid client name {name!r}",
                              hint="letters, digits, '.', '_' and '-', at most 64")
        if not _HEX64.match(digest):
            raise ConfigError(path, f"{where}.token_sha256", "must be 64 hex digits",
                              hint="create it with `qwen-appliance token new NAME`")
        if name in seen_names or digest in seen_tokens:
            raise ConfigError(path, f"{where}", "duplicate client name or token",
                              hint="every client needs its own name and token")
        seen_names.add(name)
        seen_tokens.add(digest)
        clients.append(Client(name=name, token_sha256=digest, scopes=values["scopes"]))
    return tuple(clients)


def _cross_check(policy: Policy) -> None:
    """Rules that involve several keys at once."""
    f = policy.file
    if policy.server.client_cert != "off" and policy.server.client_ca is None:
        raise ConfigError(f, "server.client_ca", "missing while client_cert is "
                          f"{policy.server.client_cert!r}",
                          hint="point it at the CA that signs client certificates")
    if policy.limits.max_image_bytes > policy.limits.max_body_bytes:
        raise ConfigError(f, "limits.max_image_bytes", "larger than limits.max_body_bytes",
                          hint="an image arrives inside the body; lower it")
    for key in ("sha256", "mmproj_sha256"):
        value = getattr(policy.model, key)
        if value is not None and not _HEX64.match(value.lower()):
            raise ConfigError(f, f"model.{key}", "must be 64 hex digits",
                              hint="use `sha256sum FILE`")
    if not policy.clients:
        raise ConfigError(f, "clients", "no client is defined, so nobody could use the appliance",
                          hint="add a [[clients]] table; `qwen-appliance init` writes one")
