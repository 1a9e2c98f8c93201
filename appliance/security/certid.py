"""What identifies a certificate: its signed content, never the bytes it arrived in.

An ECDSA signature (r, s) is also valid as (r, n - s), so one certificate has two valid DER encodings with
different SHA-256 fingerprints (and a lenient parser accepts more spellings of the outer structure). A policy
entry must match every one of them: `identify` rebuilds the certificate in strict DER from its signed parts
and returns every fingerprint an admin may have written for it, plus the digest of the signed part itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

# Orders of the prime curves OpenSSL accepts for ECDSA certificates (SEC 2, RFC 5639);
# tests/test_cert_identity.py proves each by verifying a signature whose s was replaced by n - s.
CURVE_ORDERS: dict[str, int] = {
    "secp192r1": 0xFFFFFFFFFFFFFFFFFFFFFFFF99DEF836146BC9B1B4D22831,
    "secp224r1": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFF16A2E0B8F03E13DD29455C5C2A3D,
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973", 16
    ),
    "secp521r1": int(
        "01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF"
        "FA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
        16,
    ),
    "secp256k1": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
    "brainpoolP256r1": 0xA9FB57DBA1EEA9BC3E660A909D838D718C397AA3B561A6F7901E0E82974856A7,
    "brainpoolP384r1": int(
        "8CB91E82A3386D280F5D6F7E50E641DF152F7109ED5456B31F166E6CAC0425A7CF3AB6AF6B7FC3103B883202E9046565", 16
    ),
    "brainpoolP512r1": int(
        "AADD9DB8DBE9C48B3FD4E6AE33C9FC07CB308DB3B3C9D20ED6639CCA70330870"
        "553E5C414CA92619418661197FAC10471DB1D381085DDADDB58796829CA90069",
        16,
    ),
}

_RSA = {f"1.2.840.113549.1.1.{i}" for i in (5, 10, 11, 12, 13, 14)} | {
    f"2.16.840.1.101.3.4.3.{i}" for i in (13, 14, 15, 16)
}
_DSA = {"1.2.840.10040.4.3"} | {f"2.16.840.1.101.3.4.3.{i}" for i in range(1, 9)}
_EDDSA = {"1.3.101.112", "1.3.101.113"}
# ECDSA with SHA-1, SHA-224..512 and SHA3-224..512: the malleable ones.
ECDSA = (
    {"1.2.840.10045.4.1"}
    | {f"1.2.840.10045.4.3.{i}" for i in (1, 2, 3, 4)}
    | {f"2.16.840.1.101.3.4.3.{i}" for i in (9, 10, 11, 12)}
)
# RSA (PKCS#1 v1.5, PSS), DSA and EdDSA: a second valid signature value needs the key (s < n or s < L is
# checked by OpenSSL), so the signature as presented is the only one.
SINGLE = _RSA | _DSA | _EDDSA


class CertEncodingError(ValueError):
    """A certificate this module cannot take apart; the caller refuses it (fail closed)."""


@dataclass(frozen=True)
class CertIdentity:
    """One certificate's stable identity and every fingerprint that names it."""

    tbs_sha256: str  # SHA-256 of the signed TBSCertificate: the same for every encoding
    fingerprints: frozenset[str]  # DER SHA-256 of each valid encoding, the presented one, and tbs_sha256
    canonical_der: bytes  # strict DER, signature as presented: what the holder's facts are read from


def identify(der: bytes) -> CertIdentity:
    """Take a certificate apart and name it by every encoding a CA check accepts; raises CertEncodingError."""
    tbs, outer_alg, signature = _parts(der)
    inner_alg = _inner_algorithm(tbs)
    oid = _algorithm_oid(inner_alg)
    if oid not in ECDSA and oid not in SINGLE:
        raise CertEncodingError(f"signature algorithm {oid} is not supported for client certificates")
    if _algorithm_oid(outer_alg) != oid:
        raise CertEncodingError("the outer and the signed signature algorithms differ")
    values = list(_ecdsa_variants(signature)) if oid in ECDSA else [signature]
    encodings = {_certificate(tbs, alg, value) for alg in (inner_alg, outer_alg) for value in values}
    tbs_sha256 = _sha256(tbs)
    prints = {_sha256(e) for e in encodings} | {_sha256(der), tbs_sha256}
    return CertIdentity(tbs_sha256, frozenset(prints), _certificate(tbs, inner_alg, values[0]))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ecdsa_variants(signature: bytes) -> Iterator[bytes]:
    """(r, s) re-encoded canonically, then (r, n - s) for every curve order the value fits under."""
    try:
        r, s = decode_dss_signature(signature)
    except ValueError:
        raise CertEncodingError("the ECDSA signature is not a DER ECDSA-Sig-Value") from None
    if r <= 0 or s <= 0:
        raise CertEncodingError("the ECDSA signature has a zero or negative part")
    yield encode_dss_signature(r, s)
    for n in CURVE_ORDERS.values():
        if s < n and r < n:
            yield encode_dss_signature(r, n - s)


# --- a minimal DER reader and writer: only what the outer Certificate structure needs ------------------


def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the element at pos; long-form lengths of any size."""
    if pos + 2 > end:
        raise CertEncodingError("truncated certificate")
    tag, first = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise CertEncodingError("unexpected high-tag-number element")
    if first < 0x80:
        start, length = pos + 2, first
    elif first == 0x80 or first - 0x80 > 8:
        raise CertEncodingError("indefinite or oversized length")
    else:
        start = pos + 2 + (first - 0x80)
        if start > end:
            raise CertEncodingError("truncated certificate")
        length = int.from_bytes(data[pos + 2 : start], "big")
    if start + length > end:
        raise CertEncodingError("truncated certificate")
    return tag, start, start + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, element start, contents start, end) of each element between start and end."""
    out = []
    pos = start
    while pos < end:
        tag, body, stop = _tlv(data, pos, end)
        out.append((tag, pos, body, stop))
        pos = stop
    return out


def _parts(der: bytes) -> tuple[bytes, bytes, bytes]:
    """Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue BIT STRING }."""
    tag, body, end = _tlv(der, 0, len(der))
    if tag != 0x30 or end != len(der):
        raise CertEncodingError("not one DER SEQUENCE")
    parts = _children(der, body, end)
    if [p[0] for p in parts] != [0x30, 0x30, 0x03]:
        raise CertEncodingError("not a Certificate (TBS, algorithm, signature)")
    (_, tbs_at, _, tbs_end), (_, alg_at, _, alg_end), (_, _, sig_body, sig_end) = parts
    if sig_end - sig_body < 2 or der[sig_body] != 0:
        raise CertEncodingError("the signature BIT STRING is empty or has unused bits")
    return der[tbs_at:tbs_end], der[alg_at:alg_end], der[sig_body + 1 : sig_end]


def _inner_algorithm(tbs: bytes) -> bytes:
    """The AlgorithmIdentifier inside the signed part: after the optional [0] version and the serial."""
    _, body, end = _tlv(tbs, 0, len(tbs))
    fields = _children(tbs, body, end)
    if fields and fields[0][0] == 0xA0:
        fields = fields[1:]
    if len(fields) < 2 or fields[0][0] != 0x02 or fields[1][0] != 0x30:
        raise CertEncodingError("the TBSCertificate has no serial and signature algorithm")
    return tbs[fields[1][1] : fields[1][3]]


def _algorithm_oid(alg: bytes) -> str:
    """The dotted OID of an AlgorithmIdentifier."""
    _, body, end = _tlv(alg, 0, len(alg))
    fields = _children(alg, body, end)
    if not fields or fields[0][0] != 0x06 or fields[0][3] == fields[0][2]:
        raise CertEncodingError("an AlgorithmIdentifier without an OID")
    raw = alg[fields[0][2] : fields[0][3]]
    arcs, value = [], 0
    for byte in raw:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if raw[-1] & 0x80:
        raise CertEncodingError("a truncated OID")
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in (first, arcs[0] - 40 * first, *arcs[1:]))


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _certificate(tbs: bytes, alg: bytes, signature: bytes) -> bytes:
    """The strict DER Certificate from its parts; tbs and alg are kept byte for byte (they are signed)."""
    bits = b"\x03" + _length(len(signature) + 1) + b"\x00" + signature
    body = tbs + alg + bits
    return b"\x30" + _length(len(body)) + body
