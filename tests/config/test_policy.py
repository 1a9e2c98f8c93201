"""Policy loading: an `init` policy is valid; anything doubtful is refused naming the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.admin.init import init
from appliance.config.load import load_policy
from appliance.config.settings import SETTINGS
from appliance.errors import ConfigError, PolicyInvalid
from appliance.security.tokens import find_client, token_digest


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    return init(tmp_path / "s", listen="127.0.0.1:9443", model=tmp_path / "m.gguf")


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_init_policy_loads_with_paths_relative_to_file(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p = load_policy(setup.policy)
    assert (p.server.host, p.server.port) == ("127.0.0.1", 9443)
    assert p.server.tls_cert == (tmp_path / "s/tls/server.crt").resolve()
    assert p.server.client_cert == "required"
    assert p.model.path == (tmp_path / "m.gguf").resolve()
    assert p.model.data_dir == (tmp_path / "s/data").resolve()
    assert [c.name for c in p.clients] == ["client-01"]
    assert p.clients[0].token_sha256 == token_digest(setup.token)
    assert setup.token not in setup.policy.read_text()
    assert find_client(p.clients, setup.token) is p.clients[0]
    assert find_client(p.clients, setup.token + "x") is None


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("[limits]", "[limits]\nmax_bodybytes = 5", "limits.max_bodybytes"),
        ("[limits]", "[limit]\n[limits]", "limit"),
        ('tls_cert = "tls/server.crt"\n', "", "server.tls_cert"),
        ("max_queue = 16", 'max_queue = "16"', "limits.max_queue"),
        ("max_queue = 16", "max_queue = 0", "limits.max_queue"),
        ("n_ctx = 4096", "n_ctx = true", "model.n_ctx"),
        ('client_cert = "required"', 'client_cert = "maybe"', "server.client_cert"),
        ('client_ca = "tls/ca.crt"\n', "", "server.client_ca"),
        ('listen = "127.0.0.1:9443"', 'listen = "9443"', "server.listen"),
        ('scopes = ["chat", "models"]', 'scopes = ["chat", "root"]', "clients[0].scopes"),
        ("max_image_bytes = 10_000_000", "max_image_bytes = 30_000_000", "limits.max_image_bytes"),
    ],
)
def test_invalid_values_name_file_and_key(setup, old: str, new: str, key: str) -> None:  # type: ignore[no-untyped-def]
    edit(setup.policy, old, new)
    with pytest.raises(ConfigError) as info:
        load_policy(setup.policy)
    assert info.value.key == key
    assert str(setup.policy) in str(info.value)
    assert info.value.hint


def test_token_digest_must_be_hex_and_unique(setup) -> None:  # type: ignore[no-untyped-def]
    text = setup.policy.read_text()
    client = text[text.index("[[clients]]") :]
    setup.policy.write_text(text + "\n" + client.replace('name = "client-01"', 'name = "b"'))
    with pytest.raises(ConfigError, match="duplicate"):
        load_policy(setup.policy)
    setup.policy.write_text(text.replace(client, "").rstrip() + "\n")
    with pytest.raises(ConfigError, match="no client"):
        load_policy(setup.policy)


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text("[server\nlisten=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_policy(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy(tmp_path / "absent.toml")


def test_every_setting_has_help() -> None:
    assert all(s.help.endswith(".") or s.help.endswith(")") for s in SETTINGS)
    assert len({s.dotted for s in SETTINGS}) == len(SETTINGS)


def test_every_problem_is_listed(setup) -> None:  # type: ignore[no-untyped-def]
    edit(setup.policy, "max_queue = 16", "max_queue = 0\nbogus = 1")
    edit(setup.policy, 'client_cert = "required"', 'client_cert = "maybe"')
    with pytest.raises(PolicyInvalid) as info:
        load_policy(setup.policy)
    keys = {e.key for e in info.value.errors}
    assert {"limits.max_queue", "limits.bogus", "server.client_cert"} <= keys
    assert "3 problems" in str(info.value)


def test_client_rules_parse_and_are_checked(setup) -> None:  # type: ignore[no-untyped-def]
    import datetime as dt

    text = setup.policy.read_text()
    setup.policy.write_text(
        text + 'allow = ["127.0.0.5/32"]\ncert_cn = "x"\nexpires = 2027-03-01\n'
        'rate = "60/minute"\nmax_concurrent = 2\n'
    )
    c = load_policy(setup.policy).clients[0]
    assert (str(c.allow[0]), c.cert_cn, c.expires, str(c.rate), c.max_concurrent) == (  # type: ignore[index]
        "127.0.0.5/32",
        "x",
        dt.date(2027, 3, 1),
        "60/minute",
        2,
    )
    for line, key in [
        ('allow = ["10.0.0.0/8"]\n', "clients[0].allow"),
        ('rate = "lots"\n', "clients[0].rate"),
        ('expires = "2027-03-01"\n', "clients[0].expires"),
        ('allow = ["10.0.0.300/32"]\n', "clients[0].allow"),
    ]:
        setup.policy.write_text(text + line)
        with pytest.raises(ConfigError) as info:
            load_policy(setup.policy)
        assert info.value.key == key, line


def test_docs_cover_every_key_and_match_the_table() -> None:
    from appliance.config import policy as pol
    from appliance.config.settings import markdown

    doc = (Path(__file__).parents[2] / "docs/policy.md").read_text()
    assert doc == markdown(), "docs/policy.md is stale: run `qwen-appliance settings --markdown`"
    for s in SETTINGS:
        assert f"| `{s.key}` |" in doc, s.dotted
    fields = {f"server.{k}" for k in pol.ServerPolicy.__dataclass_fields__} - {"server.host", "server.port"}
    fields |= {f"model.{k}" for k in pol.ModelPolicy.__dataclass_fields__}
    fields |= {f"limits.{k}" for k in pol.LimitsPolicy.__dataclass_fields__}
    fields |= {f"clients.{k}" for k in pol.Client.__dataclass_fields__}
    fields |= {f"audit.{k}" for k in pol.AuditPolicy.__dataclass_fields__}
    fields |= {f"health.{k}" for k in pol.HealthPolicy.__dataclass_fields__}
    assert fields | {"server.listen"} == {s.dotted for s in SETTINGS}


def test_path_defaults_resolve_against_the_policy_folder(setup) -> None:  # type: ignore[no-untyped-def]
    text = setup.policy.read_text()
    start = text.index("[audit]")
    end = text.index("[[clients]]")
    setup.policy.write_text(text[:start] + text[end:])  # no [audit] section at all
    p = load_policy(setup.policy)
    assert p.audit.dir == setup.policy.parent.resolve() / "audit"
    assert p.audit.hmac_key_file == setup.policy.parent.resolve() / "audit.key"
    assert [str(n) for n in p.server.allow] == ["127.0.0.0/8", "::1/128"]
