"""Installing model files: verified against the manifest or a pin, then moved read-only into the models dir.

`pull` downloads through the Hub, `import` copies from removable media, `verify` re-hashes what is installed;
a copy that does not match is deleted, never served.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from appliance import files
from appliance.errors import SetupError
from appliance.models.gguf import read_gguf_header, role_of
from appliance.models.hub import Hub, reachable_hub
from appliance.models.manifest import FILE_NAME, Entry, FileSpec, Manifest
from appliance.models.pins import ORIGINS, Expected, Pin, expected_for, load_pins, save_pin

DEFAULT_MODELS_DIR = Path("/var/lib/qwen-appliance/models")
MODELS_ENV = "QWEN_APPLIANCE_MODELS"
STAGING = ".partial"  # inside the models dir: same filesystem for the final rename, and resumable


# --- the models dir and its files -----------------------------------------------------------------


def hash_file(path: Path) -> tuple[str, int]:
    """Streamed SHA-256 (appliance.files) and size, so multi-GB models never sit in memory."""
    return files.sha256_file(path), path.stat().st_size


def copy_hashed(src: Path, dest: Path) -> tuple[str, int]:
    """Copy src into a new file dest (0600, never through a link) and hash it in the same pass."""
    digest, size = hashlib.sha256(), 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
        while chunk := fin.read(files.CHUNK):
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
        raise SetupError(
            f"cannot create {path}: permission denied",
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


def _remove_staging(models_dir: Path) -> None:
    """Drop the staging dir (hf_hub_download's bookkeeping) once no partial download is left to resume."""
    staging = models_dir / STAGING
    partial = {".incomplete", ".import", ".gguf"}
    if staging.is_dir() and not any(p.suffix in partial for p in staging.rglob("*")):
        shutil.rmtree(staging, ignore_errors=True)


def verify_copy(path: Path, file: str, expected: Expected, digest: str, size: int) -> None:
    """Delete a new copy and refuse it when its size or SHA-256 differs from what is expected."""
    if expected.sha256 and digest != expected.sha256:
        problem = f"{file}: SHA-256 is {digest}, but {ORIGINS[expected.origin]} expects {expected.sha256}"
    elif expected.size is not None and size != expected.size:
        problem = f"{file}: {size} bytes, but the manifest says {expected.size}"
    else:
        return
    path.unlink(missing_ok=True)
    raise SetupError(
        f"{problem}; not installed",
        hint="the copy is damaged or is not the published file: fetch it again from the "
        "repository and revision that `model list` names",
    )


def install(tmp: Path, dest: Path) -> None:
    """Make the verified copy read-only (0444) and move it into place atomically and durably."""
    tmp.chmod(0o444)
    files.durable_replace(tmp, dest)


def _pin_if_new(models_dir: Path, file: str, expected: Expected, digest: str, size: int, source: str) -> None:
    if expected.sha256:
        return
    save_pin(models_dir, file, Pin(digest, size, source))
    print(f"pinned {file}: sha256 {digest} (first install; later checks use this pin)", file=sys.stderr)


# --- pull: from the Hub ------------------------------------------------------------------------------


def pull(manifest: Manifest, entry: Entry, models_dir: Path, revision: str) -> dict[str, str]:
    """Download an entry's missing files, verify each before installing it read-only; digests by role."""
    missing = [s for s in entry.files if not (models_dir / s.file).exists()]
    hub = reachable_hub(entry.repo, revision, missing) if missing else None
    ready_models_dir(models_dir)
    digests = {}
    for spec in entry.files:
        expected = expected_for(manifest, load_pins(models_dir), spec.file)
        if hub is not None and spec in missing:
            digests[spec.role] = _pull_file(hub, entry.repo, revision, spec, models_dir, expected)
        else:
            digests[spec.role] = _check_installed(models_dir / spec.file, expected)
    return digests


def _pull_file(
    hub: Hub, repo: str, revision: str, spec: FileSpec, models_dir: Path, expected: Expected
) -> str:
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


def _check_installed(dest: Path, expected: Expected) -> str:
    """An already installed file is kept only if it verifies; an unpinned one is not trusted by pull."""
    if not expected.sha256:
        raise SetupError(
            f"{dest} exists but no digest pins it",
            hint=f"check where it came from, then `qwen-appliance model import {dest}`, or delete it",
        )
    digest, _ = hash_file(dest)
    if digest != expected.sha256:
        raise SetupError(
            f"{dest} is installed but its SHA-256 {digest} differs from "
            f"{ORIGINS[expected.origin]} ({expected.sha256})",
            hint="it was altered or damaged: inspect it, delete it and pull again",
        )
    print(f"already installed and verified: {dest}", file=sys.stderr)
    return digest


# --- import: from removable media --------------------------------------------------------------------


@dataclass(frozen=True)
class _Import:
    """One file to import: where it is, the name it gets and whether it is the model or the projector."""

    src: Path
    target: str
    role: str
    entry: Entry | None


def import_files(
    manifest: Manifest, entry: Entry | None, sources: list[Path], models_dir: Path, unlisted: bool
) -> dict[str, tuple[Path, str]]:
    """Install files after verifying them; the installed path and digest by role, counterparts included."""
    plan = [_plan_import(manifest, entry, src, unlisted) for src in sources]
    targets = [p.target for p in plan]
    if len(set(targets)) != len(targets):
        raise SetupError(f"two files would both be installed as {max(targets, key=targets.count)}")
    models_dir = ready_models_dir(models_dir)
    done = {p.role: (models_dir / p.target, _import_one(manifest, models_dir, p)) for p in plan}
    for p in plan:
        _add_counterpart(done, manifest, models_dir, p.entry)
    return done


def _plan_import(manifest: Manifest, entry: Entry | None, src: Path, unlisted: bool) -> _Import:
    """Match a file to the manifest (by --name, else by file name); refuse unknown files unless --unlisted."""
    if not src.is_file():
        raise SetupError(f"{src}: no such file", hint="name the .gguf files to import")
    role = role_of(read_gguf_header(src))
    if entry is not None:
        by_role = entry.mmproj if role == "mmproj" else entry.model
        spec = next((s for s in entry.files if s.file == src.name), by_role)
        return _checked_role(_Import(src, spec.file, spec.role, entry), role)
    hit = manifest.by_file(src.name)
    if hit:
        return _checked_role(_Import(src, src.name, hit[1].role, hit[0]), role)
    if not unlisted:
        raise SetupError(
            f"{src.name} is not in the manifest {manifest.path}",
            hint="compare with `qwen-appliance model list`, pass --name NAME for a renamed "
            "copy, or --unlisted to install it anyway and pin its SHA-256",
        )
    if not FILE_NAME.fullmatch(src.name):
        raise SetupError(
            f"{src.name}: unsuitable file name", hint="rename it to letters, digits, ._+- and .gguf"
        )
    return _Import(src, src.name, role, None)


def _checked_role(item: _Import, role: str) -> _Import:
    """A projector under a text model's name (or the reverse) is refused, even before any digest exists."""
    if item.role != role:
        what = "a vision projector (architecture clip)" if role == "mmproj" else "a text model"
        raise SetupError(
            f"{item.src} is {what}, but the manifest lists {item.target} as the {item.role}",
            hint="check which file is which; the projector's name starts with mmproj-",
        )
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
    how = f"verified against {ORIGINS[expected.origin]}" if expected.sha256 else "newly pinned"
    print(f"installed {dest} ({size} bytes, sha256 {digest}, {how})", file=sys.stderr)
    return digest


def check_digest_in_place(dest: Path, expected: Expected) -> tuple[str, int]:
    """Importing a file already in the models dir: verify it and make it read-only, never delete it."""
    digest, size = hash_file(dest)
    if expected.sha256 and digest != expected.sha256:
        raise SetupError(
            f"{dest}: SHA-256 {digest} differs from {ORIGINS[expected.origin]} ({expected.sha256})",
            hint="inspect the file; it is not the published one",
        )
    dest.chmod(0o444)
    return digest, size


def _add_counterpart(
    done: dict[str, tuple[Path, str]], manifest: Manifest, models_dir: Path, entry: Entry | None
) -> None:
    """Complete the policy lines with the entry's other file when it is already installed and pinned."""
    if entry is None:
        return
    pins = load_pins(models_dir)
    for spec in entry.files:
        expected = expected_for(manifest, pins, spec.file)
        if spec.role not in done and (models_dir / spec.file).is_file() and expected.sha256:
            done[spec.role] = (models_dir / spec.file, expected.sha256)


# --- verify: what is installed still hashes as it should -------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One installed file and the digest it must still have."""

    path: Path
    expected: Expected


def verify_one(check: Check) -> tuple[str, str]:
    """The verdict (OK, MISSING, UNPINNED or MISMATCH) and what to add after the path."""
    path, expected = check.path, check.expected
    if not path.is_file():
        return "MISSING", ""
    if not expected.sha256:
        return "UNPINNED", "  (no digest in the manifest, pins or policy: import it to pin it)"
    digest, _ = hash_file(path)
    if digest != expected.sha256:
        return "MISMATCH", f"  sha256 {digest}, {ORIGINS[expected.origin]} expects {expected.sha256}"
    writable = "  (warning: writable; chmod 444)" if path.stat().st_mode & 0o222 else ""
    return "OK", f"  ({expected.origin}){writable}"


def dir_checks(models_dir: Path, manifest: Manifest) -> list[Check]:
    """Every .gguf in the models dir, against the manifest and the pins."""
    if not models_dir.is_dir():
        raise SetupError(f"models dir not found: {models_dir}", hint="pass --models-dir DIR")
    found = sorted(p for p in models_dir.iterdir() if p.suffix == ".gguf" and not p.name.startswith("."))
    if not found:
        raise SetupError(
            f"no .gguf files in {models_dir}", hint="install one with `model pull` or `model import`"
        )
    pins = load_pins(models_dir)
    return [Check(p, expected_for(manifest, pins, p.name)) for p in found]


def policy_checks(named: list[tuple[Path | None, str | None]], manifest: Manifest) -> list[Check]:
    """The policy's (path, sha256) pairs: against that digest, else the manifest and pins by file name."""
    checks = []
    for path, pin in named:
        if path is None:
            continue
        if pin:
            checks.append(Check(path, Expected(pin.lower(), None, "policy")))
        else:
            pins = load_pins(path.parent) if path.parent.is_dir() else {}
            checks.append(Check(path, expected_for(manifest, pins, path.name)))
    return checks
