"""`qwen-appliance cert list`: reading certificate files and judging their expiry, apart from the commands
that issue and revoke in cert.py (which reads the certificate it revokes with `read_certs`)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from appliance.errors import SetupError
from appliance.security import certfacts, pki

WARN_DAYS = 30


@dataclass(frozen=True)
class CertInfo:
    """What an admin checks about one certificate: who, for where, by whom, until when."""

    path: Path
    subject: str
    sans: list[str]
    issuer: str
    not_after: dt.datetime
    days_left: int
    sha256: str  # of the DER as issued: for `[server] revoked` and `token create --cert-sha256`
    status: str  # OK | WARNING | EXPIRED | NOT YET VALID
    tbs_sha256: str = ""  # of the signed part: what the trail's cert_sha256 records (also accepted)

    def as_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "subject": self.subject,
            "sans": self.sans,
            "issuer": self.issuer,
            "not_after": self.not_after.isoformat(),
            "days_left": self.days_left,
            "sha256": self.sha256,
            "tbs_sha256": self.tbs_sha256,
            "status": self.status,
        }


def cn(name: x509.Name) -> str:
    return certfacts.common_name(name) or name.rfc4514_string()


def describe(path: Path, cert: x509.Certificate, now: dt.datetime | None = None) -> CertInfo:
    """Expiry status: EXPIRED when past, WARNING when fewer than 30 days remain."""
    now = now or dt.datetime.now(dt.timezone.utc)
    claims = certfacts.facts(cert)
    left = claims.left(now)
    status = (
        "EXPIRED"
        if left.total_seconds() <= 0
        else "NOT YET VALID"
        if claims.not_before > now
        else "WARNING"
        if left.days < WARN_DAYS
        else "OK"
    )
    return CertInfo(
        path,
        cn(cert.subject),
        claims.labelled_sans,
        cn(cert.issuer),
        claims.not_after,
        left.days,
        pki.fingerprint(cert),
        status,
        pki.signed_fingerprint(cert),
    )


def _files(paths: list[Path]) -> list[tuple[Path, bool]]:
    """(file, named explicitly): directories are searched for *.crt and *.pem, hidden files skipped."""
    found: list[tuple[Path, bool]] = []
    for path in paths:
        if path.is_dir():
            found += [
                (f, False)
                for f in sorted(path.rglob("*"))
                if f.suffix in (".crt", ".pem") and f.is_file() and not f.name.startswith(".")
            ]
        elif path.is_file():
            found.append((path, True))
        else:
            raise SetupError(f"{path}: no such file or directory", hint="pass certificate files or folders")
    return found


def read_certs(path: Path, explicit: bool) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle (or one DER file); a key-only .pem in a folder is skipped."""
    try:
        data = path.read_bytes()
        if b"-----BEGIN" not in data:
            return [x509.load_der_x509_certificate(data)]
        return x509.load_pem_x509_certificates(data)
    except OSError as exc:
        raise SetupError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError:
        if explicit:
            raise SetupError(
                f"{path}: no certificate in this file", hint="pass PEM or DER certificate files"
            ) from None
        return []


def _print(info: CertInfo) -> None:
    mark = {
        "OK": "",
        "WARNING": f"  WARNING: expires in {info.days_left} days",
        "EXPIRED": "  EXPIRED",
        "NOT YET VALID": "  NOT YET VALID",
    }[info.status]
    print(
        f"{info.path}{mark}\n  subject    {info.subject}\n  SANs       {', '.join(info.sans) or '-'}\n"
        f"  issuer     {info.issuer}\n  not after  {info.not_after.date()} ({_left(info)})\n"
        f"  sha256     {info.sha256}\n  tbs sha256 {info.tbs_sha256} (the audit trail's cert_sha256)"
    )


def _left(info: CertInfo) -> str:
    if info.status == "EXPIRED":
        return f"expired {-info.days_left} days ago" if info.days_left < 0 else "expired today"
    return f"{info.days_left} days left"


def list_command(args: argparse.Namespace) -> int:
    """Exit 1 when any certificate is expired, not yet valid or within 30 days of expiry."""
    infos = [
        describe(path, cert) for path, explicit in _files(args.paths) for cert in read_certs(path, explicit)
    ]
    if not infos:
        raise SetupError(
            f"no certificates found in {', '.join(map(str, args.paths))}",
            hint="certificates are searched as *.crt and *.pem",
        )
    bad = [i for i in infos if i.status != "OK"]
    if args.json:
        print(json.dumps([i.as_json() for i in infos]))
    else:
        for info in infos:
            _print(info)
        print(
            f"{len(infos)} certificates, {len(bad)} needing action"
            if bad
            else f"{len(infos)} certificates, all valid for {WARN_DAYS} days or more"
        )
    return 1 if bad else 0
