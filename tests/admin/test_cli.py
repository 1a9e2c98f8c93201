"""The `qwen-appliance` entry point: a closed pipe ends any command quietly; hints name real commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from appliance.admin.init import InitResult, init
from appliance.config import edit
from appliance.errors import SetupError

SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a tool stopped by a closed pipe


@pytest.fixture
def setup(tmp_path: Path) -> InitResult:
    return init(tmp_path / "s", model=tmp_path / "m.gguf")


def run_into_closed_pipe(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI with stdout a real pipe whose reader is already gone, as in `qwen-appliance ... | head`."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run(
            [sys.executable, "-m", "appliance", *argv],
            stdout=writer,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
    finally:
        os.close(writer)


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (("settings",), SIGPIPE_EXIT),
        (("settings", "--markdown"), SIGPIPE_EXIT),
        (("token", "list"), SIGPIPE_EXIT),  # output small enough to sit in the buffer until the final flush
        (("--help",), 0),  # argparse itself ignores a failed write of the help and exits 0
    ],
    ids=["settings", "markdown", "short-output", "help"],
)
def test_a_reader_that_goes_away_ends_the_command_quietly(
    argv: tuple[str, ...], code: int, setup: InitResult
) -> None:
    extra = ("--policy", str(setup.policy)) if argv[0] == "token" else ()
    proc = run_into_closed_pipe(*argv, *extra)
    assert proc.stderr == b""  # no BrokenPipeError traceback, no "Exception ignored" at exit
    assert proc.returncode == code


def test_output_through_head_is_cut_without_a_traceback() -> None:
    """The reported case: `qwen-appliance settings | head -1` through a shell."""
    proc = subprocess.run(
        [
            "bash",
            "-c",
            f'"{sys.executable}" -m appliance settings | head -1; echo "status=${{PIPESTATUS[0]}}" >&2',
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert proc.stdout.startswith("server.listen") and proc.stdout.count("\n") == 1
    assert re.fullmatch(r"status=(0|141)\n", proc.stderr), proc.stderr


def test_an_unsafe_edit_names_the_policy_check_command(setup: InitResult) -> None:
    """A splice that would not give the intended document is refused; the hint names `policy check FILE`."""
    text = edit.read_text(setup.policy)
    doc = edit.parse(setup.policy, text)
    with pytest.raises(SetupError) as caught:
        edit.append_client(setup.policy, text, {**doc, "unexpected": True}, {"name": "x", "scopes": ["chat"]})
    hint = f"make the change by hand, then run `qwen-appliance policy check {setup.policy}`"
    assert caught.value.hint == hint
    assert setup.policy.read_text() == text


def test_no_hint_names_a_command_that_does_not_exist() -> None:
    """`qwen-appliance check` is now `qwen-appliance policy check`: no message or doc names the old one."""
    stale = re.compile(r"qwen-appliance check\b")
    paths = [
        *(ROOT / "appliance").rglob("*.py"),
        *(ROOT / "docs").rglob("*.md"),
        ROOT / "README.md",
        *(ROOT / "systemd").rglob("*"),
        *(ROOT / "tools").rglob("*.py"),
    ]
    hits = [
        str(p.relative_to(ROOT))
        for p in paths
        if p.is_file() and stale.search(p.read_text(encoding="utf-8", errors="replace"))
    ]
    assert hits == []
