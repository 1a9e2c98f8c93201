"""`qwen-appliance token create|list|revoke` edit policy.toml safely (appliance.config.edit underneath).

Every command runs through the real entry point (`appliance.admin.cli.main`, once as a subprocess);
no GPU needed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_main as cli

from appliance.admin.init import InitResult, init
from appliance.config.load import load_policy
from appliance.security.tokens import find_client, token_digest

ROOT = Path(__file__).resolve().parents[2]
TODAY = dt.datetime.now(dt.timezone.utc).date()
FP = "AB:" * 31 + "AB"  # a fingerprint as openssl prints it


@pytest.fixture
def setup(tmp_path: Path) -> InitResult:
    return init(tmp_path / "s", model=tmp_path / "m.gguf")


def create(capsys: pytest.CaptureFixture[str], policy: Path, name: str, *extra: str) -> dict[str, str]:
    rc, out, err = cli(capsys, "token", "create", name, "--policy", policy, "--json", *extra)
    assert rc == 0, err
    result: dict[str, str] = json.loads(out)
    return result


# --- token create ---------------------------------------------------------------------------------


def test_create_prints_token_once_and_appends_only_its_digest(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    before = setup.policy.read_text()
    rc, out, _ = cli(capsys, "token", "create", "teller-03", "--policy", setup.policy)
    assert rc == 0
    token = re.search(r"qwa_[A-Za-z0-9_-]{43}", out).group(0)  # type: ignore[union-attr]
    assert out.count(token) == 1 and "only this once" in out and "systemctl reload" in out
    after = setup.policy.read_text()
    assert after.startswith(before)  # every byte the admin had is still there, in place
    assert token not in after and token_digest(token) in after
    added = after[len(before) :]
    assert (
        added == f'\n[[clients]]\nname = "teller-03"\ntoken_sha256 = "{token_digest(token)}"\n'
        'scopes = ["chat"]\n'
    )
    client = find_client(load_policy(setup.policy).clients, token)
    assert client is not None and client.name == "teller-03" and client.scopes == {"chat"}


def test_create_with_every_option_is_what_load_policy_sees(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    got = create(
        capsys,
        setup.policy,
        "teller-04",
        "--scope",
        "chat",
        "--scope",
        "models",
        "--expires",
        "2031-03-01",
        "--allow",
        "127.0.0.1",
        "--allow",
        "::1/128",
        "--cert-cn",
        "teller-04",
        "--cert-sha256",
        FP,
        "--rate",
        "60/minute",
        "--max-concurrent",
        "2",
    )
    assert got["name"] == "teller-04" and got["scopes"] == ["chat", "models"]
    assert got["expires"] == "2031-03-01"
    text = setup.policy.read_text()
    assert "expires = 2031-03-01\n" in text  # a TOML date, not a string
    client = find_client(load_policy(setup.policy).clients, got["token"])
    assert client is not None
    assert client.scopes == {"chat", "models"}
    assert client.allow == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
    assert client.cert_cn == "teller-04"
    assert client.cert_sha256 == "ab" * 32
    assert client.expires == dt.date(2031, 3, 1)
    assert str(client.rate) == "60/minute"
    assert client.max_concurrent == 2
    assert client.disabled is False


def test_expires_in_days_counts_from_today_utc(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    got = create(capsys, setup.policy, "short", "--expires", "90d")
    assert got["expires"] == (TODAY + dt.timedelta(days=90)).isoformat()


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["client-01"], "clients.name"),  # init's client: duplicate
        (["bad name"], "clients.name"),
        ([".x"], "clients.name"),
        (["x" * 65], "clients.name"),
        (["ok\n"], "clients.name"),
        (["ok", "--scope", "root"], "clients.scopes"),
        (["ok", "--allow", "10.0.0.300/24"], "clients.allow"),
        (["ok", "--allow", "127.0.0.1/8"], "clients.allow"),  # host bits set
        (["ok", "--expires", "2027-02-30"], "clients.expires"),
        (["ok", "--expires", "soon"], "clients.expires"),
        (["ok", "--expires", "0d"], "clients.expires"),
        (["ok", "--expires", "2020-01-01"], "clients.expires"),
        (["ok", "--rate", "60/fortnight"], "clients.rate"),
        (["ok", "--rate", "0/minute"], "clients.rate"),
        (["ok", "--rate", "fast"], "clients.rate"),
        (["ok", "--cert-sha256", "abc"], "clients.cert_sha256"),
        (["ok", "--max-concurrent", "0"], "clients.max_concurrent"),
    ],
)
def test_create_refusals_name_file_and_key_and_leave_file_alone(  # type: ignore[no-untyped-def]
    setup: InitResult, capsys, args: list[str], key: str
) -> None:
    before = setup.policy.read_bytes()
    rc, out, err = cli(capsys, "token", "create", *args, "--policy", setup.policy)
    assert rc == 2 and out == ""  # no token is shown for a client that was not added
    assert f"{setup.policy}: [{key}]" in err and "(hint: " in err
    assert setup.policy.read_bytes() == before


def test_create_refused_by_load_policy_keeps_old_file_and_leaves_no_temp(  # type: ignore[no-untyped-def]
    setup: InitResult, capsys
) -> None:
    before = setup.policy.read_bytes()
    rc, out, err = cli(capsys, "token", "create", "far", "--allow", "10.9.0.0/16", "--policy", setup.policy)
    assert rc == 2 and out == ""
    assert "outside [server] allow" in err and str(setup.policy) in err and "not changed" in err
    assert setup.policy.read_bytes() == before
    assert sorted(p.name for p in setup.policy.parent.iterdir() if p.name.startswith(".")) == []


def test_create_refuses_a_policy_others_can_write_and_keeps_mode(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    setup.policy.chmod(0o664)
    rc, out, err = cli(capsys, "token", "create", "x", "--policy", setup.policy)
    assert rc == 2 and out == "" and "chmod go-w" in err
    setup.policy.chmod(0o640)
    create(capsys, setup.policy, "x")
    assert stat.S_IMODE(setup.policy.stat().st_mode) == 0o640


def test_create_via_subprocess(setup: InitResult) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "token",
            "create",
            "sub",
            "--json",
            "--scope",
            "models",
            "--policy",
            str(setup.policy),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["scopes"] == ["models"] and got["expires"] is None
    assert token_digest(got["token"]) in setup.policy.read_text()


# --- token list / revoke --------------------------------------------------------------------------


def test_list_shows_bindings_and_expiry_but_no_secret(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    token = create(
        capsys,
        setup.policy,
        "bound",
        "--cert-cn",
        "bound",
        "--cert-sha256",
        FP,
        "--allow",
        "127.0.0.0/24",
        "--rate",
        "5/second",
    )["token"]
    with setup.policy.open("a") as f:  # an old client, past its date and switched off
        f.write(
            f'\n[[clients]]\nname = "old"\ntoken_sha256 = "{"c" * 64}"\nexpires = 2020-01-01\n'
            "disabled = true\n"
        )
    rc, out, _ = cli(capsys, "token", "list", "--policy", setup.policy)
    assert rc == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "2020-01-01 EXPIRED" in lines["old"] and " yes " in lines["old"]
    assert "CN=bound" in lines["bound"] and "sha256=abababab…" in lines["bound"]
    assert "127.0.0.0/24" in lines["bound"] and "5/second" in lines["bound"]
    rc, js, _ = cli(capsys, "token", "list", "--policy", setup.policy, "--json")
    rows = {r["name"]: r for r in json.loads(js)}
    assert rows["old"]["expired"] is True and rows["old"]["disabled"] is True
    assert rows["bound"]["cert_sha256_prefix"] == "abababab"
    for text in (out, js):
        assert token not in text and not re.search(r"[0-9a-fA-F]{9,}", text)


def test_revoke_removes_only_that_table(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    original = setup.policy.read_text()
    create(capsys, setup.policy, "a")
    with_a = setup.policy.read_text()
    create(capsys, setup.policy, "b")
    b_table = setup.policy.read_text()[len(with_a) :]
    rc, out, _ = cli(capsys, "token", "revoke", "a", "--policy", setup.policy)
    assert rc == 0 and "systemctl reload qwen-appliance" in out
    assert setup.policy.read_text() == original + b_table
    assert cli(capsys, "token", "revoke", "b", "--policy", setup.policy)[0] == 0
    assert setup.policy.read_text() == original  # create + revoke is a byte-exact round trip
    assert [c.name for c in load_policy(setup.policy).clients] == ["client-01"]


def test_revoke_keeps_the_admins_comments_around_other_tables(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    create(capsys, setup.policy, "a")
    text = setup.policy.read_text().replace(
        '[[clients]]\nname = "a"', '# teller a, ticket 4711\n[[clients]]\nname = "a"'
    )
    text += (
        '\n# kept: about the future\n\n# teller b\n[[clients]]\nname = "b"\n'
        f'token_sha256 = "{"d" * 64}"\nscopes = ["chat",\n  "models"]   # two\n'
    )
    setup.policy.write_text(text)
    assert cli(capsys, "token", "revoke", "a", "--policy", setup.policy)[0] == 0
    after = setup.policy.read_text()
    assert "ticket 4711" not in after and 'name = "a"' not in after
    a_end = text.index('scopes = ["chat"]\n', text.index('name = "a"')) + len('scopes = ["chat"]\n')
    assert after == text[: text.index("\n# teller a")] + text[a_end:]
    assert cli(capsys, "token", "revoke", "b", "--policy", setup.policy)[0] == 0
    assert "# kept: about the future" in setup.policy.read_text()
    assert "# teller b" not in setup.policy.read_text()


def test_revoke_leaves_a_comment_glued_to_the_next_table(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    original = setup.policy.read_text()
    create(capsys, setup.policy, "a")
    create(capsys, setup.policy, "b")
    text = setup.policy.read_text().replace(
        '\n\n[[clients]]\nname = "b"', '\n# teller b\n[[clients]]\nname = "b"'
    )
    setup.policy.write_text(text)
    assert cli(capsys, "token", "revoke", "a", "--policy", setup.policy)[0] == 0
    assert setup.policy.read_text() == original + "\n" + text[text.index("# teller b") :]


def test_revoke_refusals(setup: InitResult, capsys) -> None:  # type: ignore[no-untyped-def]
    before = setup.policy.read_bytes()
    rc, _, err = cli(capsys, "token", "revoke", "nobody", "--policy", setup.policy)
    assert rc == 2 and "no client named 'nobody'" in err and "[clients.name]" in err
    rc, _, err = cli(capsys, "token", "revoke", "client-01", "--policy", setup.policy)
    assert rc == 2 and "only client" in err and "hint:" in err
    assert setup.policy.read_bytes() == before
