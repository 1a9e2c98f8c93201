"""`qwen-appliance model ...` on real files: the tiny GGUF pair, a local stand-in Hub, hostile headers."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, TinyModel

from appliance.admin.cli import main
from appliance.admin.init import init
from appliance.models.gguf import ArraySummary, read_gguf_header
from appliance.models.install import MODELS_ENV, STAGING
from appliance.models.manifest import MANIFEST_CANDIDATES, MANIFEST_ENV, load_manifest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MANIFEST = ROOT / "models" / "manifest.toml"
REQUIRED = {"name", "repo", "file", "mmproj_file", "size", "sha256", "mmproj_size", "mmproj_sha256"}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def policy_keys(stdout: str) -> dict[str, str]:
    """The [model] table that import/pull print, parsed as the TOML it claims to be."""
    return dict(tomllib.loads(stdout)["model"])


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the real Hub or depend on the caller's environment."""
    for var in ("HF_HUB_OFFLINE", "HF_ENDPOINT", MODELS_ENV, MANIFEST_ENV):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture()
def models(tmp_path: Path) -> Path:
    return tmp_path / "models"


# --- the manifest -----------------------------------------------------------------------------------


def test_the_source_checkout_manifest_is_found_from_the_models_package() -> None:
    """appliance/models/manifest.py sits two levels below the root that holds models/manifest.toml."""
    assert MANIFEST_CANDIDATES[0] == MANIFEST.resolve()
    assert load_manifest().path == MANIFEST.resolve()


def test_manifest_entries_are_complete_unique_and_default_is_smallest_q4() -> None:
    raw = tomllib.loads(MANIFEST.read_text())["models"]
    for table in raw:
        assert set(table) >= REQUIRED, table.get("name")
    manifest = load_manifest(MANIFEST)
    names = [e.name for e in manifest.entries]
    assert len(names) == len(set(names)) == 6
    assert {e.repo for e in manifest.entries} == {f"Qwen/Qwen3-VL-{n}B-Instruct-GGUF" for n in (2, 4, 8)}
    assert [e.name for e in manifest.entries if e.default] == ["qwen3-vl-2b-instruct-q4_k_m"]
    for e in manifest.entries:
        assert e.mmproj.file.startswith("mmproj-") and e.mmproj.file.endswith("-F16.gguf")
        if e.name.endswith("q4_k_m"):  # published digests: all four values present
            assert len(e.model.sha256) == 64 and e.model.size and e.mmproj.size and len(e.mmproj.sha256) == 64


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.replace('name = "qwen3-vl-2b-instruct-q8_0"', 'name = "qwen3-vl-2b-instruct-q4_k_m"'),
            "duplicate model names",
        ),
        (lambda t: t.replace('sha256 = "089d', 'sha256 = "zz9d', 1), "64 hex digits"),
        (lambda t: t.replace("mmproj_size = 819394848\n", "", 1), "missing mmproj_size"),
        (
            lambda t: t.replace('file = "Qwen3VL-2B-Instruct-Q4_K_M.gguf"', 'file = "../evil.gguf"'),
            "not valid",
        ),
    ],
)
def test_a_broken_manifest_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Callable[[str], str], message: str
) -> None:
    bad = tmp_path / "manifest.toml"
    bad.write_text(edit(MANIFEST.read_text()))
    assert main(["model", "list", "--manifest", str(bad), "--models-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_list_shows_entries_default_and_digest_state(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["model", "list", "--models-dir", str(models)]) == 0
    out = capsys.readouterr().out
    assert "qwen3-vl-2b-instruct-q4_k_m *" in out and "qwen3-vl-8b-instruct-q8_0" in out
    assert "pin on install" in out and "published" in out


# --- import and verify -------------------------------------------------------------------------------


def test_import_unlisted_installs_read_only_and_prints_policy_lines(
    tiny_model: TinyModel, models: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(MODELS_ENV, str(models))  # the default when --models-dir is absent
    assert main(["model", "import", str(tiny_model.model), str(tiny_model.mmproj), "--unlisted"]) == 0
    keys = policy_keys(capsys.readouterr().out)
    assert keys == {
        "path": str(models / tiny_model.model.name),
        "mmproj": str(models / tiny_model.mmproj.name),
        "sha256": sha(tiny_model.model),
        "mmproj_sha256": sha(tiny_model.mmproj),
    }
    for name in (tiny_model.model.name, tiny_model.mmproj.name):
        assert stat.S_IMODE((models / name).stat().st_mode) == 0o444
    assert stat.S_IMODE(models.stat().st_mode) == 0o755
    pins = tomllib.loads((models / "pins.toml").read_text())
    assert pins[tiny_model.model.name]["sha256"] == sha(tiny_model.model)
    assert not (models / STAGING).exists()


def test_import_refuses_a_file_the_manifest_does_not_know(
    tiny_model: TinyModel, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["model", "import", str(tiny_model.model), "--models-dir", str(models)]) == 2
    assert "--unlisted" in capsys.readouterr().err
    assert not models.exists()


def test_import_refuses_a_listed_file_whose_digest_differs(
    tiny_model: TinyModel, tmp_path: Path, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = tmp_path / "usb" / "Qwen3VL-2B-Instruct-Q4_K_M.gguf"  # right name, wrong bytes
    fake.parent.mkdir()
    shutil.copy(tiny_model.model, fake)
    assert main(["model", "import", str(fake), "--models-dir", str(models)]) == 2
    err = capsys.readouterr().err
    assert "Qwen3VL-2B-Instruct-Q4_K_M.gguf" in err and "not installed" in err
    assert not list(models.rglob("*.gguf")) and not list(models.rglob("*.import"))
    assert not (models / "pins.toml").exists()


def write_manifest(path: Path, model: str = "", mmproj: str = "", repo: str = "org/repo") -> Path:
    """A one-entry manifest for the tiny pair; empty digests mean 'pin on first install'."""
    path.write_text(f'''[[models]]
name = "tiny"
repo = "{repo}"
file = "tiny-model.gguf"
size = ""
sha256 = "{model}"
mmproj_file = "tiny-mmproj.gguf"
mmproj_size = ""
mmproj_sha256 = "{mmproj}"
default = true
''')
    return path


def test_import_by_name_installs_under_manifest_names_and_enforces_the_pin(
    tiny_model: TinyModel, tmp_path: Path, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path / "manifest.toml")
    args = ["--name", "tiny", "--manifest", str(manifest), "--models-dir", str(models)]
    assert main(["model", "import", str(tiny_model.mmproj), str(tiny_model.model), *args]) == 0
    keys = policy_keys(capsys.readouterr().out)  # roles come from the GGUF header, not the order given
    assert keys["path"].endswith("tiny-model.gguf") and keys["sha256"] == sha(tiny_model.model)
    assert keys["mmproj"].endswith("tiny-mmproj.gguf") and keys["mmproj_sha256"] == sha(tiny_model.mmproj)
    other = tmp_path / "other"  # another build of "the same" model must not replace the pinned one
    subprocess.run(
        [sys.executable, str(ROOT / "tools/make_tiny_model.py"), str(other), "--seed", "7"],
        check=True,
        capture_output=True,
    )
    assert main(["model", "import", str(other / tiny_model.model.name), *args]) == 2
    err = capsys.readouterr().err
    assert "tiny-model.gguf: SHA-256 is" in err and "its pin in pins.toml" in err
    assert sha(models / "tiny-model.gguf") == sha(tiny_model.model)


def test_import_refuses_a_projector_under_the_model_name(
    tiny_model: TinyModel, tmp_path: Path, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path / "manifest.toml")  # no digests, so only the role can catch it
    swapped = tmp_path / "tiny-model.gguf"
    shutil.copy(tiny_model.mmproj, swapped)
    args = ["--manifest", str(manifest), "--models-dir", str(models)]
    assert main(["model", "import", str(swapped), *args]) == 2
    assert "vision projector" in capsys.readouterr().err
    assert not (models / "tiny-model.gguf").exists()


@pytest.fixture()
def installed(tiny_model: TinyModel, models: Path, capsys: pytest.CaptureFixture[str]) -> TinyModel:
    assert (
        main(
            [
                "model",
                "import",
                str(tiny_model.model),
                str(tiny_model.mmproj),
                "--unlisted",
                "--models-dir",
                str(models),
            ]
        )
        == 0
    )
    capsys.readouterr()
    return TinyModel(models / tiny_model.model.name, models / tiny_model.mmproj.name)


def flip_byte(path: Path, offset: int = -100) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_passes_then_names_a_file_with_a_flipped_byte(
    installed: TinyModel, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["model", "verify", "--models-dir", str(models)]) == 0
    assert "OK: 2 model files verified" in capsys.readouterr().out
    flip_byte(installed.mmproj)
    assert main(["model", "verify", "--models-dir", str(models)]) == 2
    out, err = capsys.readouterr()
    assert f"MISMATCH  {installed.mmproj}" in out and f"OK        {installed.model}" in out
    assert str(installed.mmproj) in err and str(installed.model) not in err


def test_verify_refuses_a_file_nothing_pins(
    installed: TinyModel, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(installed.model, models / "dropped-in.gguf")
    assert main(["model", "verify", "--models-dir", str(models)]) == 2
    assert "UNPINNED" in capsys.readouterr().out


def test_verify_against_the_policy_pins(
    installed: TinyModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = init(tmp_path / "setup", model=installed.model, mmproj=installed.mmproj)
    text = setup.policy.read_text()  # init pins both digests
    assert f'sha256 = "{sha(installed.model)}"' in text
    assert f'mmproj_sha256 = "{sha(installed.mmproj)}"' in text
    assert main(["model", "verify", "--policy", str(setup.policy)]) == 0
    assert capsys.readouterr().out.count("(policy)") == 2
    setup.policy.write_text(text.replace(sha(installed.model), "0" * 64, 1))
    assert main(["model", "verify", "--policy", str(setup.policy)]) == 2
    assert f"MISMATCH  {installed.model}" in capsys.readouterr().out


# --- info and hostile headers --------------------------------------------------------------------------


def test_info_shows_architecture_name_quantization_and_chat_template(
    tiny_model: TinyModel, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["model", "info", str(tiny_model.model)]) == 0
    out = capsys.readouterr().out
    for line in (
        "architecture     qwen3vl",
        "name             tiny-qwen3vl",
        "file type        Q8_0",
        "context length   4096",
        "<|im_start|>",
    ):
        assert line in out
    assert main(["model", "info", str(tiny_model.mmproj)]) == 0
    out = capsys.readouterr().out
    assert "architecture     clip" in out and "projector type   qwen3vl_merger" in out


def test_info_agrees_with_the_gguf_package(tiny_model: TinyModel) -> None:
    gguf = pytest.importorskip("gguf")
    for path in (tiny_model.model, tiny_model.mmproj):
        ours = read_gguf_header(path).metadata
        theirs = gguf.GGUFReader(path).fields
        assert set(ours) == {k for k in theirs if not k.startswith("GGUF.")}
        for key, value in ours.items():
            if isinstance(value, ArraySummary):
                assert value.count == len(theirs[key].data), key
            else:
                assert same(theirs[key].contents(), value), key


def same(theirs: Any, ours: Any) -> bool:
    """Equal, with float32 values compared as the float32 they were stored as."""
    if isinstance(ours, list):
        return isinstance(theirs, list) and len(theirs) == len(ours) and all(map(same, theirs, ours))
    if isinstance(ours, float):
        return bool(theirs == pytest.approx(ours, rel=1e-6))
    return type(theirs) is type(ours) and bool(theirs == ours)


def header(*, magic: bytes = b"GGUF", version: int = 3, tensors: int = 0, kvs: int = 1) -> bytes:
    return magic + struct.pack("<IQQ", version, tensors, kvs)


def key(name: bytes, vtype: int) -> bytes:
    return struct.pack("<Q", len(name)) + name + struct.pack("<I", vtype)


PAD = bytes(64)  # so each header gets past the earlier checks to the one it attacks
HOSTILE = {  # name: (bytes, the reason the error must give)
    "empty": (b"", "bad magic"),
    "bad magic": (b"GGML" + PAD, "bad magic"),
    "version 1": (header(version=1) + PAD, "unsupported GGUF version 1"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + PAD, "big-endian"),
    "huge kv count": (header(kvs=2**63) + PAD, "claims 9223372036854775808 metadata entries"),
    "huge key length": (header() + struct.pack("<Q", 2**62) + PAD, "key #1 claims"),
    "huge string value": (
        header() + key(b"general.name", 8) + struct.pack("<Q", 2**40) + PAD,
        "value of general.name claims",
    ),
    "huge array": (header() + key(b"a", 9) + struct.pack("<IQ", 4, 2**60) + PAD, "array claims"),
    "huge string array": (header() + key(b"a", 9) + struct.pack("<IQ", 8, 2**30) + PAD, "array claims"),
    "string array item": (
        header() + key(b"a", 9) + struct.pack("<IQ", 8, 17) + struct.pack("<Q", 2**50) + PAD * 3,
        "item of a claims",
    ),
    "nested array": (header() + key(b"a", 9) + struct.pack("<IQ", 9, 1) + PAD, "nested arrays"),
    "unknown type": (header() + key(b"a", 99) + PAD, "value type 99"),
    "bad utf-8 key": (header() + key(b"\xff\xfe", 4) + PAD, "not valid UTF-8"),
    "duplicate key": (header(kvs=2) + key(b"a", 4) + bytes(4) + key(b"a", 4) + PAD, "duplicate key"),
    "huge tensor count": (header(tensors=2**40) + key(b"a", 4) + bytes(4), "tensors"),
    "truncated scalar": (header() + key(b"general.alignment", 10) + bytes(4), "truncated"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_info_refuses_hostile_headers_cleanly(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, reason = HOSTILE[name]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    started = time.monotonic()
    assert main(["model", "info", str(path)]) == 2
    assert time.monotonic() - started < 2
    err = capsys.readouterr().err
    assert f"{path}: not a valid GGUF file" in err and reason in err, err
    assert "Traceback" not in err


def test_info_refuses_a_truncated_real_model(
    tiny_model: TinyModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for cut in (3, 20, 200, 5000):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(tiny_model.model.read_bytes()[:cut])
        assert main(["model", "info", str(path)]) == 2
        assert "not a valid GGUF file" in capsys.readouterr().err


def test_import_refuses_garbage_even_when_unlisted(
    tmp_path: Path, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x7fELF" + os.urandom(100))
    assert main(["model", "import", str(junk), "--unlisted", "--models-dir", str(models)]) == 2
    assert "not a valid GGUF file" in capsys.readouterr().err
    assert not (models / "junk.gguf").exists()


def test_info_escapes_terminal_control_characters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evil = b"\x1b]0;pwned\x07\xe2\x80\xae"  # OSC title escape and a right-to-left override
    path = tmp_path / "evil.gguf"
    path.write_bytes(header() + key(b"general.name", 8) + struct.pack("<Q", len(evil)) + evil)
    assert main(["model", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "\\u001b]0;pwned\\u0007\\u202e" in out


# --- pull ----------------------------------------------------------------------------------------------


def test_pull_with_hf_hub_offline_refuses_at_once_with_the_import_hint(
    models: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["model", "pull", "--models-dir", str(models)]) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and "model import" in err
    assert not models.exists()


def test_pull_from_an_unreachable_hub_fails_fast(models: Path) -> None:
    env = {**os.environ, "HF_ENDPOINT": "https://127.0.0.1:9"}  # closed loopback port
    env.pop("HF_HUB_OFFLINE", None)
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "model",
            "pull",
            "qwen3-vl-4b-instruct-q8_0",
            "--models-dir",
            str(models),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert time.monotonic() - started < 15
    assert proc.returncode == 2, proc.stderr
    assert "unreachable at https://127.0.0.1:9" in proc.stderr and "model import" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pull_refuses_an_unknown_name(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "pull", "qwen9-vl", "--models-dir", str(models)]) == 2
    assert "qwen3-vl-2b-instruct-q4_k_m" in capsys.readouterr().err


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Just enough of the Hub's /{repo}/resolve/{revision}/{file} for huggingface_hub to download."""

    files: dict[str, bytes] = {}  # noqa: RUF012 - set per test by the fixture

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        data = self.files.get(parts[-1]) if len(parts) == 5 and parts[2] == "resolve" else None
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        wanted = self.headers["Range"] if body else None  # resumed download: "bytes=N-"
        start = int(wanted.split("=")[1].split("-")[0]) if wanted else 0
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", "a" * 40)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if body:
            self.wfile.write(data[start:])


@pytest.fixture()
def fake_hub(tiny_model: TinyModel, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, bytes]]:
    files = {
        "tiny-model.gguf": tiny_model.model.read_bytes(),
        "tiny-mmproj.gguf": tiny_model.mmproj.read_bytes(),
    }
    handler = type("Hub", (_FakeHub,), {"files": files})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield files
    server.shutdown()
    server.server_close()


def test_pull_verifies_installs_read_only_and_pins_what_is_unpublished(
    fake_hub: dict[str, bytes],
    tiny_model: TinyModel,
    tmp_path: Path,
    models: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = write_manifest(tmp_path / "manifest.toml", model=sha(tiny_model.model))  # mmproj: pin it
    assert main(["model", "pull", "--manifest", str(manifest), "--models-dir", str(models)]) == 0
    out, err = capsys.readouterr()
    keys = policy_keys(out)
    assert keys["sha256"] == sha(tiny_model.model) and keys["mmproj_sha256"] == sha(tiny_model.mmproj)
    assert stat.S_IMODE((models / "tiny-model.gguf").stat().st_mode) == 0o444
    assert "pinned tiny-mmproj.gguf" in err and "pinned tiny-model.gguf" not in err
    assert set(tomllib.loads((models / "pins.toml").read_text())) == {"tiny-mmproj.gguf"}
    assert not (models / STAGING).exists()
    assert main(["model", "verify", "--manifest", str(manifest), "--models-dir", str(models)]) == 0
    assert main(["model", "pull", "--manifest", str(manifest), "--models-dir", str(models)]) == 0
    assert "already installed and verified" in capsys.readouterr().err


def test_pull_refuses_a_download_that_does_not_match_the_manifest(
    fake_hub: dict[str, bytes],
    tiny_model: TinyModel,
    tmp_path: Path,
    models: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = write_manifest(tmp_path / "manifest.toml", model="0" * 64, mmproj=sha(tiny_model.mmproj))
    assert main(["model", "pull", "--manifest", str(manifest), "--models-dir", str(models)]) == 2
    assert "tiny-model.gguf: SHA-256 is" in capsys.readouterr().err
    assert not (models / "tiny-model.gguf").exists()
    assert not list((models / STAGING).glob("*.gguf"))


def test_pull_names_a_file_missing_on_the_hub(
    fake_hub: dict[str, bytes], tmp_path: Path, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    del fake_hub["tiny-mmproj.gguf"]
    manifest = write_manifest(tmp_path / "manifest.toml")
    assert main(["model", "pull", "--manifest", str(manifest), "--models-dir", str(models)]) == 2
    assert "tiny-mmproj.gguf is not on the Hub" in capsys.readouterr().err
    assert not models.exists()  # nothing downloaded before every file was found


# --- boundaries ----------------------------------------------------------------------------------------


def test_model_admin_never_loads_llama_cpp() -> None:
    code = (
        "import sys, appliance.admin.cli, appliance.admin.model, appliance.models.install; "
        "sys.exit('llama_cpp' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
