"""appliance.files, the one owner of file digests and TOML reading, on the Python declared (3.10+)."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest

from appliance import files

ROOT = Path(__file__).resolve().parents[1]


def test_sha256_file_streams_whole_files_and_bounded_prefixes(tmp_path: Path) -> None:
    data = bytes(range(256)) * (3 * files.CHUNK // 256 + 7)  # several chunks and a partial one
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert files.sha256_file(path) == hashlib.sha256(data).hexdigest()
    prefix = data[: files.CHUNK + 5]
    assert files.sha256_file(str(path), limit=len(prefix)) == hashlib.sha256(prefix).hexdigest()
    assert files.sha256_file(path, limit=0) == hashlib.sha256(b"").hexdigest()
    with pytest.raises(FileNotFoundError):
        files.sha256_file(tmp_path / "missing")


def test_no_module_uses_what_python_310_lacks() -> None:
    """Issue 12 defect: `hashlib.file_digest` is 3.11+, while requires-python says 3.10."""
    used = [
        f"{p.relative_to(ROOT)}:{n.lineno}"
        for p in sorted((ROOT / "appliance").rglob("*.py"))
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.Attribute) and n.attr == "file_digest"
    ]
    assert not used
    assert 'requires-python = ">=3.10"' in (ROOT / "pyproject.toml").read_text()


def test_one_toml_reader() -> None:
    assert files.load_toml('a = 1\n[b]\nc = "d"\n') == {"a": 1, "b": {"c": "d"}}
    with pytest.raises(files.TOMLDecodeError):
        files.load_toml("a = ")
    shims = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "appliance").rglob("*.py"))
        if "import tomli" in p.read_text() and p.name != "files.py"
    ]
    assert not shims
