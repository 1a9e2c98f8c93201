"""A small local PKI: CA, server and client certificates, written with strict file modes (appliance.files)."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance import files

Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as objects, so callers can chain issuance."""

    cert: x509.Certificate
    key: Key


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qwen-appliance"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def validity(days: int, valid_from: dt.datetime | None = None) -> tuple[dt.datetime, dt.datetime]:
    """(not_before, not_after): `days` from `valid_from`, or from now with 5 minutes' grace for clock skew.

    An explicit window lets callers issue certificates that are already expired or not yet valid.
    """
    if days < 1:
        raise ValueError("a certificate must be valid for at least one day")
    if valid_from is None:
        now = dt.datetime.now(dt.timezone.utc)
        return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    start = valid_from if valid_from.tzinfo else valid_from.replace(tzinfo=dt.timezone.utc)
    return start, start + dt.timedelta(days=days)


def _builder(
    subject: str, issuer: x509.Name, key: Key, days: int, valid_from: dt.datetime | None = None
) -> x509.CertificateBuilder:
    not_before, not_after = validity(days, valid_from)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def new_ca(
    cn: str = "qwen-appliance local CA", days: int = 3650, *, valid_from: dt.datetime | None = None
) -> Issued:
    """A CA that only signs leaf certificates (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(cn, _name(cn), key, days, valid_from)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _leaf(
    ca: Issued,
    cn: str,
    days: int,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
    valid_from: dt.datetime | None,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(cn, ca.cert.subject, key, days, valid_from)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def server_sans(extra_hosts: list[str]) -> list[x509.GeneralName]:
    """localhost, 127.0.0.1, ::1, this host's name, plus anything the admin listed."""
    names: list[x509.GeneralName] = []
    for host in ["localhost", "127.0.0.1", "::1", socket.gethostname(), *extra_hosts]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        wildcard = ("0.0.0.0", "::")  # noqa: S104 - never bound: kept out of the SANs  # nosec B104
        if host and entry not in names and host not in wildcard:
            names.append(entry)
    return names


def new_server_cert(
    ca: Issued, hosts: list[str], days: int = 365, *, valid_from: dt.datetime | None = None
) -> Issued:
    """A TLS server certificate for this host; `valid_from` + `days` set an explicit validity window."""
    return _leaf(
        ca, "qwen-appliance server", days, ExtendedKeyUsageOID.SERVER_AUTH, server_sans(hosts), valid_from
    )


def new_client_cert(ca: Issued, cn: str, days: int = 825, *, valid_from: dt.datetime | None = None) -> Issued:
    """A TLS client certificate; `valid_from` + `days` set an explicit window (e.g. already expired)."""
    return _leaf(ca, cn, days, ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName(cn)], valid_from)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the DER of the certificate as issued (what `openssl x509 -fingerprint -sha256` prints),
    lower-case hex: the usual value of `cert_sha256` and `[server] revoked`; it matches every re-encoding."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def signed_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the signed TBSCertificate: what the trail's `cert_sha256` records, the same for every
    encoding of the certificate; also accepted in `cert_sha256` and `[server] revoked`."""
    return hashlib.sha256(cert.tbs_certificate_bytes).hexdigest()


def pkcs12_bytes(issued: Issued, ca_cert: x509.Certificate, name: str, password: str) -> bytes:
    """A browser-importable PKCS#12 protected with PBES2/AES-256 and a SHA-256 MAC, not legacy RC2/3DES."""
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(100_000)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password.encode("utf-8"))
    )
    return pkcs12.serialize_key_and_certificates(
        name.encode("utf-8"), issued.key, issued.cert, [ca_cert], encryption
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def save(issued: Issued, cert_path: Path, key_path: Path) -> None:
    """Write a certificate (0644) and its key (0600)."""
    files.write_secret(key_path, key_pem(issued.key))
    files.write_public(cert_path, cert_pem(issued.cert))


def load(cert_path: Path, key_path: Path) -> Issued:
    """Read back a pair written by `save`, e.g. to issue more client certificates later."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("expected an EC private key")
    return Issued(cert, key)
