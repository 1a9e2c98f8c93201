"""A certificate is identified by its signed content: every valid re-encoding of a revoked or bound
certificate is the same certificate (issue 11, defect 2), proven over real mTLS against the real daemon."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import Daemon, TinyModel, add_client, free_port, make_setup, start_daemon
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import NameOID
from helpers import records

from appliance import files
from appliance.admin.cli import main
from appliance.admin.init import InitResult
from appliance.security import certid, pki
from appliance.security.tls import peer_cert

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
P256 = certid.CURVE_ORDERS["secp256r1"]


# --- a small DER re-encoder, independent of appliance.security.certid's -------------------------------------


def der_len(n: int, pad: int = 0) -> bytes:
    """A DER length; `pad` extra leading zero bytes make it a valid BER but non-minimal length."""
    if n < 0x80 and not pad:
        return bytes([n])
    raw = b"\x00" * pad + n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")
    return bytes([0x80 | len(raw)]) + raw


def read(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, contents start, contents end) of the element at pos."""
    first = data[pos + 1]
    if first < 0x80:
        return data[pos], pos + 2, pos + 2 + first
    size = first & 0x7F
    length = int.from_bytes(data[pos + 2 : pos + 2 + size], "big")
    return data[pos], pos + 2 + size, pos + 2 + size + length


def split(der: bytes) -> tuple[bytes, bytes, bytes]:
    """(TBS element, signatureAlgorithm element, signature value) of a DER certificate."""
    _, body, _ = read(der, 0)
    _, _, tbs_end = read(der, body)
    _, _, alg_end = read(der, tbs_end)
    _, sig_body, sig_end = read(der, alg_end)
    return der[body:tbs_end], der[tbs_end:alg_end], der[sig_body + 1 : sig_end]


def join(tbs: bytes, alg: bytes, sig: bytes, outer_pad: int = 0, bits_pad: int = 0) -> bytes:
    bits = b"\x03" + der_len(len(sig) + 1, bits_pad) + b"\x00" + sig
    return b"\x30" + der_len(len(tbs) + len(alg) + len(bits), outer_pad) + tbs + alg + bits


def flip_s(der: bytes, order: int = P256) -> bytes:
    """The same certificate with its ECDSA signature (r, s) replaced by (r, n - s)."""
    tbs, alg, sig = split(der)
    r, s = decode_dss_signature(sig)
    return join(tbs, alg, encode_dss_signature(r, order - s))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tbs_sha(der: bytes) -> str:
    return sha(split(der)[0])


# --- the identity function itself, for every signature kind ----------------------------------------

CURVES: dict[str, ec.EllipticCurve] = {
    "secp192r1": ec.SECP192R1(),
    "secp224r1": ec.SECP224R1(),
    "secp256r1": ec.SECP256R1(),
    "secp384r1": ec.SECP384R1(),
    "secp521r1": ec.SECP521R1(),
    "secp256k1": ec.SECP256K1(),
    "brainpoolP256r1": ec.BrainpoolP256R1(),
    "brainpoolP384r1": ec.BrainpoolP384R1(),
    "brainpoolP512r1": ec.BrainpoolP512R1(),
}


@pytest.mark.parametrize("curve", sorted(certid.CURVE_ORDERS))
def test_curve_orders_are_the_real_ones(curve: str) -> None:
    """A wrong order would leave that curve's second signature unrecognised: prove each by verifying it."""
    key = ec.generate_private_key(CURVES[curve])
    r, s = decode_dss_signature(key.sign(b"m", ec.ECDSA(hashes.SHA256())))
    n = certid.CURVE_ORDERS[curve]
    key.public_key().verify(encode_dss_signature(r, n - s), b"m", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        key.public_key().verify(encode_dss_signature(r, n - s + 1), b"m", ec.ECDSA(hashes.SHA256()))


def test_rsa_and_ed25519_have_no_second_signature_value() -> None:
    """Why certid treats them as single: OpenSSL refuses sigma + n (RSA) and s + L (Ed25519)."""
    ed = ed25519.Ed25519PrivateKey.generate()
    sig = ed.sign(b"m")
    order = 2**252 + 27742317777372353535851937790883648493
    with pytest.raises(InvalidSignature):
        ed.public_key().verify(
            sig[:32] + (int.from_bytes(sig[32:], "little") + order).to_bytes(32, "little"), b"m"
        )
    key = rsa.generate_private_key(65537, 2048)
    value = int.from_bytes(key.sign(b"m", padding.PKCS1v15(), hashes.SHA256()), "big")
    with pytest.raises(InvalidSignature):
        bigger = (value + key.public_key().public_numbers().n).to_bytes(257, "big")
        key.public_key().verify(bigger, b"m", padding.PKCS1v15(), hashes.SHA256())


Signer = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def leaf_signed_by(ca_key: Signer, cn: str = "x") -> bytes:
    """A client certificate signed by `ca_key`, as DER."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    algorithm = None if isinstance(ca_key, ed25519.Ed25519PrivateKey) else hashes.SHA384()
    return builder.sign(ca_key, algorithm).public_bytes(serialization.Encoding.DER)


def ec_issuer(curve: str) -> Callable[[], Signer]:
    return lambda: ec.generate_private_key(CURVES[curve])


ISSUERS: dict[str, Callable[[], Signer]] = {
    **{c: ec_issuer(c) for c in ("secp256r1", "secp384r1", "secp521r1")},
    "rsa": lambda: rsa.generate_private_key(65537, 2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}


@pytest.mark.parametrize("issuer", sorted(ISSUERS))
def test_every_valid_encoding_names_the_issued_certificate(issuer: str) -> None:
    """Each spelling the CA check accepts yields a set with the issued DER fingerprint and the TBS digest."""
    ca_key = ISSUERS[issuer]()
    der = leaf_signed_by(ca_key)
    tbs, alg, sig = split(der)
    spellings = [der, join(tbs, alg, sig, outer_pad=1), join(tbs, alg, sig, bits_pad=2)]
    names = {sha(der), tbs_sha(der)}
    if isinstance(ca_key, ec.EllipticCurvePrivateKey):
        flipped = flip_s(der, certid.CURVE_ORDERS[ca_key.curve.name])
        ca_key.public_key().verify(split(flipped)[2], tbs, ec.ECDSA(hashes.SHA384()))  # really valid
        spellings += [flipped, join(*split(flipped), outer_pad=2)]
        names.add(sha(flipped))
    for spelling in spellings:
        ident = certid.identify(spelling)
        assert names <= ident.fingerprints
        assert ident.tbs_sha256 == tbs_sha(der)
        peer = peer_cert(spelling)
        assert (peer.problem, peer.sha256, peer.subject_cn) == (None, tbs_sha(der), "x")
    other = certid.identify(leaf_signed_by(ca_key))
    assert not other.fingerprints & certid.identify(der).fingerprints  # nothing shared with another cert


def test_signed_fingerprint_agrees_with_the_daemon() -> None:
    """`cert list`'s tbs sha256 is exactly what the daemon audits for that certificate."""
    ca = pki.new_ca()
    issued = pki.new_client_cert(ca, "x")
    der = issued.cert.public_bytes(serialization.Encoding.DER)
    assert peer_cert(flip_s(der)).sha256 == pki.signed_fingerprint(issued.cert) == tbs_sha(der)
    assert pki.fingerprint(issued.cert) == sha(der)


def unreadable_certificates() -> dict[str, bytes]:
    """Certificates the identity cannot be computed for; each must be refused, none may raise."""
    ca = pki.new_ca()
    der = pki.new_client_cert(ca, "x").cert.public_bytes(serialization.Encoding.DER)
    tbs, alg, sig = split(der)
    r, _ = decode_dss_signature(sig)
    sm2 = bytes.fromhex("300a06082a811ccf55018375")  # SM2 with SM3: malleability unknown here
    return {
        "empty": b"",
        "truncated": der[:-5],
        "trailing bytes": der + b"\x00",
        "indefinite length": b"\x30\x80" + der[2:],
        "unused bits": der[: -len(sig) - 1] + b"\x01" + sig,
        "unknown algorithm": join(tbs.replace(alg, sm2), sm2, sig),
        "outer and inner algorithm differ": join(tbs, bytes.fromhex("300a06082a8648ce3d040303"), sig),
        "non-DER ECDSA value": join(tbs, alg, b"\x30" + der_len(len(sig) - 2, 1) + sig[2:]),
        "zero s": join(tbs, alg, encode_dss_signature(r, 0)),
        "not a certificate": b"\x30\x03\x02\x01\x01",
    }


@pytest.mark.parametrize("case", sorted(unreadable_certificates()))
def test_unidentifiable_certificates_are_refused_not_crashed(case: str) -> None:
    peer = peer_cert(unreadable_certificates()[case])
    assert peer.problem and peer.sha256 is None and not peer.fingerprints
    assert peer.as_scope()["problem"] == peer.problem


# --- the real daemon, real handshakes ---------------------------------------------------------------


@dataclass
class Certs:
    """A daemon with revoked and bound certificates, and files for each spelling of them."""

    d: Daemon
    files: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    der: dict[str, bytes] = field(default_factory=dict)

    def post(self, token: str, cert: str) -> httpx.Response:
        with self.d.client(token=self.tokens.get(token, token), cert=self.files[cert]) as client:
            return client.post("/v1/chat/completions", json=CHAT)


def issue(setup: InitResult, certs: Certs, name: str, cn: str) -> None:
    """An issued certificate plus its re-encodings (s -> n - s; non-minimal outer length), each as PEM."""
    tls = setup.policy.parent / "tls"
    issued = pki.new_client_cert(pki.load(tls / "ca.crt", tls / "ca.key"), cn)
    out = setup.policy.parent / "certs" / name
    pki.save(issued, out / "issued.crt", out / "client.key")
    der = issued.cert.public_bytes(serialization.Encoding.DER)
    certs.der[name] = der
    certs.files[name] = (out / "issued.crt", out / "client.key")
    for suffix, spelling in (("flipped", flip_s(der)), ("ber", join(*split(der), outer_pad=1))):
        files.write_public(out / f"{suffix}.crt", pem(spelling))
        certs.files[f"{name}/{suffix}"] = (out / f"{suffix}.crt", out / "client.key")


def pem(der: bytes) -> bytes:
    """PEM of exactly these bytes (not re-encoded by a parser)."""
    import base64

    b64 = base64.encodebytes(der).replace(b"\n", b"")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n"


def odd_but_signed(setup: InitResult, certs: Certs) -> None:
    """A certificate the CA signed over a BER (non-DER) TBS: OpenSSL verifies it; strict parsers refuse it."""
    tls = setup.policy.parent / "tls"
    ca = pki.load(tls / "ca.crt", tls / "ca.key")
    issued = pki.new_client_cert(ca, "odd")
    tbs, alg, _ = split(issued.cert.public_bytes(serialization.Encoding.DER))
    ber_tbs = b"\x30" + der_len(read(tbs, 0)[2] - read(tbs, 0)[1], 1) + tbs[read(tbs, 0)[1] :]
    out = setup.policy.parent / "certs" / "odd"
    pki.save(issued, out / "issued.crt", out / "client.key")
    signature = ca.key.sign(ber_tbs, ec.ECDSA(hashes.SHA256()))
    files.write_public(out / "odd.crt", pem(join(ber_tbs, alg, signature)))
    certs.files["odd"] = (out / "odd.crt", out / "client.key")


def prepare(setup: InitResult, certs: Certs) -> None:
    for name, cn in (
        ("mallory", "mallory"),
        ("trent", "trent"),
        ("bob", "bob"),
        ("bob-other", "bob"),
        ("carol", "carol"),
    ):
        issue(setup, certs, name, cn)
    odd_but_signed(setup, certs)
    text = setup.policy.read_text()
    # mallory is revoked as `openssl x509 -fingerprint` prints it, trent by the digest of his signed part.
    revoked = f'revoked = ["{sha(certs.der["mallory"])}", "{tbs_sha(certs.der["trent"]).upper()}"]'
    setup.policy.write_text(text.replace("revoked = []", revoked))
    certs.tokens.update(
        cn_mallory=add_client(setup.policy, "m-cn", cert_cn='"mallory"'),
        sha_mallory=add_client(setup.policy, "m-sha", cert_sha256=f'"{sha(certs.der["mallory"])}"'),
        bob=add_client(setup.policy, "bob", cert_sha256=f'"{sha(certs.der["bob"])}"'),
        carol=add_client(setup.policy, "carol", cert_sha256=f'"{tbs_sha(certs.der["carol"])}"'),
        tester=setup.token,
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> Iterator[Certs]:
    root = tmp_path_factory.mktemp("certid")
    port = free_port()
    setup = make_setup(root / "s", tiny_model, port)
    c = Certs(d=None)  # type: ignore[arg-type]
    prepare(setup, c)
    c.d = start_daemon(setup, port, root / "daemon.log")
    try:
        yield c
    finally:
        c.d.stop()


def refused(r: httpx.Response, words: str) -> None:
    assert r.status_code == 403, r.text
    assert words in r.json()["error"]["message"], r.json()


def test_the_reencodings_pass_the_handshake(certs: Certs) -> None:
    """OpenSSL accepts the s -> n - s and BER spellings: a bound client is served with each of them."""
    for spelling in ("bob", "bob/flipped", "bob/ber"):
        assert certs.post("bob", spelling).status_code == 200, spelling
    assert sha(certs.der["bob"]) != sha(flip_s(certs.der["bob"]))


@pytest.mark.parametrize("token", ["tester", "cn_mallory", "sha_mallory"])
def test_revoked_certificate_stays_revoked_in_every_encoding(certs: Certs, token: str) -> None:
    for spelling in ("mallory", "mallory/flipped", "mallory/ber"):
        refused(certs.post(token, spelling), "revoked")


def test_revocation_by_signed_part_digest(certs: Certs) -> None:
    for spelling in ("trent", "trent/flipped", "trent/ber"):
        refused(certs.post("tester", spelling), "revoked")


def test_binding_follows_the_certificate_not_its_bytes_or_cn(certs: Certs) -> None:
    """A re-encoding is the bound certificate; another certificate with the same CN is not."""
    refused(certs.post("bob", "bob-other"), "does not belong")
    refused(certs.post("bob", "bob-other/flipped"), "does not belong")
    for spelling in ("carol", "carol/flipped"):
        assert certs.post("carol", spelling).status_code == 200, spelling
    refused(certs.post("carol", "bob"), "does not belong")


def test_unidentifiable_certificate_is_refused_and_the_daemon_serves_on(certs: Certs) -> None:
    refused(certs.post("tester", "odd"), "cannot be identified")
    assert certs.post("tester", "carol").status_code == 200
    assert certs.d.proc.poll() is None


def test_the_trail_names_one_certificate_for_all_its_encodings(certs: Certs) -> None:
    spellings = {"mallory": "tester", "mallory/flipped": "tester", "bob": "bob", "bob/flipped": "bob"}
    ids = {s: certs.post(token, s).headers["x-request-id"] for s, token in spellings.items()}
    by_id = {r.get("request_id"): r for r in records(certs.d) if r.get("event") == "request"}
    seen = {s: by_id[i]["cert_sha256"] for s, i in ids.items() if i in by_id}
    assert seen == {s: tbs_sha(certs.der[s.split("/")[0]]) for s in spellings}


def test_cert_list_prints_both_fingerprints(certs: Certs, capsys: pytest.CaptureFixture[str]) -> None:
    crt = certs.files["mallory"][0]
    assert main(["cert", "list", "--json", str(crt)]) in (0, 1)
    info = json.loads(capsys.readouterr().out)[0]
    assert (info["sha256"], info["tbs_sha256"]) == (sha(certs.der["mallory"]), tbs_sha(certs.der["mallory"]))
