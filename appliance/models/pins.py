"""<models_dir>/pins.toml: digests recorded on first install of files the manifest publishes none for."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import tomlkit

from appliance import files
from appliance.errors import SetupError
from appliance.models.manifest import HEX64, Manifest, read_toml

PINS_FILE = "pins.toml"
# Who vouches for a digest, as error messages name it.
ORIGINS = {
    "manifest": "the manifest",
    "pin": f"its pin in {PINS_FILE}",
    "policy": "the policy",
    "": "nothing",
}


@dataclass(frozen=True)
class Pin:
    """The digest of the first copy installed of a file the manifest publishes no digest for."""

    sha256: str
    size: int
    source: str


@dataclass(frozen=True)
class Expected:
    """What a file must hash to, and who says so ('' origin: nobody yet, so it will be pinned)."""

    sha256: str
    size: int | None
    origin: str  # "manifest", "pin", "policy" or ""


def load_pins(models_dir: Path) -> dict[str, Pin]:
    """The pins next to the models; a damaged pins file is an error, since it is a trust anchor."""
    path = models_dir / PINS_FILE
    if not path.exists():
        return {}
    doc = read_toml(path, "pins file", hint="restore it from a backup, or remove it and import again")
    pins: dict[str, Pin] = {}
    for file, table in doc.items():
        sha, size = (table.get("sha256"), table.get("size")) if isinstance(table, dict) else (None, None)
        if not (isinstance(sha, str) and HEX64.fullmatch(sha) and isinstance(size, int) and size >= 0):
            raise SetupError(f"{path}: [{file!r}] needs sha256 (64 hex digits) and size")
        pins[file] = Pin(sha, size, str(table.get("source", "")))
    return pins


def save_pin(models_dir: Path, file: str, pin: Pin) -> None:
    """Record a pin atomically (0644), keeping the other pins and any comments."""
    path = models_dir / PINS_FILE
    doc = tomlkit.parse(path.read_text(encoding="utf-8")) if path.exists() else _new_pins_doc()
    table = tomlkit.table()
    table.update(
        {
            "sha256": pin.sha256,
            "size": pin.size,
            "source": pin.source,
            "pinned": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        }
    )
    doc[file] = table
    files.write_public(path, tomlkit.dumps(doc).encode())


def _new_pins_doc() -> tomlkit.TOMLDocument:
    doc = tomlkit.document()
    doc.add(tomlkit.comment("SHA-256 of model files installed without a published digest, recorded"))
    doc.add(tomlkit.comment("on first install by `qwen-appliance model pull/import`; `model verify`"))
    doc.add(tomlkit.comment("checks against them."))
    return doc


def expected_for(manifest: Manifest, pins: dict[str, Pin], file: str) -> Expected:
    """A published digest wins over a pin; without either the file will be pinned."""
    hit = manifest.by_file(file)
    if hit and hit[1].sha256:
        return Expected(hit[1].sha256, hit[1].size, "manifest")
    if file in pins:
        return Expected(pins[file].sha256, pins[file].size, "pin")
    return Expected("", hit[1].size if hit else None, "")
