"""Issue 11, defect 16: every secret or atomic write survives a file or symlink planted at its temp name.

The old `write_secret` reused `.NAME.tmp` with O_TRUNC: a planted 0666 file made the key world-readable, a
planted symlink wrote the key wherever it pointed. Each writer below is run against both plants.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance import files
from appliance.admin import cli
from appliance.admin.init import init
from appliance.client import profile as client
from appliance.models import pins as modelpins

Plant = Callable[[Path], None]
VICTIM = b"the attacker's file: must stay as it is\n"


def _plant_file(tmp: Path) -> None:
    tmp.write_bytes(b"planted")
    os.chmod(tmp, 0o666)  # noqa: S103 - the world-writable plant under test


def _plant_link(tmp: Path) -> None:
    os.symlink(tmp.parent / "victim", tmp)


PLANTS = {"world-writable file": _plant_file, "symlink": _plant_link}


def _plant(plant: Plant, *targets: Path) -> None:
    """A victim file and, at each target's legacy temp name, the plant (in folders made for it)."""
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.parent / "victim").write_bytes(VICTIM)
        plant(target.with_name(f".{target.name}.tmp"))


def _assert_safe(target: Path, mode: int, content: bytes | None = None) -> None:
    st = os.lstat(target)
    assert stat.S_ISREG(st.st_mode), f"{target} is not a regular file"
    assert stat.S_IMODE(st.st_mode) == mode, f"{target}: mode {stat.S_IMODE(st.st_mode):o}"
    if content is not None:
        assert target.read_bytes() == content
    assert (target.parent / "victim").read_bytes() == VICTIM, "written through the planted link"
    legacy = target.with_name(f".{target.name}.tmp")
    if legacy.is_symlink():
        assert os.readlink(legacy) == str(target.parent / "victim")
    else:
        assert legacy.read_bytes() == b"planted" and stat.S_IMODE(legacy.stat().st_mode) == 0o666
    assert not [
        p
        for p in target.parent.iterdir()  # no temp file of ours left behind
        if p.name.startswith(f".{target.name}.") and p.name.endswith(".tmp") and p != legacy
    ]


@pytest.mark.parametrize("plant", PLANTS.values(), ids=PLANTS.keys())
@pytest.mark.parametrize(("write", "mode"), [(files.write_secret, 0o600), (files.write_public, 0o644)])
def test_write_functions_ignore_a_planted_temp_file(
    tmp_path: Path, plant: Plant, write: Callable[[Path, bytes], None], mode: int
) -> None:
    target = tmp_path / "shared" / "server.key"
    _plant(plant, target)
    write(target, b"secret bytes")
    _assert_safe(target, mode, b"secret bytes")
    write(target, b"new bytes")  # replacing an existing file: same guarantees
    _assert_safe(target, mode, b"new bytes")


def test_write_secret_replaces_a_planted_link_at_the_final_name(tmp_path: Path) -> None:
    target = tmp_path / "k" / "audit.key"
    target.parent.mkdir()
    (target.parent / "victim").write_bytes(VICTIM)
    os.symlink(target.parent / "victim", target)
    files.write_secret(target, b"key")
    assert not target.is_symlink() and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert (target.parent / "victim").read_bytes() == VICTIM


def test_exact_mode_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        files.write_public(tmp_path / "ca.crt", b"cert")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ca.crt").stat().st_mode) == 0o644


@pytest.mark.parametrize("plant", PLANTS.values(), ids=PLANTS.keys())
def test_init_into_a_planted_folder(tmp_path: Path, plant: Plant) -> None:
    root = tmp_path / "setup"
    secrets_ = [
        root / "tls/ca.key",
        root / "tls/server.key",
        root / "clients/c1/client.key",
        root / "audit.key",
        tmp_path / "tok/token",
    ]
    public = [root / "tls/ca.crt", root / "policy.toml", root / "clients/c1/ca.crt"]
    _plant(plant, *secrets_, *public)
    init(root, client="c1", token_file=tmp_path / "tok/token")
    for path in secrets_:
        _assert_safe(path, 0o600)
    for path in public:
        _assert_safe(path, 0o644)


@pytest.mark.parametrize("plant", PLANTS.values(), ids=PLANTS.keys())
def test_admin_commands_with_planted_temp_files(
    tmp_path: Path, plant: Plant, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = init(tmp_path / "s", client="c1")
    tls, out = setup.policy.parent / "tls", tmp_path / "issued"
    key, p12, hmac_key = out / "bob.key", out / "bob.p12", tmp_path / "keys/new-audit.key"
    _plant(plant, key, out / "bob.crt", p12, out / "ca.crt", hmac_key, setup.policy)
    assert cli.main(["cert", "client", "bob", "--ca-dir", str(tls), "--out", str(out), "--p12"]) == 0
    assert cli.main(["audit", "keygen", str(hmac_key)]) == 0
    assert cli.main(["token", "create", "teller", "--policy", str(setup.policy)]) == 0
    capsys.readouterr()
    for path in (key, p12, hmac_key):
        _assert_safe(path, 0o600)
    for path in (out / "bob.crt", out / "ca.crt"):
        _assert_safe(path, 0o644)
    _assert_safe(setup.policy, 0o644)


@pytest.mark.parametrize("plant", PLANTS.values(), ids=PLANTS.keys())
def test_profile_and_pin_writes_with_planted_temp_files(tmp_path: Path, plant: Plant) -> None:
    profile, pins = tmp_path / "cfg/client.toml", tmp_path / "models" / modelpins.PINS_FILE
    _plant(plant, profile, pins)
    client.save_profile(
        profile, client.Profile(name="default", server="https://127.0.0.1:1", token="qa_secret_token")
    )
    modelpins.save_pin(pins.parent, "m.gguf", modelpins.Pin("0" * 64, 1, "test"))
    _assert_safe(profile, 0o600)
    _assert_safe(pins, 0o644)
