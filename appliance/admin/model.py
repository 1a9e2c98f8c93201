"""`qwen-appliance model ...`: install, pin and check the GGUF files the daemon serves.

Files come from the Hugging Face Hub (`pull`) or removable media (`import`) and are installed read-only
only after their SHA-256 matches the manifest or, where the manifest publishes none, they are pinned on first
install in `<models_dir>/pins.toml`. `info` reads GGUF metadata with a bounded pure-Python header parser,
so an untrusted file never reaches llama.cpp (this module never imports llama_cpp).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import secrets
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import tomlkit

from appliance.engine.types import FTYPE_NAMES
from appliance.errors import SetupError
from appliance.security import pki

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_MODELS_DIR = Path("/var/lib/qwen-appliance/models")
MODELS_ENV = "QWEN_APPLIANCE_MODELS"
MANIFEST_ENV = "QWEN_APPLIANCE_MANIFEST"
TIMEOUT_ENV = "QWEN_APPLIANCE_HUB_TIMEOUT"
# A source checkout (editable install), then an installed tree whose venv sits in the app dir
# (/opt/qwen-appliance/.venv -> /opt/qwen-appliance/models/manifest.toml).
MANIFEST_CANDIDATES = (Path(__file__).resolve().parents[2] / "models" / "manifest.toml",
                       Path(sys.prefix).parent / "models" / "manifest.toml")
DEFAULT_ENDPOINT = "https://huggingface.co"
PINS_FILE = "pins.toml"
STAGING = ".partial"  # inside the models dir: same filesystem for the final rename, and resumable
HUB_TIMEOUT_S = 10.0
CHUNK = 1 << 20
IMPORT_HINT = ("on a machine with internet access fetch the files (`hf download REPO FILE`, see "
               "`qwen-appliance model list`), carry them over and run `qwen-appliance model import FILE...`")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,200}\.gguf")
_ENTRY_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
_REQUIRED = ("name", "repo", "file", "mmproj_file", "size", "sha256", "mmproj_size", "mmproj_sha256")
_TRUE = {"1", "ON", "YES", "TRUE"}

# --- the manifest ---------------------------------------------------------------------------------


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
    doc = _read_toml(path, "model manifest",
                     hint=f"pass --manifest FILE or set ${MANIFEST_ENV} (looked in {looked})")
    tables = doc.get("models")
    if not isinstance(tables, list) or not tables:
        raise SetupError(f"{path}: no [[models]] entries", hint="see models/manifest.toml in the source")
    entries = tuple(_entry(f"{path}: [[models]] #{i + 1}", t) for i, t in enumerate(tables))
    _check_manifest(path, entries)
    return Manifest(path, entries)


def _read_toml(path: Path, what: str, hint: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SetupError(f"{what} not found: {path}", hint=hint) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise SetupError(f"{path}: cannot read the {what}: {e}", hint=hint) from None


def _entry(where: str, table: Any) -> Entry:
    if not isinstance(table, dict):
        raise SetupError(f"{where}: not a table")
    missing = [k for k in _REQUIRED if k not in table]
    if missing:
        raise SetupError(f"{where}: missing {', '.join(missing)}",
                         hint=f"every entry needs {', '.join(_REQUIRED)}")
    default = table.get("default", False)
    if not isinstance(default, bool):
        raise SetupError(f"{where}: default must be true or false")
    return Entry(
        name=_text(where, table, "name", _ENTRY_NAME),
        repo=_text(where, table, "repo", _REPO),
        revision=_text(where, table, "revision", _REVISION, optional=True),
        model=FileSpec(_text(where, table, "file", _FILE_NAME), _size(where, table, "size"),
                       _digest(where, table, "sha256"), "model"),
        mmproj=FileSpec(_text(where, table, "mmproj_file", _FILE_NAME), _size(where, table, "mmproj_size"),
                        _digest(where, table, "mmproj_sha256"), "mmproj"),
        default=default,
    )


def _text(where: str, table: dict[str, Any], key: str, pattern: re.Pattern[str],
          optional: bool = False) -> str:
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
        raise SetupError(f"{where}: {key} must be a byte count or \"\" (unknown)")
    return value


def _digest(where: str, table: dict[str, Any], key: str) -> str:
    value = table[key]
    if not isinstance(value, str) or not (value == "" or _HEX64.fullmatch(value.lower())):
        raise SetupError(f"{where}: {key} must be 64 hex digits or \"\" (pin on first install)")
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


# --- pins: digests recorded on first install ------------------------------------------------------


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
    doc = _read_toml(path, "pins file", hint="restore it from a backup, or remove it and import again")
    pins: dict[str, Pin] = {}
    for file, table in doc.items():
        sha, size = (table.get("sha256"), table.get("size")) if isinstance(table, dict) else (None, None)
        if not (isinstance(sha, str) and _HEX64.fullmatch(sha) and isinstance(size, int) and size >= 0):
            raise SetupError(f"{path}: [{file!r}] needs sha256 (64 hex digits) and size")
        pins[file] = Pin(sha, size, str(table.get("source", "")))
    return pins


def save_pin(models_dir: Path, file: str, pin: Pin) -> None:
    """Record a pin atomically (0644), keeping the other pins and any comments."""
    path = models_dir / PINS_FILE
    doc = tomlkit.parse(path.read_text(encoding="utf-8")) if path.exists() else _new_pins_doc()
    table = tomlkit.table()
    table.update({"sha256": pin.sha256, "size": pin.size, "source": pin.source,
                  "pinned": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()})
    doc[file] = table
    pki.write_public(path, tomlkit.dumps(doc).encode())


def _new_pins_doc() -> tomlkit.TOMLDocument:
    doc = tomlkit.document()
    doc.add(tomlkit.comment("SHA-256 of model files installed without a published digest, recorded"))
    doc.add(tomlkit.comment("on first install by `qwen-appliance model pull/import`; `model verify`"))
    doc.add(tomlkit.comment("checks against them."))
    return doc


_ORIGINS = {"manifest": "the manifest", "pin": f"its pin in {PINS_FILE}", "policy": "the policy",
            "": "nothing"}


def expected_for(manifest: Manifest, pins: dict[str, Pin], file: str) -> Expected:
    """A published digest wins over a pin; without either the file will be pinned."""
    hit = manifest.by_file(file)
    if hit and hit[1].sha256:
        return Expected(hit[1].sha256, hit[1].size, "manifest")
    if file in pins:
        return Expected(pins[file].sha256, pins[file].size, "pin")
    return Expected("", hit[1].size if hit else None, "")


# --- files: hashing and read-only install ----------------------------------------------------------


def hash_file(path: Path) -> tuple[str, int]:
    """Streamed SHA-256 and size, so multi-GB models never sit in memory.

    Not engine.sha256_file: importing engine loads llama.cpp, which admin commands must not need.
    """
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def copy_hashed(src: Path, dest: Path) -> tuple[str, int]:
    """Copy src into a new file dest (0600, never through a link) and hash it in the same pass."""
    digest, size = hashlib.sha256(), 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
        while chunk := fin.read(CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest(), size


def models_dir_of(given: Path | None) -> Path:
    """--models-dir, else $QWEN_APPLIANCE_MODELS, else /var/lib/qwen-appliance/models."""
    return (given or Path(os.environ.get(MODELS_ENV) or DEFAULT_MODELS_DIR)).expanduser().absolute()


def ready_models_dir(path: Path) -> Path:
    """Create the models dir 0755; refuse one that others can write, since they could swap a model."""
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if created:
            path.chmod(0o755)
    except PermissionError:
        raise SetupError(f"cannot create {path}: permission denied",
                         hint=f"run as the appliance admin, or pass --models-dir DIR / set ${MODELS_ENV}",
                         ) from None
    if not path.is_dir():
        raise SetupError(f"{path} is not a directory", hint="pass --models-dir DIR")
    if path.stat().st_mode & 0o022:
        raise SetupError(f"{path} is writable by group or others", hint=f"chmod 755 {path}")
    return path


def _staging(models_dir: Path) -> Path:
    path = models_dir / STAGING
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def verify_copy(path: Path, file: str, expected: Expected, digest: str, size: int) -> None:
    """Delete a new copy and refuse it when its size or SHA-256 differs from what is expected."""
    if expected.sha256 and digest != expected.sha256:
        problem = f"{file}: SHA-256 is {digest}, but {_ORIGINS[expected.origin]} expects {expected.sha256}"
    elif expected.size is not None and size != expected.size:
        problem = f"{file}: {size} bytes, but the manifest says {expected.size}"
    else:
        return
    path.unlink(missing_ok=True)
    raise SetupError(f"{problem}; not installed",
                     hint="the copy is damaged or is not the published file: fetch it again from the "
                          "repository and revision that `model list` names")


def install(tmp: Path, dest: Path) -> None:
    """Make the verified copy read-only (0444) and move it into place atomically."""
    tmp.chmod(0o444)
    os.replace(tmp, dest)


def _pin_if_new(models_dir: Path, file: str, expected: Expected, digest: str, size: int, source: str) -> None:
    if expected.sha256:
        return
    save_pin(models_dir, file, Pin(digest, size, source))
    print(f"pinned {file}: sha256 {digest} (first install; later checks use this pin)", file=sys.stderr)


def policy_lines(model: tuple[Path, str] | None, mmproj: tuple[Path, str] | None) -> str:
    """The [model] keys that make the daemon load exactly these files, as TOML to paste."""
    lines = ["# paste into policy.toml (replace the same keys in its [model] table)", "[model]"]
    if model:
        lines.append(f"path = {json.dumps(str(model[0]))}")
    if mmproj:
        lines.append(f"mmproj = {json.dumps(str(mmproj[0]))}")
    if model:
        lines.append(f'sha256 = "{model[1]}"')
    if mmproj:
        lines.append(f'mmproj_sha256 = "{mmproj[1]}"')
    return "\n".join(lines)


# --- GGUF header reader: bounded, pure Python, for untrusted files --------------------------------

GGUF_MAGIC = b"GGUF"
MAX_KV = 65_536
MAX_KEY_BYTES = 65_535
MAX_STRING_BYTES = 16 << 20
MAX_ARRAY_ITEMS = 1 << 24
KEEP_ARRAY_ITEMS = 16  # longer arrays (vocabularies) are walked and summarised, never kept
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_STRING, _ARRAY = 8, 9
_SCALARS = {0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"),
            4: ("uint32", "<I"), 5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<B"),
            10: ("uint64", "<Q"), 11: ("int64", "<q"), 12: ("float64", "<d")}


class GGUFError(SetupError):
    """A file that is not a well-formed GGUF header: reported, never a crash or a huge allocation."""


class _Malformed(Exception):
    """Why the header is unusable; turned into a GGUFError naming the file."""


@dataclass(frozen=True)
class ArraySummary:
    """A long array (e.g. the vocabulary): its item type and length only."""

    item_type: str
    count: int

    def __str__(self) -> str:
        return f"[{self.count} x {self.item_type}]"


@dataclass(frozen=True)
class GGUFHeader:
    """The fixed header and the metadata key/value section of a GGUF file."""

    version: int
    tensor_count: int
    metadata: dict[str, Any]


class _Cursor:
    """Little-endian reads that refuse any length running past the end of the file, before reading it."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f, self.size, self.pos = f, size, 0

    def remaining(self) -> int:
        return self.size - self.pos

    def _need(self, n: int, what: str) -> None:
        if n > self.remaining():
            raise _Malformed(f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                             f"only {self.remaining()} remain")

    def read(self, n: int, what: str) -> bytes:
        self._need(n, what)
        data = self._f.read(n)
        if len(data) != n:
            raise _Malformed(f"truncated: {what} at offset {self.pos} (the file shrank while being read)")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self._need(n, what)
        self._f.seek(n, os.SEEK_CUR)
        self.pos += n

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def length(self, limit: int, what: str) -> int:
        n: int = self.unpack("<Q", f"length of {what}")
        if n > limit or n > self.remaining():
            raise _Malformed(f"{what} claims {n} bytes at offset {self.pos - 8} (limit {limit}, "
                             f"{self.remaining()} bytes remain)")
        return n

    def string(self, limit: int, what: str) -> str:
        raw = self.read(self.length(limit, what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed(f"{what} is not valid UTF-8 (offset {self.pos - len(raw)})") from None


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse the header and metadata of a GGUF v2/v3 file, with every count and length bounded."""
    try:
        with open(path, "rb", buffering=CHUNK) as f:
            return _parse(_Cursor(f, os.fstat(f.fileno()).st_size))
    except _Malformed as e:
        raise GGUFError(f"{path}: not a valid GGUF file: {e}",
                        hint="the file is damaged, truncated or not a GGUF model; fetch it again") from None
    except IsADirectoryError:
        raise SetupError(f"{path} is a directory", hint="name a .gguf file") from None
    except OSError as e:
        raise SetupError(f"cannot read {path}: {e.strerror}", hint="check the path and permissions") from None


def _parse(cur: _Cursor) -> GGUFHeader:
    magic = cur.read(4, "magic") if cur.remaining() >= 4 else b""
    if magic != GGUF_MAGIC:
        raise _Malformed(f"bad magic {safe(repr(magic))} (a GGUF file starts with b'GGUF')")
    version: int = cur.unpack("<I", "version")
    if version not in (2, 3):
        raise _Malformed(f"unsupported GGUF version {version} (versions 2 and 3 are read; "
                         "a huge number means a big-endian file)")
    n_tensors: int = cur.unpack("<Q", "tensor count")
    n_kv: int = cur.unpack("<Q", "metadata count")
    if n_kv > MAX_KV or n_kv * _MIN_KV_BYTES > cur.remaining():
        raise _Malformed(f"claims {n_kv} metadata entries; the limit is {MAX_KV} and "
                         f"{cur.remaining()} bytes remain")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(MAX_KEY_BYTES, f"key #{i + 1}")
        if not key or key in metadata:
            raise _Malformed(f"empty or duplicate key {safe(repr(key))}")
        metadata[key] = _value(cur, cur.unpack("<I", f"type of {safe(key)}"), safe(key))
    if n_tensors * _MIN_TENSOR_INFO_BYTES > cur.remaining():
        raise _Malformed(f"claims {n_tensors} tensors, more than the {cur.remaining()} remaining bytes hold")
    return GGUFHeader(version, n_tensors, metadata)


def _value(cur: _Cursor, vtype: int, key: str, in_array: bool = False) -> Any:
    if vtype in _SCALARS:
        value = cur.unpack(_SCALARS[vtype][1], key)
        return bool(value) if vtype == 7 else value
    if vtype == _STRING:
        return cur.string(MAX_STRING_BYTES, f"value of {key}")
    if vtype == _ARRAY and not in_array:
        return _array(cur, key)
    raise _Malformed(f"{key}: value type {vtype} is not supported")


def _array(cur: _Cursor, key: str) -> list[Any] | ArraySummary:
    item: int = cur.unpack("<I", f"item type of {key}")
    count: int = cur.unpack("<Q", f"item count of {key}")
    if item == _ARRAY:
        raise _Malformed(f"{key}: nested arrays are not supported (llama.cpp refuses them too)")
    if item not in _SCALARS and item != _STRING:
        raise _Malformed(f"{key}: array item type {item} is not supported")
    item_size = struct.calcsize(_SCALARS[item][1]) if item in _SCALARS else 8
    if count > MAX_ARRAY_ITEMS or count * item_size > cur.remaining():
        raise _Malformed(f"{key}: array claims {count} items; the limit is {MAX_ARRAY_ITEMS} and "
                         f"{cur.remaining()} bytes remain")
    if count <= KEEP_ARRAY_ITEMS:
        return [_value(cur, item, key, in_array=True) for _ in range(count)]
    if item in _SCALARS:
        cur.skip(count * item_size, key)
    else:
        for _ in range(count):
            cur.skip(cur.length(MAX_STRING_BYTES, f"item of {key}"), key)
    return ArraySummary("string" if item == _STRING else _SCALARS[item][0], count)


def safe(text: str, limit: int = 0) -> str:
    """Untrusted text made terminal-safe: control, format and bidi characters shown as escapes."""
    out = "".join(c if c.isprintable() or c in "\n\t" else f"\\u{ord(c):04x}" for c in text)
    return out[:limit] + "..." if limit and len(out) > limit else out


def describe_gguf(path: Path, header: GGUFHeader) -> dict[str, Any]:
    """What an admin needs to recognise a file: architecture, name, quantization, context, template."""
    meta = header.metadata
    arch = _str(meta.get("general.architecture"))
    ftype = _int(meta.get("general.file_type"))
    return {
        "file": str(path), "bytes": path.stat().st_size, "gguf_version": header.version,
        "tensors": header.tensor_count, "metadata_keys": len(meta),
        "architecture": arch, "name": _str(meta.get("general.name")),
        "file_type": None if ftype is None else FTYPE_NAMES.get(ftype, f"ftype {ftype}"),
        "context_length": _int(meta.get(f"{arch}.context_length")) if arch else None,
        "parameter_count": _int(meta.get("general.parameter_count")),
        "size_label": _str(meta.get("general.size_label")),
        "projector_type": _str(meta.get("clip.projector_type")),
        "description": _str(meta.get("general.description")),
        "chat_template": _str(meta.get("tokenizer.chat_template")),
    }


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _role(header: GGUFHeader) -> str:
    """A projector declares architecture `clip`; everything else is a text model."""
    return "mmproj" if header.metadata.get("general.architecture") == "clip" else "model"


# --- the Hub ---------------------------------------------------------------------------------------


def _offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def _offline_error() -> SetupError:
    return SetupError("HF_HUB_OFFLINE is set, so `model pull` cannot reach the Hugging Face Hub",
                      hint=IMPORT_HINT)


@dataclass(frozen=True)
class Hub:
    """Where and how to reach the Hub: endpoint and proxies from the environment, a short timeout."""

    endpoint: str
    timeout: float

    @classmethod
    def from_env(cls) -> Hub:
        raw = os.environ.get(TIMEOUT_ENV, "")
        try:
            timeout = float(raw) if raw else HUB_TIMEOUT_S
        except ValueError:
            raise SetupError(f"${TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
        endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        return cls(endpoint, max(timeout, 0.1))

    def preflight(self, repo: str, revision: str, spec: FileSpec) -> None:
        """One HEAD request without retries, so an unreachable Hub fails in seconds, not minutes."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(repo, spec.file, revision=revision, endpoint=self.endpoint)
        try:
            meta = get_hf_file_metadata(url, timeout=self.timeout, endpoint=self.endpoint)
        except Exception as e:
            raise self.error(e, f"{repo}@{revision}/{spec.file}") from None
        if spec.size is not None and meta.size is not None and meta.size != spec.size:
            raise SetupError(f"{repo}@{revision}/{spec.file} is {meta.size} bytes on the Hub, but the "
                             f"manifest says {spec.size}",
                             hint="the manifest's revision pins the known-good file")

    def download(self, repo: str, revision: str, file: str, staging: Path) -> Path:
        """hf_hub_download into the staging dir: progress bar, and an interrupted download resumes."""
        from huggingface_hub import hf_hub_download

        print(f"downloading {repo}@{revision[:12]}/{file} ...", file=sys.stderr)
        try:
            local = hf_hub_download(repo, file, revision=revision, local_dir=staging,
                                    endpoint=self.endpoint, etag_timeout=self.timeout)
        except Exception as e:
            raise self.error(e, f"{repo}@{revision}/{file}", interrupted=True) from None
        return Path(str(local))

    def error(self, exc: Exception, what: str, interrupted: bool = False) -> SetupError:
        """Turn a huggingface_hub or network exception into one clear admin error."""
        from huggingface_hub import errors as hf

        reason = safe(_root_cause(exc), 300)
        if isinstance(exc, hf.OfflineModeIsEnabled):
            return _offline_error()
        missing = (hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.EntryNotFoundError)
        if isinstance(exc, missing) and not isinstance(exc, hf.LocalEntryNotFoundError):  # local: network
            return SetupError(f"{what} is not on the Hub: {reason}",
                              hint="the manifest may be out of date: check repo, revision and file, or pass "
                                   "--revision")
        if isinstance(exc, hf.HfHubHTTPError):
            return SetupError(f"the Hub refused {what}: {reason}", hint="try again later; " + IMPORT_HINT)
        again = "run the same command again to resume the download; " if interrupted else ""
        return SetupError(f"the Hugging Face Hub is unreachable at {self.endpoint} ({reason})",
                          hint=f"{again}behind a proxy set HTTPS_PROXY; {IMPORT_HINT}")


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's first line (e.g. 'Connection refused'), the most telling for an admin."""
    for _ in range(20):  # chains are short; the bound only guards against a cycle
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# --- commands --------------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    """Each manifest entry, its size, whether it is installed and how its digests are known."""
    manifest = load_manifest(args.manifest)
    models_dir = models_dir_of(args.models_dir)
    pins = load_pins(models_dir) if models_dir.is_dir() else {}
    print(f"{'NAME':<32} {'SIZE':>9}  {'INSTALLED':<11} DIGESTS")
    for e in manifest.entries:
        present = [(models_dir / s.file).is_file() for s in e.files]
        installed = ("yes" if all(present) else "model only" if present[0]
                     else "mmproj only" if present[1] else "no")
        origins = {expected_for(manifest, pins, s.file).origin for s in e.files}
        digests = "published" if origins == {"manifest"} else "pin on install" if "" in origins else "pinned"
        sizes = [s.size for s in e.files if s.size is not None]
        size = f"{sum(sizes) / 1e9:.2f} GB" if len(sizes) == 2 else "?"
        print(f"{e.name + (' *' if e.default else ''):<32} {size:>9}  {installed:<11} {digests}")
        print(f"    {e.repo}@{e.revision[:12] or 'main'}: {e.model.file} + {e.mmproj.file}")
    for file in sorted(set(pins) - {s.file for e in manifest.entries for s in e.files}):
        print(f"{'(unlisted) ' + file:<44} {'yes' if (models_dir / file).is_file() else 'no':<11} pinned")
    print(f"* default (`model pull` without a name); models dir {models_dir}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    """Download an entry's two files, verify each before installing it read-only, print the policy lines."""
    manifest = load_manifest(args.manifest)
    entry = manifest.entry(args.name)
    models_dir = models_dir_of(args.models_dir)
    revision = args.revision or entry.revision or "main"
    missing = [s for s in entry.files if not (models_dir / s.file).exists()]
    hub = _reachable_hub(entry.repo, revision, missing) if missing else None
    ready_models_dir(models_dir)
    digests = {}
    for spec in entry.files:
        expected = expected_for(manifest, load_pins(models_dir), spec.file)
        if hub is not None and spec in missing:
            digests[spec.role] = _pull_file(hub, entry.repo, revision, spec, models_dir, expected)
        else:
            digests[spec.role] = _check_installed(models_dir / spec.file, expected)
    print(policy_lines((models_dir / entry.model.file, digests["model"]),
                       (models_dir / entry.mmproj.file, digests["mmproj"])))
    return 0


def _reachable_hub(repo: str, revision: str, specs: list[FileSpec]) -> Hub:
    """Refuse at once when offline is requested; else check every file is reachable before any download."""
    if _offline_requested():
        raise _offline_error()
    hub = Hub.from_env()
    for spec in specs:
        hub.preflight(repo, revision, spec)
    return hub


def _pull_file(hub: Hub, repo: str, revision: str, spec: FileSpec, models_dir: Path,
               expected: Expected) -> str:
    """Download into staging, verify, install read-only, pin if nothing published a digest."""
    local = hub.download(repo, revision, spec.file, _staging(models_dir))
    print(f"verifying {spec.file} ...", file=sys.stderr)
    digest, size = hash_file(local)
    verify_copy(local, spec.file, expected, digest, size)
    install(local, models_dir / spec.file)
    _pin_if_new(models_dir, spec.file, expected, digest, size, f"pull {repo}@{revision}")
    _remove_staging(models_dir)
    print(f"installed {models_dir / spec.file} ({size} bytes, sha256 {digest})", file=sys.stderr)
    return digest


def _remove_staging(models_dir: Path) -> None:
    """Drop the staging dir (hf_hub_download's bookkeeping) once no partial download is left to resume."""
    staging = models_dir / STAGING
    partial = {".incomplete", ".import", ".gguf"}
    if staging.is_dir() and not any(p.suffix in partial for p in staging.rglob("*")):
        shutil.rmtree(staging, ignore_errors=True)


def _check_installed(dest: Path, expected: Expected) -> str:
    """An already installed file is kept only if it verifies; an unpinned one is not trusted by pull."""
    if not expected.sha256:
        raise SetupError(f"{dest} exists but no digest pins it",
                         hint=f"check where it came from, then `qwen-appliance model import {dest}`, or "
                              "delete it")
    digest, _ = hash_file(dest)
    if digest != expected.sha256:
        raise SetupError(f"{dest} is installed but its SHA-256 {digest} differs from "
                         f"{_ORIGINS[expected.origin]} ({expected.sha256})",
                         hint="it was altered or damaged: inspect it, delete it and pull again")
    print(f"already installed and verified: {dest}", file=sys.stderr)
    return digest


@dataclass(frozen=True)
class _Import:
    """One file to import: where it is, the name it gets and whether it is the model or the projector."""

    src: Path
    target: str
    role: str
    entry: Entry | None


def _import(args: argparse.Namespace) -> int:
    """Install files from removable media after verifying them; print the policy lines."""
    manifest = load_manifest(args.manifest)
    entry = manifest.entry(args.name) if args.name else None
    plan = [_plan_import(manifest, entry, Path(f), args.unlisted) for f in args.files]
    targets = [p.target for p in plan]
    if len(set(targets)) != len(targets):
        raise SetupError(f"two files would both be installed as {max(targets, key=targets.count)}")
    models_dir = ready_models_dir(models_dir_of(args.models_dir))
    done = {p.role: (models_dir / p.target, _import_one(manifest, models_dir, p)) for p in plan}
    for p in plan:
        _add_counterpart(done, manifest, models_dir, p.entry)
    print(policy_lines(done.get("model"), done.get("mmproj")))
    return 0


def _plan_import(manifest: Manifest, entry: Entry | None, src: Path, unlisted: bool) -> _Import:
    """Match a file to the manifest (by --name, else by file name); refuse unknown files unless --unlisted."""
    if not src.is_file():
        raise SetupError(f"{src}: no such file", hint="name the .gguf files to import")
    role = _role(read_gguf_header(src))
    if entry is not None:
        by_role = entry.mmproj if role == "mmproj" else entry.model
        spec = next((s for s in entry.files if s.file == src.name), by_role)
        return _checked_role(_Import(src, spec.file, spec.role, entry), role)
    hit = manifest.by_file(src.name)
    if hit:
        return _checked_role(_Import(src, src.name, hit[1].role, hit[0]), role)
    if not unlisted:
        raise SetupError(f"{src.name} is not in the manifest {manifest.path}",
                         hint="compare with `qwen-appliance model list`, pass --name NAME for a renamed "
                              "copy, or --unlisted to install it anyway and pin its SHA-256")
    if not _FILE_NAME.fullmatch(src.name):
        raise SetupError(f"{src.name}: unsuitable file name",
                         hint="rename it to letters, digits, ._+- and .gguf")
    return _Import(src, src.name, role, None)


def _checked_role(item: _Import, role: str) -> _Import:
    """A projector under a text model's name (or the reverse) is refused, even before any digest exists."""
    if item.role != role:
        what = "a vision projector (architecture clip)" if role == "mmproj" else "a text model"
        raise SetupError(f"{item.src} is {what}, but the manifest lists {item.target} as the {item.role}",
                         hint="check which file is which; the projector's name starts with mmproj-")
    return item


def _import_one(manifest: Manifest, models_dir: Path, item: _Import) -> str:
    """Copy and hash in one pass into the models dir, verify, then install read-only (or pin)."""
    dest = models_dir / item.target
    expected = expected_for(manifest, load_pins(models_dir), item.target)
    if dest.exists() and dest.samefile(item.src):
        digest, size = check_digest_in_place(dest, expected)
    else:
        tmp = _staging(models_dir) / f"{item.target}.{secrets.token_hex(4)}.import"
        try:
            digest, size = copy_hashed(item.src, tmp)
            verify_copy(tmp, item.target, expected, digest, size)
            install(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        _remove_staging(models_dir)
    _pin_if_new(models_dir, item.target, expected, digest, size, f"import {item.src}")
    how = f"verified against {_ORIGINS[expected.origin]}" if expected.sha256 else "newly pinned"
    print(f"installed {dest} ({size} bytes, sha256 {digest}, {how})", file=sys.stderr)
    return digest


def check_digest_in_place(dest: Path, expected: Expected) -> tuple[str, int]:
    """Importing a file already in the models dir: verify it and make it read-only, never delete it."""
    digest, size = hash_file(dest)
    if expected.sha256 and digest != expected.sha256:
        raise SetupError(f"{dest}: SHA-256 {digest} differs from {_ORIGINS[expected.origin]} "
                         f"({expected.sha256})",
                         hint="inspect the file; it is not the published one")
    dest.chmod(0o444)
    return digest, size


def _add_counterpart(done: dict[str, tuple[Path, str]], manifest: Manifest, models_dir: Path,
                     entry: Entry | None) -> None:
    """Complete the policy lines with the entry's other file when it is already installed and pinned."""
    if entry is None:
        return
    pins = load_pins(models_dir)
    for spec in entry.files:
        expected = expected_for(manifest, pins, spec.file)
        if spec.role not in done and (models_dir / spec.file).is_file() and expected.sha256:
            done[spec.role] = (models_dir / spec.file, expected.sha256)


@dataclass(frozen=True)
class _Check:
    """One installed file and the digest it must still have."""

    path: Path
    expected: Expected


def _verify(args: argparse.Namespace) -> int:
    """Re-hash installed files against the manifest and pins (or the policy's); exit 2 naming failures."""
    manifest = load_manifest(args.manifest)
    checks = _policy_checks(args.policy, manifest) if args.policy else _dir_checks(args.models_dir, manifest)
    failed = [c.path for c in checks if not _verify_one(c)]
    if failed:
        print(f"qwen-appliance: error: {len(failed)} of {len(checks)} model files failed verification: "
              f"{', '.join(map(str, failed))} (hint: a changed file must not be served: restore it with "
              "`model pull` or `model import`)", file=sys.stderr)
        return 2
    print(f"OK: {len(checks)} model files verified")
    return 0


def _verify_one(check: _Check) -> bool:
    path, expected = check.path, check.expected
    if not path.is_file():
        print(f"MISSING   {path}")
        return False
    if not expected.sha256:
        print(f"UNPINNED  {path}  (no digest in the manifest, pins or policy: import it to pin it)")
        return False
    digest, _ = hash_file(path)
    if digest != expected.sha256:
        print(f"MISMATCH  {path}  sha256 {digest}, {_ORIGINS[expected.origin]} expects {expected.sha256}")
        return False
    writable = "  (warning: writable; chmod 444)" if path.stat().st_mode & 0o222 else ""
    print(f"OK        {path}  ({expected.origin}){writable}")
    return True


def _dir_checks(given: Path | None, manifest: Manifest) -> list[_Check]:
    models_dir = models_dir_of(given)
    if not models_dir.is_dir():
        raise SetupError(f"models dir not found: {models_dir}", hint="pass --models-dir DIR")
    files = sorted(p for p in models_dir.iterdir() if p.suffix == ".gguf" and not p.name.startswith("."))
    if not files:
        raise SetupError(f"no .gguf files in {models_dir}",
                         hint="install one with `model pull` or `model import`")
    pins = load_pins(models_dir)
    return [_Check(p, expected_for(manifest, pins, p.name)) for p in files]


def _policy_checks(policy_file: Path, manifest: Manifest) -> list[_Check]:
    """The policy's model and mmproj, against its sha256 keys, else the manifest and pins by file name."""
    from appliance.config.policy import load_policy

    model = load_policy(policy_file).model
    checks = []
    for path, pin in ((model.path, model.sha256), (model.mmproj, model.mmproj_sha256)):
        if path is None:
            continue
        if pin:
            checks.append(_Check(path, Expected(pin.lower(), None, "policy")))
        else:
            pins = load_pins(path.parent) if path.parent.is_dir() else {}
            checks.append(_Check(path, expected_for(manifest, pins, path.name)))
    return checks


def _info(args: argparse.Namespace) -> int:
    """GGUF metadata read without llama.cpp, so an untrusted file can be inspected safely."""
    info = describe_gguf(args.file, read_gguf_header(args.file))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    keys = ("file", "bytes", "gguf_version", "tensors", "metadata_keys", "architecture", "name", "file_type",
            "context_length", "parameter_count", "size_label", "projector_type", "description")
    for key in keys:
        if info[key] is not None:
            print(f"{key.replace('_', ' '):<16} {safe(str(info[key]), 500)}")
    template = info["chat_template"]
    print(f"chat template    ({len(template)} characters)\n{safe(template)}" if template else
          "chat template    (none)")
    return 0


# --- the CLI ---------------------------------------------------------------------------------------


def register(sub: Any) -> None:
    """Add `model list|pull|import|verify|info` to the CLI (each sets `handler`)."""
    model = sub.add_parser("model", help="install, pin and check GGUF model files")
    msub = model.add_subparsers(dest="model_command", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--models-dir", type=Path,
                       help=f"install folder (default ${MODELS_ENV}, else {DEFAULT_MODELS_DIR})")
    where.add_argument("--manifest", type=Path,
                       help=f"known-good models (default ${MANIFEST_ENV}, else models/manifest.toml)")

    p = msub.add_parser("list", parents=[where], help="known-good models and which are installed")
    p.set_defaults(handler=_list)

    p = msub.add_parser("pull", parents=[where], help="download from Hugging Face, verify, install read-only")
    p.add_argument("name", nargs="?", help="manifest entry (default: the one marked default)")
    p.add_argument("--revision", help="repository commit or branch instead of the manifest's")
    p.set_defaults(handler=_pull)

    p = msub.add_parser("import", parents=[where], help="install files copied from removable media")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--name", help="manifest entry these files are (when they were renamed)")
    p.add_argument("--unlisted", action="store_true",
                   help="allow files the manifest does not know; their SHA-256 is pinned")
    p.set_defaults(handler=_import)

    p = msub.add_parser("verify", parents=[where], help="re-hash installed files; exit 2 on any mismatch")
    p.add_argument("--policy", type=Path, help="check the policy's [model] files against its sha256 keys")
    p.set_defaults(handler=_verify)

    p = msub.add_parser("info", help="GGUF metadata and chat template, read without llama.cpp")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_info)
