"""Property tests (hypothesis, time-boxed): the parsers and checkers that face hostile input never crash.

Policy parser: any value for any key is a ConfigError or a policy. Identity: the gate agrees with an
`ipaddress` oracle and finds exactly the client whose token was shown. Image intake: any bytes are an image
or one of the documented client errors. Audit verifier: every mutation is detected, and nothing crashes it.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import tomlkit
from conftest import png_bytes
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from appliance.audit.log import AuditLog, list_files, load_hmac_key, new_hmac_key
from appliance.audit.verify import verify
from appliance.config.load import load_policy
from appliance.config.policy import AuditPolicy, Client, Policy
from appliance.config.settings import SETTINGS
from appliance.errors import ClientError, ConfigError, Forbidden, Unauthorized
from appliance.security.identity import Caller, identify, network_gate, source_ip
from appliance.security.tokens import find_client, new_token, token_digest
from appliance.web.images import ImageLimits, decode, from_api_field, from_image_url

FAST = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

# --- the policy parser ------------------------------------------------------------------------------

toml_scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.booleans(),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40),
    st.sampled_from(
        [
            "~",
            "~nobody/x",
            "~no-such-user/x",
            "0.0.0.0:8443",
            "[::1]:0",
            "10.0.0.0/33",
            "60/minute",
            "0/second",
            "a" * 64,
            "/dev/null",
            "..",
            "required",
            "off",
        ]
    ),
    st.dates(),
    st.datetimes(),
    st.times(),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
POLICY_KEYS = [(s.section, s.key) for s in SETTINGS]


@pytest.fixture(scope="module")
def policy_text(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from appliance.admin.init import init

    root = tmp_path_factory.mktemp("policy")
    result = init(
        root / "s", listen="127.0.0.1:9443", model=root / "m.gguf", mmproj=root / "p.gguf", client="tester"
    )
    return result.policy, result.policy.read_text()


def _mutated(text: str, edits: list[tuple[tuple[str, str], Any]]) -> str:
    doc = tomlkit.parse(text)
    for (section, key), value in edits:
        table = doc["clients"][0] if section == "clients" else doc.setdefault(section, {})
        table[key] = value
    return tomlkit.dumps(doc)


@FAST
@given(edits=st.lists(st.tuples(st.sampled_from(POLICY_KEYS), toml_values), min_size=1, max_size=4))
@example(edits=[(("model", "path"), "~no-such-user/model.gguf")])  # was a RuntimeError traceback
def test_policy_any_value_is_a_config_error_or_a_policy(
    policy_text: tuple[Path, str], edits: list[tuple[tuple[str, str], Any]]
) -> None:
    path, text = policy_text
    try:
        mutated = _mutated(text, edits)
    except (ValueError, TypeError):  # a value tomlkit cannot write is no policy file anyone can have
        assume(False)
    out = path.parent / "fuzzed.toml"
    out.write_text(mutated)
    try:
        assert isinstance(load_policy(out), Policy)
    except ConfigError as exc:
        assert str(exc) and str(out) in str(exc)


@FAST
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_policy_any_bytes_are_a_config_error(policy_text: tuple[Path, str], raw: bytes) -> None:
    out = policy_text[0].parent / "garbage.toml"
    out.write_bytes(raw)
    with pytest.raises(ConfigError):
        load_policy(out)


# --- CIDR and identity matching --------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
networks = st.one_of(ipv4, ipv6).flatmap(
    lambda a: st.integers(0, 32 if "." in a else 128).map(
        lambda p: ipaddress.ip_network(f"{a}/{p}", strict=False)
    )
)


def _policy(allow: list[Any], proxies: list[Any], clients: tuple[Client, ...] = ()) -> Any:
    class P:
        class server:  # stands in for ServerPolicy
            pass

    P.server.allow = tuple(allow)  # type: ignore[attr-defined]
    P.server.trusted_proxies = tuple(proxies)  # type: ignore[attr-defined]
    P.server.revoked = frozenset()  # type: ignore[attr-defined]
    P.clients = clients  # type: ignore[attr-defined]
    return P


def _in(ip: str, nets: list[Any]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr.version == n.version and addr in n for n in nets)


@FAST
@given(
    peer=st.one_of(ipv4, ipv6),
    allow=st.lists(networks, max_size=4),
    proxies=st.lists(networks, max_size=2),
    forwarded=st.one_of(
        st.none(), st.text(max_size=60), st.lists(st.one_of(ipv4, ipv6), max_size=4).map(", ".join)
    ),
)
def test_network_gate_matches_the_ipaddress_oracle(
    peer: str, allow: list[Any], proxies: list[Any], forwarded: str | None
) -> None:
    headers = [(b"x-forwarded-for", forwarded.encode("latin-1", "replace"))] if forwarded is not None else []
    scope = {"client": (peer, 1234), "headers": headers}
    policy = _policy(allow, proxies)
    try:
        ip = str(source_ip(scope, policy))
    except Forbidden:
        assert forwarded is not None and _in(peer, proxies)  # only a trusted proxy's header is read
        return
    if forwarded is None or not _in(peer, proxies):
        assert ip == str(ipaddress.ip_address(peer))
    try:
        caller = network_gate(scope, policy)
    except Forbidden:
        assert not _in(ip, allow)
        return
    assert caller.ip == ip and _in(ip, allow)


@FAST
@given(
    shown=st.one_of(
        st.text(alphabet=st.characters(max_codepoint=255), max_size=80),
        st.sampled_from(["Bearer ", "bearer  x", "Basic abc", ""]),
    ),
    pick=st.integers(0, 3),
    duplicate=st.booleans(),
)
def test_identify_finds_exactly_the_token_holder(shown: str, pick: int, duplicate: bool) -> None:
    tokens = [new_token() for _ in range(3)]
    clients = tuple(
        Client(name=f"c{i}", token_sha256=token_digest(t), scopes=frozenset({"chat"}))
        for i, t in enumerate(tokens)
    )
    value = f"Bearer {tokens[pick]}" if pick < 3 else shown
    headers = [(b"authorization", value.encode("latin-1"))] * (2 if duplicate else 1)
    scope = {"client": ("127.0.0.1", 1), "headers": headers}
    try:
        found = identify(scope, _policy([], [], clients), Caller("127.0.0.1", None))
    except Unauthorized:
        assert duplicate or pick == 3
        return
    assert not duplicate and found.client is not None
    assert token_digest(value.partition(" ")[2].strip()) == found.client.token_sha256
    assert find_client(clients, tokens[pick] if pick < 3 else "x") in (*clients, None)


# --- image intake ----------------------------------------------------------------------------------

LIMITS = ImageLimits(max_image_bytes=300_000, max_image_pixels=1_000_000, data_dir=None)
SEEDS = [png_bytes(size=(20, 12), fmt=f) for f in ("PNG", "JPEG", "WEBP")]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op, at = draw(st.sampled_from(["flip", "cut", "insert", "zero"])), draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif at < len(data):
            data[at : at + 4] = b"\xff\xff\xff\xff"
    return bytes(data)


def _decodes_or_refuses(data: bytes) -> None:
    try:
        img = decode(data, LIMITS)
    except ClientError as exc:
        assert exc.status in (400, 413, 415), exc
        return
    assert len(img.rgb) == img.width * img.height * 3


@SLOW
@given(
    data=st.one_of(
        mutated_images(),
        st.binary(max_size=2000),
        st.binary(max_size=200).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
        st.binary(max_size=200).map(lambda b: b"RIFF\x00\x01\x00\x00WEBPVP8 " + b),
        st.binary(max_size=200).map(lambda b: b"\xff\xd8\xff\xe0" + b),
    )
)
def test_decode_any_bytes_is_an_image_or_a_client_error(data: bytes) -> None:
    _decodes_or_refuses(data)


@FAST
@given(
    text=st.one_of(
        st.text(max_size=200),
        st.builds(
            lambda prefix, body: prefix + body,
            st.sampled_from(
                [
                    "data:image/png;base64,",
                    "DATA:IMAGE/JPG;BASE64,",
                    "data:image/webp;base64,",
                    "data:image/gif;base64,",
                    "data:",
                    "",
                    "/",
                    "../",
                    "data:image/png;base64",
                ]
            ),
            st.one_of(
                st.text(max_size=100), st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())
            ),
        ),
    )
)
def test_image_strings_are_an_image_or_a_client_error(data_dir: Path, text: str) -> None:
    limits = ImageLimits(LIMITS.max_image_bytes, LIMITS.max_image_pixels, data_dir)
    for parse in (from_image_url, from_api_field):
        try:
            parse(text, limits)
        except ClientError as exc:
            assert exc.status in (400, 413, 415)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "scan.png").write_bytes(SEEDS[0])
    return root


# --- the audit chain verifier ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sealed trail of three files (two rotations), the way a stopped daemon leaves it."""
    root = tmp_path_factory.mktemp("trail")
    (root / "audit.key").write_text(new_hmac_key())
    (root / "audit.key").chmod(0o600)
    clock = iter(range(1_800_000_000, 1_800_000_000 + 10**6, 10))
    log = AuditLog(
        AuditPolicy.with_defaults(dir=root / "audit", hmac_key_file=root / "audit.key", rotate_bytes=1500),
        clock=lambda: float(next(clock)),
    )
    log.open()
    for i in range(24):
        log.write("request", request_id=f"{i:024x}", client="tester", status=200, route="/v1/models")
    log.close()
    assert verify(root / "audit", load_hmac_key(root / "audit.key"), expect_sealed=True).ok
    assert len(list_files(root / "audit")) >= 3
    return root / "audit"


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, int, int, bytes]:
    op = draw(
        st.sampled_from(
            ["edit", "delete", "swap", "duplicate", "insert", "truncate", "drop_file", "json", "junk"]
        )
    )
    a, b = draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6))
    return op, a, b, draw(st.binary(min_size=1, max_size=8))


JSON_LINES = st.one_of(
    st.just(b"[1]"),
    st.just(b'{"seq": [1], "prev": [], "event": {}}'),
    st.just(b'{"seq":1,"prev":[],"event":"x"}'),
    st.just(b'{"seq":"1e5","prev":"","event":""}'),
    st.just(b'{"seq":2,"prev":"x","event":"audit.retention_delete","last_hash":["a"],"file":"f"}'),
    st.just(b'{"seq":true,"prev":null,"event":null}'),
    st.just(b'{"seq":1.5,"prev":"0","event":"audit.seal"}'),
)


def _apply(files: list[Path], m: tuple[str, int, int, bytes], json_line: bytes) -> None:
    """One mutation: a line edited, deleted, moved, doubled, added or cut off, or a whole file gone."""
    op, a, b, junk = m
    path = files[a % len(files)]
    if op == "drop_file":
        path.unlink()
        return
    lines = path.read_bytes().splitlines(keepends=True) or [b"\n"]
    i, j = a % len(lines), b % len(lines)
    if op == "edit":
        pos = b % max(1, len(lines[i]) - 1)
        lines[i] = lines[i][:pos] + bytes([lines[i][pos] ^ (junk[0] or 1)]) + lines[i][pos + 1 :]
    elif op == "delete":
        del lines[i]
    elif op == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    elif op == "duplicate":
        lines.insert(i, lines[i])
    elif op == "insert":
        lines.insert(i, junk + b"\n")
    elif op == "truncate":
        lines = lines[:i]
    else:
        lines[i] = (json_line if op == "json" else junk) + b"\n"
    path.write_bytes(b"".join(lines))


def _snapshot(directory: Path) -> dict[str, list[bytes]]:
    return {p.name: p.read_bytes().splitlines() for p in sorted(directory.iterdir())}


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(ms=st.lists(mutations(), min_size=1, max_size=3), json_line=JSON_LINES)
@example(ms=[("drop_file", 3, 0, b"x")], json_line=b"[1]")  # the newest of the 4 files: found once missed
@example(
    ms=[("json", 4, 0, b"x")],
    json_line=b'{"seq":2,"prev":"x","event":"audit.retention_delete","last_hash":["a"],"file":"f"}',
)  # crashed the verifier (unhashable list) once
def test_every_mutation_of_the_trail_is_detected(
    trail: Path, ms: list[tuple[str, int, int, bytes]], json_line: bytes
) -> None:
    work = Path(tempfile.mkdtemp())
    try:
        copy = work / "audit"
        shutil.copytree(trail, copy)
        for m in ms:
            files = list_files(copy)
            if files:
                _apply(files, m, json_line)
        key = load_hmac_key(trail.parent / "audit.key")
        result = verify(copy, key, expect_sealed=True)  # must return, whatever the files hold
        if _snapshot(trail) != _snapshot(copy):  # every line is MACed: no blind spot is left
            assert not result.ok, ms
    finally:
        shutil.rmtree(work)


def test_an_edit_of_the_final_seal_is_caught_by_its_own_mac(trail: Path, tmp_path: Path) -> None:
    """Once the chain's blind spot (nothing after the last record carries its hash); now its MAC shows it."""
    copy = tmp_path / "audit"
    shutil.copytree(trail, copy)
    last = list_files(copy)[-1]
    lines = last.read_bytes().splitlines(keepends=True)
    rec = json.loads(lines[-1])
    rec["reason"] = "edited"
    lines[-1] = json.dumps(rec, separators=(",", ":")).encode() + b"\n"
    last.write_bytes(b"".join(lines))
    r = verify(copy, load_hmac_key(trail.parent / "audit.key"), expect_sealed=True)
    assert not r.ok and "MAC does not match" in str(r.problem)
