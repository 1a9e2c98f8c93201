"""Issue 12: the settings table is the one declaration of a key, with its example and restart flag."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from appliance.admin.init import init
from appliance.config.load import load_policy
from appliance.config.policy import AuditPolicy, Policy, setting_value
from appliance.config.settings import SETTINGS, describe, markdown, restart_keys
from appliance.daemon.reload import RESTART_ONLY, PolicyReloader
from appliance.files import load_toml


def test_every_example_is_toml_for_its_own_key() -> None:
    for s in SETTINGS:
        assert set(load_toml(s.example_line)) == {s.key}, s.dotted
        assert f"e.g. {s.example_line}" in describe() and f"`{s.example_line}`" in markdown()


def test_the_reloader_takes_its_restart_keys_from_the_table() -> None:
    assert RESTART_ONLY == restart_keys() == tuple(s for s in SETTINGS if s.restart != "no")
    assert {s.dotted for s in RESTART_ONLY if s.restart == "raise"} == {"limits.max_body_bytes"}
    assert all(s.restart == "change" for s in SETTINGS if s.section in ("model", "audit"))


def _policy(tmp_path: Path, name: str, edits: dict[str, str]) -> Policy:
    setup = init(tmp_path / name, listen="127.0.0.1:9443", model=tmp_path / "m.gguf")
    text = setup.policy.read_text()
    for old, new in edits.items():
        assert old in text
        text = text.replace(old, new)
    setup.policy.write_text(text)
    return load_policy(setup.policy)


@pytest.mark.parametrize(
    ("edits", "warned"),
    [
        ({"n_ctx = 4096": "n_ctx = 8192", "max_tokens = 2048": "max_tokens = 100"}, {"[model] n_ctx"}),
        ({"max_body_bytes = 20_000_000": "max_body_bytes = 30_000_000"}, {"[limits] max_body_bytes"}),
        ({"max_body_bytes = 20_000_000": "max_body_bytes = 15_000_000"}, set()),  # lowering applies at once
        ({'fsync = "always"': 'fsync = "interval"'}, {"[audit] fsync"}),
        ({"127.0.0.1:9443": "127.0.0.1:9444"}, {"[server] listen"}),
    ],
)
def test_reload_warns_for_exactly_the_restart_keys_that_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, edits: dict[str, str], warned: set[str]
) -> None:
    old, new = _policy(tmp_path, "old", {}), _policy(tmp_path, "new", edits)
    with caplog.at_level(logging.WARNING, logger="appliance.daemon.reload"):
        PolicyReloader._warn_restart_only(old, new)
    said = {r.getMessage().split("policy: ")[1].split(" changed")[0] for r in caplog.records}
    # paths differ between the two set-ups (another folder): compare only what the edit touched
    said -= {
        f"[{s.section}] {s.key}"
        for s in RESTART_ONLY
        if isinstance(setting_value(old, s), Path) and setting_value(old, s) != setting_value(new, s)
    }
    assert said == warned


def test_a_section_with_table_defaults_is_the_section_a_file_without_those_keys_loads(tmp_path: Path) -> None:
    loaded = _policy(tmp_path, "s", {}).audit
    built = AuditPolicy.with_defaults(
        dir=loaded.dir, hmac_key_file=loaded.hmac_key_file, fsync=loaded.fsync
    )  # init writes fsync explicitly
    assert built == loaded
