"""The TLS context (Mozilla "intermediate") and what a verified client certificate says about its holder."""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from .errors import TLSSetupError
from .policy import ServerPolicy

# Mozilla intermediate (v5.7): forward-secret AEAD suites only for TLS 1.2; TLS 1.3 suites are fixed.
MOZILLA_INTERMEDIATE_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])

_VERIFY = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "off": ssl.CERT_NONE}


def server_context(server: ServerPolicy) -> ssl.SSLContext:
    """Build the listener's context; every failure names the file and how to fix it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(MOZILLA_INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_SINGLE_ECDH_USE
    _set_groups(ctx)
    try:
        ctx.load_cert_chain(str(server.tls_cert), str(server.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(f"{server.tls_cert}: cannot load certificate/key ({exc})",
                            hint="check [server] tls_cert and tls_key match and are PEM") from None
    ctx.verify_mode = _VERIFY[server.client_cert]
    if server.client_cert != "off":
        assert server.client_ca is not None  # enforced by policy validation
        try:
            ctx.load_verify_locations(cafile=str(server.client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise TLSSetupError(f"{server.client_ca}: cannot load client CA ({exc})",
                                hint="check [server] client_ca points at a PEM CA file") from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _set_groups(ctx: ssl.SSLContext) -> None:
    """Limit key exchange to X25519, P-256 and P-384 where Python exposes it (3.13+)."""
    setter = getattr(ctx, "set_groups", None)
    if setter is not None:
        setter("X25519:prime256v1:secp384r1")
    else:
        ctx.set_ecdh_curve("prime256v1")


@dataclass(frozen=True)
class PeerCert:
    """The verified client certificate's identity facts, carried per connection."""

    sha256: str
    subject_cn: str | None
    sans: tuple[str, ...]
    not_after: str

    def as_scope(self) -> dict[str, object]:
        return {"cert_sha256": self.sha256, "subject_cn": self.subject_cn,
                "sans": list(self.sans), "not_after": self.not_after}


def peer_cert(der: bytes) -> PeerCert:
    """Parse the DER leaf that the handshake already verified."""
    cert = x509.load_der_x509_certificate(der)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else None
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(str(v) for v in ext.get_values_for_type(x509.DNSName)) + tuple(
            str(v) for v in ext.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        sans = ()
    return PeerCert(sha256=hashlib.sha256(der).hexdigest(), subject_cn=cn, sans=sans,
                    not_after=cert.not_valid_after_utc.isoformat())
