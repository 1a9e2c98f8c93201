"""Issue 11, defects 12 and 15: a policy written in place is never loaded half-written, and trusted files
(policy, certificates, keys) whose owner, folders or links another user controls are refused at start
and at reload.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import DaemonFactory, TinyModel, add_client, free_port, make_setup
from helpers import run_cli, wait_for

from appliance.admin.init import InitResult
from appliance.config.load import load_policy
from appliance.config.trusted import check_file_modes
from appliance.daemon.reload import PolicyReloader
from appliance.errors import ConfigError

NOBODY = 65534


@pytest.fixture
def setup(tmp_path: Path, tiny_model: TinyModel) -> InitResult:
    return make_setup(tmp_path / "s", tiny_model, free_port())


def refused(setup: InitResult, *needles: str) -> str:
    with pytest.raises(ConfigError) as info:
        check_file_modes(load_policy(setup.policy))
    text = str(info.value)
    for needle in needles:
        assert needle in text, text
    return text


# --- defect 15: owners, folders and links ------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["policy.toml", "tls/server.crt", "tls/server.key", "tls/ca.crt", "audit.key"]
)
def test_trusted_file_owned_by_another_user_refused(setup: InitResult, name: str) -> None:
    check_file_modes(load_policy(setup.policy))
    path = setup.policy.parent / name
    os.chown(path, NOBODY, NOBODY)
    refused(setup, str(path), f"owned by {NOBODY}", f"chown root {path}")


def test_folder_owned_or_writable_by_others_refused(setup: InitResult) -> None:
    tls = setup.policy.parent / "tls"
    os.chown(tls, NOBODY, -1)
    refused(setup, f"{tls}: the folder", "server.tls_key")
    os.chown(tls, 0, -1)
    os.chmod(tls, 0o770)  # noqa: S103 - the unsafe mode under test
    refused(setup, f"{tls}: folder writable by group or others", f"chmod go-w {tls}")
    os.chmod(tls, 0o700)
    os.chmod(setup.policy.parent.parent, 0o777)  # noqa: S103 - a grandparent anyone can write
    refused(setup, f"{setup.policy.parent.parent}: folder writable")
    os.chmod(setup.policy.parent.parent, 0o700)
    check_file_modes(load_policy(setup.policy))


def test_sticky_folder_only_above_the_files_own(setup: InitResult, tmp_path: Path) -> None:
    """/tmp-like folders: fine above (nobody can rename our entries), refused as the file's own folder."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    os.chmod(shared, 0o1777)  # noqa: S103 - a /tmp-like folder
    (shared / "mine").mkdir(mode=0o700)
    os.replace(setup.policy.parent, shared / "mine" / "s")
    policy = shared / "mine" / "s" / "policy.toml"
    check_file_modes(load_policy(policy))
    os.replace(policy, shared / "policy.toml")
    with pytest.raises(ConfigError, match="folder writable by group or others"):
        check_file_modes(load_policy(shared / "policy.toml"))


def test_links_on_the_way_are_checked(setup: InitResult, tmp_path: Path) -> None:
    """A link owned by another user, or pointing into a folder others can write, is refused."""
    link = tmp_path / "policy-link.toml"
    os.symlink(setup.policy, link)
    check_file_modes(load_policy(link))
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"{link}: the symbolic link .* owned by {NOBODY}"):
        check_file_modes(load_policy(link))
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)  # noqa: S103 - the unsafe folder under test
    key = setup.policy.parent / "tls/server.key"
    os.replace(key, open_dir / "server.key")
    os.symlink(open_dir / "server.key", key)
    refused(setup, f"{open_dir}: folder writable", "server.tls_key")


def test_serve_refuses_a_foreign_owner_at_start(setup: InitResult) -> None:
    os.chown(setup.policy, NOBODY, NOBODY)
    r = run_cli("serve", "--policy", str(setup.policy))
    assert r.returncode == 2 and f"owned by {NOBODY}" in r.stderr and "chown root" in r.stderr


# --- defect 12: half-written policies ----------------------------------------------------------------


def _halves(policy: Path) -> tuple[str, str]:
    """(prefix, full): carol is confined to 127.0.0.2 in the old and full file; the prefix, which loads on
    its own, has lost that line and would let her in from 127.0.0.1."""
    old = policy.read_text()
    full = old + "# edited in place\n"
    cut = full.index('allow = ["127.0.0.2/32"]')
    prefix = full[:cut]
    load_policy_text = policy.with_name("prefix.toml")
    load_policy_text.write_text(prefix)
    assert not next(c for c in load_policy(load_policy_text).clients if c.name == "carol").allow
    load_policy_text.unlink()
    return prefix, full


def _write_in_place(policy: Path, prefix: str, full: str, pause: float) -> None:
    """One open, two writes, a pause between: what a slow editor or a `cat > policy.toml` does."""
    with policy.open("w") as f:
        f.write(prefix)
        f.flush()
        time.sleep(pause)
        f.write(full[len(prefix) :])


class _KeepTLS:
    """Stands in for the daemon's TLS holder: this test is about the policy file only."""

    def replace(self, *_args: object) -> None:
        pass


@pytest.mark.parametrize(("inotify", "pause"), [(True, 2.5), (False, 0.5)])
def test_watcher_never_loads_a_prefix(setup: InitResult, inotify: bool, pause: float) -> None:
    add_client(setup.policy, "carol", allow='["127.0.0.2/32"]')
    prefix, full = _halves(setup.policy)
    policy = load_policy(setup.policy)
    applied: list[str] = []
    reloader = PolicyReloader(policy, _KeepTLS(), lambda p: applied.append(p.digest))  # type: ignore[arg-type]

    async def run() -> None:
        task = asyncio.create_task(reloader.watch(inotify=inotify))
        await asyncio.sleep(0.3)
        writer = threading.Thread(target=_write_in_place, args=(setup.policy, prefix, full, pause))
        writer.start()
        deadline = time.monotonic() + pause + 5
        while not applied and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        writer.join()
        task.cancel()

    asyncio.run(run())
    assert applied == [load_policy(setup.policy).digest], "the half-written file was applied"
    assert reloader.rejected == 0


def test_daemon_enforces_the_old_policy_while_the_file_is_half_written(daemon_factory: DaemonFactory) -> None:
    carol: dict[str, str] = {}
    d = daemon_factory(
        prepare=lambda s: carol.update(
            token=add_client(s.policy, "carol", ("models",), allow='["127.0.0.2/32"]')
        )
    )
    prefix, full = _halves(d.setup.policy)
    writer = threading.Thread(target=_write_in_place, args=(d.setup.policy, prefix, full, 3.0))
    codes = []
    with d.client(token=carol["token"]) as c:
        writer.start()
        while writer.is_alive():
            codes.append(c.get("/v1/models").status_code)
            time.sleep(0.1)
        writer.join()
        assert wait_for(lambda: "(file changed) accepted" in d.log(), timeout=10)
        codes.append(c.get("/v1/models").status_code)
    assert codes and set(codes) == {403}, codes
    assert d.log().count("(file changed) accepted") == 1
    prefix_digest = hashlib.sha256(prefix.encode()).hexdigest()
    trail = "".join(p.read_text() for p in (d.setup.policy.parent / "audit").glob("*.jsonl"))
    assert prefix_digest not in trail and hashlib.sha256(full.encode()).hexdigest() in trail


def test_reload_refuses_a_foreign_owned_folder(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    token = add_client(d.setup.policy, "late", ("models",))
    os.chown(d.setup.policy.parent / "tls", NOBODY, -1)
    assert wait_for(lambda: "REJECTED" in d.log(), timeout=10)
    assert f"owned by {NOBODY}" in d.log()
    with d.client(token=token) as c:
        assert c.get("/v1/models").status_code == 401  # the new client never got in
