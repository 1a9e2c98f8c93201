"""Failure drills at start-up: broken model files and an audit directory that cannot be written.

Each ends in exit code 2 and a message naming the file and a hint, within a bound, never a hang or a crash.
Already covered elsewhere (not repeated here): missing model and invalid policy at start, unsafe file modes
and port in use (test_lifecycle.py, test_reload.py), audit path that is a file (test_audit_daemon.py), SIGTERM
mid-generation (test_lifecycle.py), SIGHUP storm under load (test_reload.py and test_load.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, TinyModel, free_port, make_setup
from helpers import run_cli

TOOL = ROOT / "tools" / "make_tiny_model.py"
Damage = Callable[[Path, Path], None]


def truncate(path: Path, _tmp: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def corrupt_header(path: Path, _tmp: Path) -> None:
    """GGUF magic intact, then garbage where the tensor and metadata counts are."""
    data = bytearray(path.read_bytes())
    data[8:64] = b"\xff" * 56
    path.write_bytes(bytes(data))


def corrupt_tensors(path: Path, _tmp: Path) -> None:
    """Header intact, tensor data overwritten (a bad copy): it loads, so only a pinned digest can tell."""
    data = bytearray(path.read_bytes())
    data[-4096:] = b"\x7f" * 4096
    path.write_bytes(bytes(data))


def not_gguf(path: Path, _tmp: Path) -> None:
    path.write_bytes(b"<html>404 Not Found</html>" * 100)


def remove(path: Path, _tmp: Path) -> None:
    path.unlink()


def mismatched(path: Path, tmp: Path) -> None:
    """A projector built for another model (128-wide output instead of 256), as test_engine.py makes it."""
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "import make_tiny_model as m; m.N_EMBD = 128;"
        "m.write_atomic(m.mmproj_writer(0), Path(sys.argv[2]))"
    )
    subprocess.run([sys.executable, "-c", code, str(TOOL.parent), str(path)], check=True, timeout=60)


CASES: list[tuple[str, str, Damage, str]] = [
    ("model", "truncated", truncate, "model"),
    ("model", "corrupt-header", corrupt_header, "model"),
    ("model", "not-gguf", not_gguf, "not a GGUF file"),
    ("model", "missing", remove, "not found"),
    ("mmproj", "truncated", truncate, "mmproj"),
    ("mmproj", "corrupt-header", corrupt_header, "mmproj"),
    ("mmproj", "not-gguf", not_gguf, "not a GGUF file"),
    ("mmproj", "missing", remove, "not found"),
    ("mmproj", "mismatched", mismatched, "mmproj"),
]


def copied_pair(tiny: TinyModel, dest: Path) -> TinyModel:
    dest.mkdir()
    pair = TinyModel(dest / tiny.model.name, dest / tiny.mmproj.name)
    pair.model.write_bytes(tiny.model.read_bytes())
    pair.mmproj.write_bytes(tiny.mmproj.read_bytes())
    return pair


def unpinned(policy: Path) -> None:
    """Drop `[model] sha256` pins, so that llama.cpp itself meets the damaged file (an admin may not pin)."""
    policy.write_text(re.sub(r"(?m)^(mmproj_)?sha256 = .*\n", "", policy.read_text()))


@pytest.mark.parametrize(
    ("which", "what", "damage", "words"), CASES, ids=[f"{w}-{n}" for w, n, _, _ in CASES]
)
@pytest.mark.parametrize("pinned", [False, True], ids=["unpinned", "pinned"])
def test_broken_model_files_fail_clearly(
    tmp_path: Path, tiny_model: TinyModel, which: str, what: str, damage: Damage, words: str, pinned: bool
) -> None:
    pair = copied_pair(tiny_model, tmp_path / "models")
    setup = make_setup(tmp_path / "s", pair, free_port())
    if not pinned:
        unpinned(setup.policy)
    target = pair.model if which == "model" else pair.mmproj
    damage(target, tmp_path)
    r = run_cli("serve", "--policy", str(setup.policy), timeout=90)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert words in r.stderr and str(target) in r.stderr and "hint" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr


def test_tampered_tensor_data_is_caught_by_the_pinned_digest(tmp_path: Path, tiny_model: TinyModel) -> None:
    """A damaged copy that llama.cpp would load anyway is refused when the policy pins the digest."""
    from appliance.files import sha256_file

    pair = copied_pair(tiny_model, tmp_path / "models")
    pin = sha256_file(pair.model)
    setup = make_setup(tmp_path / "s", pair, free_port())
    unpinned(setup.policy)
    setup.policy.write_text(
        setup.policy.read_text().replace("n_gpu_layers = -1", f'sha256 = "{pin}"\nn_gpu_layers = -1', 1)
    )
    corrupt_tensors(pair.model, tmp_path)
    r = run_cli("serve", "--policy", str(setup.policy), timeout=90)
    assert r.returncode == 2 and f"pins {pin}" in r.stderr and "hint" in r.stderr, r.stderr[-2000:]


def test_read_only_audit_directory_stops_start_up(tmp_path: Path, tiny_model: TinyModel) -> None:
    """The audit folder on a read-only file system (we are root, so modes alone would not stop us)."""
    setup = make_setup(tmp_path / "s", tiny_model, free_port())
    audit = setup.policy.parent / "audit"
    audit.mkdir(exist_ok=True)
    script = (
        f"mount -t tmpfs -o ro none {audit} && exec {sys.executable} -m appliance serve "
        f"--policy {setup.policy}"
    )
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=90, cwd=ROOT
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "audit trail cannot be written" in r.stderr and "Read-only file system" in r.stderr
    assert "hint" in r.stderr and "Traceback" not in r.stderr
