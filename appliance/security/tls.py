"""The TLS context (Mozilla "intermediate") and what a verified client certificate says about its holder."""

from __future__ import annotations

import hashlib
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from appliance.config.policy import ServerPolicy
from appliance.errors import TLSSetupError
from appliance.security import certfacts, certid

log = logging.getLogger("appliance.security.tls")

# Mozilla intermediate (v5.7): forward-secret AEAD suites only for TLS 1.2; TLS 1.3 suites are fixed.
MOZILLA_INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)

_VERIFY = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "off": ssl.CERT_NONE}


def server_context(server: ServerPolicy) -> ssl.SSLContext:
    """Build the listener's context; every failure names the file and how to fix it."""
    return server_context_with_ca(server)[0]


def server_context_with_ca(server: ServerPolicy) -> tuple[ssl.SSLContext, str | None]:
    """A whole new context from the policy, and the SHA-256 of the client CA bytes it trusts.

    A reload builds a fresh one instead of adding to the live trust store, which can only grow.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(MOZILLA_INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_SINGLE_ECDH_USE
    _set_groups(ctx)
    try:
        ctx.load_cert_chain(str(server.tls_cert), str(server.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(
            f"{server.tls_cert}: cannot load certificate/key ({exc})",
            hint="check [server] tls_cert and tls_key match and are PEM",
        ) from None
    ctx.verify_mode = _VERIFY[server.client_cert]
    ca_sha256 = None
    if server.client_cert != "off":
        assert server.client_ca is not None  # enforced by policy validation
        ca_sha256 = _load_client_ca(ctx, server.client_ca)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx, ca_sha256


def _load_client_ca(ctx: ssl.SSLContext, path: Path) -> str:
    """Trust exactly the certificates in this file, read once (the digest names what was loaded)."""
    hint = "check [server] client_ca points at a PEM CA file"
    try:
        raw = path.read_bytes()
        ctx.load_verify_locations(cadata=raw.decode("ascii"))
    except UnicodeDecodeError:
        raise TLSSetupError(f"{path}: cannot load client CA (not an ASCII PEM file)", hint=hint) from None
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise TLSSetupError(f"{path}: cannot load client CA ({exc})", hint=hint) from None
    if not ctx.get_ca_certs():
        raise TLSSetupError(f"{path}: cannot load client CA (no certificate in it)", hint=hint)
    return hashlib.sha256(raw).hexdigest()


def _set_groups(ctx: ssl.SSLContext) -> None:
    """Limit key exchange to X25519, P-256 and P-384 where Python exposes it (3.13+)."""
    setter = getattr(ctx, "set_groups", None)
    if setter is not None:
        setter("X25519:prime256v1:secp384r1")
    else:
        ctx.set_ecdh_curve("prime256v1")


@dataclass(frozen=True)
class PeerCert:
    """The verified client certificate's identity facts, carried per connection.

    `problem` set means the certificate could not be identified: the network gate refuses it (fail closed).
    """

    sha256: str | None  # of the signed TBSCertificate: one value for every encoding; audited as cert_sha256
    fingerprints: frozenset[str]  # every value a `revoked` or `cert_sha256` entry may hold for it
    subject_cn: str | None
    sans: tuple[str, ...]
    not_after: str | None
    problem: str | None = None
    not_before: str | None = None  # with not_after, checked on every request: keep-alive and resumption

    def as_scope(self) -> dict[str, object]:
        return {
            "cert_sha256": self.sha256,
            "cert_ids": self.fingerprints,
            "subject_cn": self.subject_cn,
            "sans": list(self.sans),
            "not_after": self.not_after,
            "not_before": self.not_before,
            "problem": self.problem,
        }


def peer_cert(der: bytes) -> PeerCert:
    """Identify the DER leaf that the handshake already verified by its signed content; never raises."""
    try:
        ident = certid.identify(der)
        cert = x509.load_der_x509_certificate(ident.canonical_der)
        claims = certfacts.facts(cert)
    except Exception as exc:  # any parse failure must refuse the peer, not crash the connection
        reason = str(exc) if isinstance(exc, certid.CertEncodingError) else "the certificate cannot be parsed"
        log.warning("client certificate refused: %s", reason)
        return PeerCert(None, frozenset(), None, (), None, problem=reason)
    return PeerCert(
        ident.tbs_sha256,
        ident.fingerprints,
        claims.subject_cn,
        claims.sans,
        claims.not_after.isoformat(),
        not_before=claims.not_before.isoformat(),
    )
