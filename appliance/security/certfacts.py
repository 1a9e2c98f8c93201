"""The one reader of certificate facts: subject and issuer CN, SANs and validity, for TLS, health and admins.

The peer identity (which certificate it is, by its signed content) is certid.py's; this says what it claims.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class CertFacts:
    """What a certificate says about its holder and its lifetime."""

    subject_cn: str | None
    issuer_cn: str | None
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def sans(self) -> tuple[str, ...]:
        """Every subject alternative name a client may connect to: DNS names, then IP addresses."""
        return self.dns_names + self.ip_addresses

    @property
    def labelled_sans(self) -> list[str]:
        """The SANs as `openssl x509 -text` writes them: DNS:name, IP:address."""
        return [f"DNS:{n}" for n in self.dns_names] + [f"IP:{a}" for a in self.ip_addresses]

    def left(self, now: dt.datetime | None = None) -> dt.timedelta:
        """Time until it expires (negative once expired)."""
        return self.not_after - (now or dt.datetime.now(dt.timezone.utc))

    def days_left(self, now: dt.datetime | None = None) -> int:
        return self.left(now).days


def common_name(name: x509.Name) -> str | None:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else None


def facts(cert: x509.Certificate) -> CertFacts:
    """Read the facts of a parsed certificate; a certificate without SANs has empty name tuples."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(str(v) for v in ext.get_values_for_type(x509.DNSName))
        ips = tuple(str(v) for v in ext.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    return CertFacts(
        common_name(cert.subject),
        common_name(cert.issuer),
        dns,
        ips,
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
    )


def pem_facts(path: Path) -> CertFacts:
    """The facts of the first certificate in a PEM file; raises OSError or ValueError."""
    return facts(x509.load_pem_x509_certificate(path.read_bytes()))


def days_left_in_file(path: Path | None) -> int | None:
    """Days until a PEM certificate expires (negative once expired); None when unset or unreadable."""
    if path is None:
        return None
    try:
        return pem_facts(path).days_left()
    except (OSError, ValueError):
        return None
