"""`qwen-appliance cert ...`: the local CA, server and client certificates, and their expiry.

Keys are written 0600 and never overwritten without --force; `cert list` exits 1 when a certificate is expired
or expires within 30 days, so cron and monitoring can call it.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance import files
from appliance.admin import certlist
from appliance.config import edit
from appliance.config.load import CLIENT_NAME
from appliance.errors import SetupError
from appliance.security import certfacts, pki

P12_PASSWORD_ENV = "QWEN_APPLIANCE_P12_PASSWORD"  # noqa: S105 - the variable's name, not a secret
_HOST = re.compile(
    r"^(?=.{1,253}$)(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def register(sub: Any) -> None:
    """Add `cert ca|server|client|list` to the CLI (each sets `handler`)."""
    cert = sub.add_parser("cert", help="the local CA, server and client certificates")
    csub = cert.add_subparsers(dest="cert_command", required=True)

    p = csub.add_parser("ca", help="create DIR/ca.crt and DIR/ca.key")
    p.add_argument("dir", type=Path)
    p.add_argument("--cn", default="qwen-appliance local CA", help="subject CN (default %(default)s)")
    p.add_argument("--days", type=int, default=3650, help="validity (default %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p.set_defaults(handler=_ca)

    p = csub.add_parser("server", help="issue OUT/server.crt and OUT/server.key")
    _issuer_args(p, days=365)  # Mozilla TLS profiles refuse server certificates over 365 days
    p.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="extra SAN besides localhost, 127.0.0.1, ::1 and this host's name (repeatable)",
    )
    p.set_defaults(handler=_server)

    p = csub.add_parser("client", help="issue OUT/NAME.crt, OUT/NAME.key and a copy of ca.crt")
    p.add_argument("name", help="the certificate's CN and file name")
    _issuer_args(p, days=825)
    p.add_argument(
        "--p12",
        action="store_true",
        help=f"also OUT/NAME.p12 for browsers (password printed once, or ${P12_PASSWORD_ENV})",
    )
    p.set_defaults(handler=_client)

    p = csub.add_parser(
        "revoke",
        help="refuse a client certificate: add it to [server] revoked, confirmed "
        "in force by a running daemon",
    )
    p.add_argument("cert", type=Path, nargs="?", help="the certificate file (PEM or DER)")
    p.add_argument("--sha256", metavar="HEX", help="its fingerprint instead, as `cert list` prints it")
    p.add_argument("--policy", type=Path, required=True)
    p.set_defaults(handler=_revoke)

    p = csub.add_parser("list", help="show certificates and their expiry; exit 1 if any needs action")
    p.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="certificate files, or directories searched for *.crt and *.pem",
    )
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(handler=certlist.list_command)


def _issuer_args(p: argparse.ArgumentParser, days: int) -> None:
    p.add_argument("--ca-dir", type=Path, required=True, help="folder holding ca.crt and ca.key")
    p.add_argument("--out", type=Path, required=True, help="folder to write into")
    p.add_argument("--days", type=int, default=days, help="validity (default %(default)s)")
    p.add_argument("--force", action="store_true", help="replace existing files")


# --- shared checks ----------------------------------------------------------------------------------


def _check_days(days: int) -> None:
    if not 1 <= days <= 36500:
        raise SetupError(
            f"--days {days}: must be between 1 and 36500",
            hint="825 days is the usual limit for leaf certificates",
        )


def _no_clobber(paths: list[Path], force: bool) -> None:
    """Replacing a key silently would lock out whoever holds the old certificate."""
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise SetupError(
            f"{existing[0]} already exists",
            hint="pass --force to replace it; certificates issued from the old key stop working",
        )


def _mkdir(directory: Path) -> None:
    """A new folder that will hold private keys is created owner-only."""
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)


def _load_ca(ca_dir: Path) -> pki.Issued:
    """The CA pair, checked to be a CA and to match, so nothing is issued that would not verify."""
    crt, key = ca_dir / "ca.crt", ca_dir / "ca.key"
    try:
        ca = pki.load(crt, key)
    except FileNotFoundError as exc:
        raise SetupError(
            f"{exc.filename}: not found",
            hint="create a CA with `qwen-appliance cert ca DIR`, or point --ca-dir at it",
        ) from None
    except (OSError, ValueError, TypeError) as exc:
        raise SetupError(
            f"{ca_dir}: cannot load ca.crt/ca.key ({exc})",
            hint="both must be unencrypted PEM as `qwen-appliance cert ca` writes them",
        ) from None
    if not _is_ca(ca.cert) or not _key_matches(ca):
        raise SetupError(
            f"{crt}: not a CA certificate matching {key}",
            hint="use the pair that `qwen-appliance cert ca` or `init` wrote",
        )
    return ca


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _key_matches(ca: pki.Issued) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return ca.cert.public_key().public_bytes(*fmt) == ca.key.public_key().public_bytes(*fmt)


def _warn_outlives(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """A certificate stops working when its CA expires, whatever its own date says."""
    if cert.not_valid_after_utc > ca_cert.not_valid_after_utc:
        print(
            f"WARNING: the CA expires first, on {_not_after(ca_cert)}; this certificate stops working then.",
            file=sys.stderr,
        )


def _not_after(cert: x509.Certificate) -> str:
    return cert.not_valid_after_utc.date().isoformat()


# --- cert ca / server / client ----------------------------------------------------------------------


def _ca(args: argparse.Namespace) -> int:
    """A new CA; replacing one invalidates every certificate it signed, hence --force."""
    _check_days(args.days)
    if not 1 <= len(args.cn) <= 64 or not args.cn.isprintable():
        raise SetupError(f"--cn {args.cn!r}: must be 1 to 64 printable characters")
    crt, key = args.dir / "ca.crt", args.dir / "ca.key"
    _no_clobber([crt, key], args.force)
    _mkdir(args.dir)
    ca = pki.new_ca(args.cn, days=args.days)
    pki.save(ca, crt, key)
    print(
        f"Created CA {args.cn!r}, valid until {_not_after(ca.cert)}\n  certificate  {crt}\n"
        f"  key          {key} (0600)\n  sha256       {pki.fingerprint(ca.cert)}\n"
        "Keep ca.key offline or root-only: whoever holds it can mint client certificates."
    )
    return 0


def _check_hosts(hosts: list[str]) -> None:
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _HOST.fullmatch(host):
                raise SetupError(
                    f"--host {host!r}: not a host name or IP address",
                    hint="e.g. qwen.branch.example, 10.20.30.5 or fd00::5",
                ) from None


def _server(args: argparse.Namespace) -> int:
    """The listener's certificate, valid for every name clients may use to reach this box."""
    _check_days(args.days)
    _check_hosts(args.host)
    crt, key = args.out / "server.crt", args.out / "server.key"
    _no_clobber([crt, key], args.force)
    ca = _load_ca(args.ca_dir)
    issued = pki.new_server_cert(ca, args.host, days=args.days)
    _mkdir(args.out)
    pki.save(issued, crt, key)
    _warn_outlives(issued.cert, ca.cert)
    sans = ", ".join(certfacts.facts(issued.cert).labelled_sans)
    print(
        f"Issued server certificate, valid until {_not_after(issued.cert)}\n  certificate  {crt}\n"
        f"  key          {key} (0600)\n  SANs         {sans}\n"
        f"  sha256       {pki.fingerprint(issued.cert)}\n"
        "Point [server] tls_cert and tls_key at them; a running daemon loads them on reload "
        "(`systemctl reload qwen-appliance`)."
    )
    return 0


def _client(args: argparse.Namespace) -> int:
    """A client bundle: certificate, key and CA, optionally as one PKCS#12 for browsers."""
    _check_days(args.days)
    if not CLIENT_NAME.fullmatch(args.name):
        raise SetupError(
            f"invalid client name {args.name!r}",
            hint="letters, digits, '.', '_' and '-', at most 64; it is also the file name",
        )
    out: Path = args.out
    crt, key, p12 = out / f"{args.name}.crt", out / f"{args.name}.key", out / f"{args.name}.p12"
    _no_clobber([crt, key, p12] if args.p12 else [crt, key], args.force)
    ca = _load_ca(args.ca_dir)
    issued = pki.new_client_cert(ca, args.name, days=args.days)
    _mkdir(out)
    pki.save(issued, crt, key)
    files.write_public(out / "ca.crt", (args.ca_dir / "ca.crt").read_bytes())
    fp = pki.fingerprint(issued.cert)
    _warn_outlives(issued.cert, ca.cert)
    print(
        f"Issued client certificate {args.name!r}, valid until {_not_after(issued.cert)}\n"
        f"  certificate  {crt}\n  key          {key} (0600)\n  CA           {out / 'ca.crt'}\n"
        f"  sha256       {fp}\n  tbs sha256   {pki.signed_fingerprint(issued.cert)} "
        "(the audit trail's cert_sha256)"
    )
    if args.p12:
        _write_p12(p12, issued, ca.cert, args.name)
    print(f"Bind a token to it: qwen-appliance token create {args.name} --cert-sha256 {fp} --policy FILE")
    return 0


def _write_p12(path: Path, issued: pki.Issued, ca_cert: x509.Certificate, name: str) -> None:
    """PKCS#12 for browsers; a generated password is printed once, an env-supplied one never."""
    from_env = os.environ.get(P12_PASSWORD_ENV, "")
    password = from_env or secrets.token_urlsafe(12)
    files.write_secret(path, pki.pkcs12_bytes(issued, ca_cert, name, password))
    shown = f"from ${P12_PASSWORD_ENV}" if from_env else password
    print(f"  PKCS#12      {path} (0600, AES-256)\n  password     {shown}")
    if not from_env:
        print("The password is shown only this once; send it separately from the .p12 file.")


# --- cert revoke ------------------------------------------------------------------------------------


def _revoked_fingerprint(args: argparse.Namespace) -> tuple[str, str]:
    """(fingerprint, what) from exactly one of CERT or --sha256; a CA is refused (rotate client_ca)."""
    if (args.cert is None) == (args.sha256 is None):
        raise SetupError(
            "pass the certificate file or --sha256 HEX (one of them)",
            hint="`qwen-appliance cert list DIR` prints each certificate's sha256",
        )
    if args.sha256 is not None:
        digest = args.sha256.strip().lower().replace(":", "")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise SetupError(f"--sha256 {args.sha256!r}: must be 64 hex digits (a SHA-256)")
        return digest, f"sha256 {digest}"
    certs = certlist.read_certs(args.cert, explicit=True)
    if len(certs) != 1:
        raise SetupError(f"{args.cert}: holds {len(certs)} certificates; pass a file with just one")
    cert = certs[0]
    if _is_ca(cert):
        raise SetupError(
            f"{args.cert}: is a CA certificate; revoking it here has no effect",
            hint="to stop trusting a CA, point [server] client_ca at a new one and reload",
        )
    return pki.fingerprint(cert), f"{certlist.cn(cert.subject)!r} (sha256 {pki.fingerprint(cert)})"


def _revoke(args: argparse.Namespace) -> int:
    """Written and confirmed the way `token revoke` is: atomically, then SIGHUP and wait for the daemon."""
    fingerprint, what = _revoked_fingerprint(args)
    added = edit.add_revoked(args.policy, fingerprint)
    print(
        f"{'Revoked' if added else 'Already revoked:'} certificate {what} in {args.policy} "
        "([server] revoked).",
        flush=True,
    )
    print(edit.confirm_in_force(args.policy))
    print(
        "A token bound to nothing else still works with another valid certificate: "
        "`qwen-appliance token revoke NAME` as well if the key may be copied."
    )
    return 0
