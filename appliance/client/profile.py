"""The staff client's profile: one file (0600) with the server URL, CA, client certificate and bearer token.

`client setup` writes it after checking that every file loads; `ask` reads it and builds its TLS context.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import secrets
import ssl
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomlkit
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from appliance import files
from appliance.errors import SetupError
from appliance.files import tomllib

P12_PASSWORD_ENV = "QWEN_APPLIANCE_P12_PASSWORD"  # noqa: S105 - the variable's name, not a secret
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Profile:
    """One server and the identity to use with it."""

    name: str
    server: str
    token: str
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    p12: Path | None = None
    p12_password: str | None = None

    def as_toml(self) -> dict[str, str]:
        values = {
            "server": self.server,
            "ca": self.ca,
            "cert": self.cert,
            "key": self.key,
            "p12": self.p12,
            "p12_password": self.p12_password,
            "token": self.token,
        }
        return {k: str(v) for k, v in values.items() if v is not None}


def config_path(override: Path | None = None) -> Path:
    """--config, else $XDG_CONFIG_HOME/qwen-appliance/client.toml, else ~/.config/..."""
    if override is not None:
        return override
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "qwen-appliance" / "client.toml"


def _check_private(path: Path) -> None:
    """The file holds a token: refuse it when anyone but the owner can read or write it."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SetupError(
            f"{path}: readable by others (mode {mode:04o}); it holds your token", hint=f"chmod 600 {path}"
        )


def _read_doc(path: Path) -> tomlkit.TOMLDocument:
    try:
        return tomlkit.parse(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomlkit.exceptions.ParseError) as exc:
        raise SetupError(
            f"{path}: not a valid TOML file ({exc})",
            hint="fix it, or delete it and run `qwen-appliance client setup` again",
        ) from None


def load_profile(path: Path, name: str) -> Profile:
    """Read one profile, refusing a file that others can read."""
    if not path.is_file():
        raise SetupError(
            f"{path}: no client profile yet",
            hint="create it with `qwen-appliance client setup --server URL --ca CA --cert CRT --key KEY`",
        )
    _check_private(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("profiles", {}).get(name)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SetupError(f"{path}: not a valid TOML file ({exc})") from None
    if not isinstance(table, dict):
        raise SetupError(
            f"{path}: no profile named {name!r}",
            hint=f"run `qwen-appliance client setup --profile {name} ...`, or pick another with --profile",
        )
    return _profile(path, name, table)


def _profile(path: Path, name: str, table: dict[str, Any]) -> Profile:
    def text(key: str, required: bool = False) -> str | None:
        value = table.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise SetupError(
                f"{path}: [profiles.{name}] {key}: must be a non-empty string",
                hint="run `qwen-appliance client setup` again",
            )
        return value

    def file(key: str) -> Path | None:
        value = text(key)
        return Path(value) if value else None

    return Profile(
        name=name,
        server=str(text("server", True)),
        token=str(text("token", True)),
        ca=file("ca"),
        cert=file("cert"),
        key=file("key"),
        p12=file("p12"),
        p12_password=text("p12_password"),
    )


def save_profile(path: Path, profile: Profile) -> None:
    """Add or replace one profile, keeping the others and any comments; the file is written 0600."""
    doc = tomlkit.document()
    if path.exists():
        _check_private(path)
        doc = _read_doc(path)
    profiles = doc.setdefault("profiles", tomlkit.table(is_super_table=True))
    table = tomlkit.table()
    for key, value in profile.as_toml().items():
        table[key] = value
    profiles[profile.name] = table
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    files.write_secret(path, tomlkit.dumps(doc).encode("utf-8"))


def check_url(server: str) -> None:
    """The appliance is reached over HTTPS only, at a host name or address."""
    parts = urlsplit(server)
    if parts.scheme != "https" or not parts.hostname:
        raise SetupError(
            f"server URL {server!r}: must be https://HOST:PORT", hint="e.g. https://192.168.10.5:8443"
        )


# --- TLS -----------------------------------------------------------------------------------------


def ssl_context(profile: Profile) -> ssl.SSLContext:
    """Trust the profile's CA and present its client certificate (PEM pair or PKCS#12)."""
    try:
        ctx = ssl.create_default_context(cafile=str(profile.ca) if profile.ca else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if profile.p12 is not None:
            _load_p12(ctx, profile.p12, profile.p12_password or "")
        elif profile.cert is not None:
            ctx.load_cert_chain(str(profile.cert), str(profile.key) if profile.key else None)
    except FileNotFoundError as exc:
        raise SetupError(
            f"{exc.filename}: not found",
            hint="the profile names a file that moved; run `qwen-appliance client setup` again",
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise SetupError(
            f"profile {profile.name!r}: cannot load its CA or client certificate ({exc})",
            hint="pass the files the admin issued: ca.crt, NAME.crt and NAME.key",
        ) from None
    return ctx


def _load_p12(ctx: ssl.SSLContext, path: Path, password: str) -> None:
    """ssl only loads PEM files: the key goes through a private temp folder, encrypted with a one-off key."""
    try:
        key, cert, chain = pkcs12.load_key_and_certificates(path.read_bytes(), password.encode())
    except ValueError:
        raise SetupError(
            f"{path}: cannot open this PKCS#12 file (wrong password, or not PKCS#12)",
            hint=f"check the password the admin sent (or ${P12_PASSWORD_ENV})",
        ) from None
    if key is None or cert is None:
        raise SetupError(f"{path}: this PKCS#12 file holds no certificate and key")
    one_off = secrets.token_bytes(32)
    pem = serialization.Encoding.PEM
    with tempfile.TemporaryDirectory(prefix="qwa-") as folder:
        crt, key_file = Path(folder) / "client.crt", Path(folder) / "client.key"
        crt.write_bytes(cert.public_bytes(pem) + b"".join(c.public_bytes(pem) for c in chain))
        files.write_secret(
            key_file,
            key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(one_off)
            ),
        )
        ctx.load_cert_chain(str(crt), str(key_file), password=one_off)


# --- client setup --------------------------------------------------------------------------------


def _secret_input(prompt: str) -> str:
    """A secret from the terminal without echo, or one line of piped stdin; never from argv."""
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    return sys.stdin.readline().strip()


def _readable(path: Path | None) -> Path | None:
    if path is None:
        return None
    if not path.is_file():
        raise SetupError(f"{path}: not found", hint="pass the files the admin issued")
    return path.resolve()


def _check_ca(ca: Path) -> None:
    try:
        x509.load_pem_x509_certificates(ca.read_bytes())
    except ValueError:
        raise SetupError(
            f"{ca}: no PEM certificate in this file", hint="pass ca.crt from the bundle the admin issued"
        ) from None


def setup(args: argparse.Namespace) -> int:
    """Create or replace a profile; the token comes from stdin or a prompt, never from argv."""
    if not _PROFILE_NAME.fullmatch(args.profile):
        raise SetupError(f"profile name {args.profile!r}: letters, digits, '.', '_' and '-' only")
    if bool(args.p12) == bool(args.cert or args.key) or (args.cert is None) != (args.key is None):
        raise SetupError("pass either --cert and --key, or --p12", hint="the files the admin issued")
    server = args.server.rstrip("/")
    check_url(server)
    ca = _readable(args.ca)
    assert ca is not None
    _check_ca(ca)
    token = _secret_input("Token: ")
    if not token or not token.isprintable() or " " in token:
        raise SetupError("no token given", hint="paste the token the admin issued (or pipe it on stdin)")
    password = None
    if args.p12:
        password = os.environ.get(P12_PASSWORD_ENV) or _secret_input("PKCS#12 password: ")
    profile = Profile(
        name=args.profile,
        server=server,
        token=token,
        ca=ca,
        cert=_readable(args.cert),
        key=_readable(args.key),
        p12=_readable(args.p12),
        p12_password=password,
    )
    ssl_context(profile)  # the files load and match, or the profile is not written
    path = config_path(args.config)
    save_profile(path, profile)
    print(
        f"Saved profile {profile.name!r} for {server} in {path} (0600).\n"
        f'Try it: qwen-appliance ask{_profile_flag(profile.name)} "Hello"'
    )
    return 0


def _profile_flag(name: str) -> str:
    return "" if name == "default" else f" --profile {name}"
