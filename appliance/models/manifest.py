"""models/manifest.toml: the known-good GGUF pairs, validated so a doubtful value is an error, not a guess."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import files
from appliance.errors import SetupError

MANIFEST_ENV = "QWEN_APPLIANCE_MANIFEST"
# A source checkout (editable install: appliance/models/ -> the repository root), then an installed tree whose
# venv sits in the app dir (/opt/qwen-appliance/.venv -> /opt/qwen-appliance/models/manifest.toml).
MANIFEST_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "models" / "manifest.toml",
    Path(sys.prefix).parent / "models" / "manifest.toml",
)
HEX64 = re.compile(r"[0-9a-f]{64}")
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,200}\.gguf")
_ENTRY_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
_REQUIRED = ("name", "repo", "file", "mmproj_file", "size", "sha256", "mmproj_size", "mmproj_sha256")


@dataclass(frozen=True)
class FileSpec:
    """One published file: its name, and the size and digest it must have ('' / None = pin on install)."""

    file: str
    size: int | None
    sha256: str
    role: str  # "model" or "mmproj"


@dataclass(frozen=True)
class Entry:
    """A text model and its vision projector, as published together in one Hub repository."""

    name: str
    repo: str
    revision: str
    model: FileSpec
    mmproj: FileSpec
    default: bool

    @property
    def files(self) -> tuple[FileSpec, FileSpec]:
        return (self.model, self.mmproj)


@dataclass(frozen=True)
class Manifest:
    """The known-good models; file names are unique per digest, so a file can be looked up by name."""

    path: Path
    entries: tuple[Entry, ...]

    def entry(self, name: str | None) -> Entry:
        """The entry called `name`, or the default one when name is None."""
        for e in self.entries:
            if e.name == name or (name is None and e.default):
                return e
        names = ", ".join(e.name for e in self.entries)
        what = f"no model called {name!r}" if name else "no default model"
        raise SetupError(f"{self.path}: {what}", hint=f"known models: {names}")

    def by_file(self, file: str) -> tuple[Entry, FileSpec] | None:
        """The first entry that publishes a file of this name, with that file's spec."""
        for e in self.entries:
            for spec in e.files:
                if spec.file == file:
                    return e, spec
        return None


def manifest_path(given: Path | None) -> Path:
    """--manifest, else $QWEN_APPLIANCE_MANIFEST, else the first models/manifest.toml that exists."""
    if given or os.environ.get(MANIFEST_ENV):
        return given or Path(os.environ[MANIFEST_ENV])
    return next((p for p in MANIFEST_CANDIDATES if p.is_file()), MANIFEST_CANDIDATES[0])


def load_manifest(given: Path | None = None) -> Manifest:
    """Parse and validate the manifest; any doubtful value is an error, never a guess."""
    path = manifest_path(given)
    looked = " and ".join(dict.fromkeys(str(p) for p in MANIFEST_CANDIDATES))
    doc = read_toml(
        path, "model manifest", hint=f"pass --manifest FILE or set ${MANIFEST_ENV} (looked in {looked})"
    )
    tables = doc.get("models")
    if not isinstance(tables, list) or not tables:
        raise SetupError(f"{path}: no [[models]] entries", hint="see models/manifest.toml in the source")
    entries = tuple(_entry(f"{path}: [[models]] #{i + 1}", t) for i, t in enumerate(tables))
    _check_manifest(path, entries)
    return Manifest(path, entries)


def read_toml(path: Path, what: str, hint: str) -> dict[str, Any]:
    """A TOML file the model commands trust (manifest, pins): unreadable or invalid is a SetupError."""
    try:
        return files.load_toml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SetupError(f"{what} not found: {path}", hint=hint) from None
    except (OSError, UnicodeDecodeError, files.TOMLDecodeError) as e:
        raise SetupError(f"{path}: cannot read the {what}: {e}", hint=hint) from None


def _entry(where: str, table: Any) -> Entry:
    if not isinstance(table, dict):
        raise SetupError(f"{where}: not a table")
    missing = [k for k in _REQUIRED if k not in table]
    if missing:
        raise SetupError(
            f"{where}: missing {', '.join(missing)}", hint=f"every entry needs {', '.join(_REQUIRED)}"
        )
    default = table.get("default", False)
    if not isinstance(default, bool):
        raise SetupError(f"{where}: default must be true or false")
    return Entry(
        name=_text(where, table, "name", _ENTRY_NAME),
        repo=_text(where, table, "repo", _REPO),
        revision=_text(where, table, "revision", _REVISION, optional=True),
        model=FileSpec(
            _text(where, table, "file", FILE_NAME),
            _size(where, table, "size"),
            _digest(where, table, "sha256"),
            "model",
        ),
        mmproj=FileSpec(
            _text(where, table, "mmproj_file", FILE_NAME),
            _size(where, table, "mmproj_size"),
            _digest(where, table, "mmproj_sha256"),
            "mmproj",
        ),
        default=default,
    )


def _text(
    where: str, table: dict[str, Any], key: str, pattern: re.Pattern[str], optional: bool = False
) -> str:
    value = table.get(key, "")
    if optional and value == "":
        return ""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise SetupError(f"{where}: {key} = {value!r} is not valid", hint=f"expected {pattern.pattern}")
    return value


def _size(where: str, table: dict[str, Any], key: str) -> int | None:
    value = table[key]
    if value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SetupError(f'{where}: {key} must be a byte count or "" (unknown)')
    return value


def _digest(where: str, table: dict[str, Any], key: str) -> str:
    value = table[key]
    if not isinstance(value, str) or not (value == "" or HEX64.fullmatch(value.lower())):
        raise SetupError(f'{where}: {key} must be 64 hex digits or "" (pin on first install)')
    return value.lower()


def _check_manifest(path: Path, entries: tuple[Entry, ...]) -> None:
    """Unique names, at most one default, and one size/digest per file name wherever it appears."""
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SetupError(f"{path}: duplicate model names: {', '.join(dupes)}")
    if sum(e.default for e in entries) > 1:
        raise SetupError(f"{path}: more than one entry has default = true")
    seen: dict[str, FileSpec] = {}
    for spec in (s for e in entries for s in e.files):
        other = seen.setdefault(spec.file, spec)
        if (other.size, other.sha256) != (spec.size, spec.sha256):
            raise SetupError(f"{path}: {spec.file} is listed with different sizes or digests")
