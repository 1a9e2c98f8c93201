"""The one owner of file-system helpers: atomic writes, file digests and TOML reading (Certbot's model).

Leaf module: imports only the standard library and appliance.errors, so every package may use it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.errors import SetupError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: the same parser, packaged as tomli
    import tomli as tomllib

__all__ = [
    "TOMLDecodeError",
    "atomic_write",
    "durable_replace",
    "load_toml",
    "sha256_file",
    "tomllib",
    "write_public",
    "write_secret",
]

CHUNK = 1 << 20  # read size for hashing: multi-GB models never sit in memory
TOMLDecodeError = tomllib.TOMLDecodeError


def load_toml(text: str) -> dict[str, Any]:
    """Parse TOML text (tomllib on 3.11+, tomli on 3.10); raises TOMLDecodeError."""
    return tomllib.loads(text)


def sha256_file(path: Path | str, limit: int | None = None) -> str:
    """Hex SHA-256 of a file, read in chunks; with `limit`, of at most its first `limit` bytes.

    Not `hashlib.file_digest`: that is Python 3.11+, and the appliance supports 3.10.
    """
    digest = hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            chunk = f.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            if left is not None:
                left -= len(chunk)
    return digest.hexdigest()


def atomic_write(
    path: Path,
    data: bytes,
    mode: int,
    *,
    owner: tuple[int, int] | None = None,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Write a whole new file, then rename it over `path`: readers see the old or the new bytes, never a mix.

    The temp file has a random name and is created with O_EXCL|O_NOFOLLOW, so a file or symlink planted
    in a shared folder is never written through or reused; `check` may refuse the temp file before the swap.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        _fill(fd, data, mode, owner)
        if check is not None:
            check(tmp)
        durable_replace(tmp, path)
        _verify_written(fd, path, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def durable_replace(tmp: Path, path: Path) -> None:
    """Rename a finished file over `path` and fsync the folder, so the rename itself survives a power cut."""
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_secret(path: Path, data: bytes) -> None:
    """Create a file readable by the owner only (0600), atomically, never widening an existing one."""
    atomic_write(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write a non-secret file (certificate, policy) as 0644 atomically."""
    atomic_write(path, data, 0o644)


def _fill(fd: int, data: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    """All the bytes, the exact mode (not what the umask leaves) and the owner, on disk before the rename."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fchmod(fd, mode)
    if owner is not None and owner != (os.geteuid(), os.getegid()):
        os.fchown(fd, *owner)
    os.fsync(fd)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _verify_written(fd: int, path: Path, mode: int) -> None:
    """The name must now be our regular file with exactly `mode`; otherwise someone raced the rename."""
    mine, st = os.fstat(fd), os.lstat(path)
    if (
        (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino)
        or not stat.S_ISREG(st.st_mode)
        or stat.S_IMODE(st.st_mode) != mode
    ):
        raise SetupError(
            f"{path}: not the file just written with mode {mode:o} "
            f"(mode {stat.S_IMODE(st.st_mode):o}); another user may control {path.parent}",
            hint=f"use a folder only you can write (chmod 700 {path.parent}) and retry",
        )
