"""Trusted files: who may own them and every folder on their way, their modes, and reading them whole.

A policy, certificate or key that others could change, replace or read is refused, as is a read that
raced a writer; these checks run at start-up, on every reload and in `policy check`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from pathlib import Path

from appliance.config.policy import Policy
from appliance.errors import ConfigError, Problems


def file_signature(st: os.stat_result) -> tuple[int, ...]:
    """What changes whenever a file's bytes change: inode, size and modification times."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_stable(path: Path, tries: int = 5) -> bytes:
    """The bytes of a file nobody is writing: the same inode, size and mtime before, after and by name.

    A file written in place can parse when only its first part is there; such a read is retried, then refused.
    """
    for _ in range(tries):
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            raw = f.read()
            after = os.fstat(f.fileno())
        if (
            file_signature(before) == file_signature(after) == file_signature(os.stat(path))
            and len(raw) == after.st_size
        ):
            return raw
        time.sleep(0.05)
    raise ConfigError(
        path,
        None,
        "the file kept changing while it was read",
        hint="write policy files atomically: a new file in the same folder, then `mv` it "
        "over the policy (`qwen-appliance token` and `cert revoke` do this)",
    )


SERVICE_USER = "qwen-appliance"  # the packaged daemon's account (systemd/qwen-appliance.sysusers)
_MAX_LINKS = 40


def _local_users() -> dict[int, str]:
    """uid → name from /etc/passwd itself: NSS (nscd, LDAP) would open sockets from the daemon."""
    users: dict[int, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/passwd").read_text(errors="replace").splitlines():
            fields = line.split(":")
            if len(fields) > 2 and fields[2].isdigit():
                users.setdefault(int(fields[2]), fields[0])
    return users


def trusted_owners() -> frozenset[int]:
    """Who may own a trusted file or folder: root, this process's user, and the service account."""
    uids = {0, os.geteuid()}
    uids.update(uid for uid, name in _local_users().items() if name == SERVICE_USER)
    return frozenset(uids)


def _owner_name(uid: int) -> str:
    name = _local_users().get(uid)
    return f"{uid} ({name})" if name else str(uid)


def _walk(path: Path, links: list[int]) -> tuple[Path, list[tuple[Path, os.stat_result]]]:
    """Resolve `path` by hand: its real path and (entry, lstat) of every folder and link passed through."""
    cur, seen = Path("/"), [(Path("/"), os.lstat("/"))]
    for name in (path if path.is_absolute() else Path.cwd() / path).parts[1:]:
        if name == "..":
            cur = cur.parent
            continue
        entry = cur / name
        st = os.lstat(entry)
        seen.append((entry, st))
        if not stat.S_ISLNK(st.st_mode):
            cur = entry
            continue
        links[0] += 1
        if links[0] > _MAX_LINKS:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", str(path))
        target = Path(os.readlink(entry))
        cur, more = _walk(target if target.is_absolute() else cur / target, links)
        seen += more[1:]
    return cur, seen


def _check_chain(errs: Problems, path: Path, key: str | None) -> os.stat_result | None:
    """Every folder and link that leads to `path` must be owned by a trusted user and not writable by others.

    A sticky folder others can write (/tmp) is fine above the file's own folder: there nobody can rename
    entries they do not own, and every entry on the way is checked to be ours or root's.
    """
    owners = trusted_owners()
    try:
        real, seen = _walk(path, [0])
    except OSError as exc:
        errs.add(key, f"{path}: cannot read ({exc.strerror})", hint="check the path")
        return None
    for entry, st in dict(seen).items():  # each once, in order
        if st.st_uid not in owners:
            what = "symbolic link" if stat.S_ISLNK(st.st_mode) else "folder" if entry != real else "file"
            errs.add(
                key,
                f"{entry}: the {what} on the way to {path} is owned by {_owner_name(st.st_uid)}, "
                "not root or the service user",
                hint=f"chown root {entry} (or move {path})",
            )
        elif (
            stat.S_ISDIR(st.st_mode)
            and entry != real
            and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            and (not st.st_mode & stat.S_ISVTX or entry == real.parent)
        ):
            errs.add(
                key,
                f"{entry}: folder writable by group or others (mode {stat.S_IMODE(st.st_mode):o}), "
                f"so they could replace {path}",
                hint=f"chmod go-w {entry}, or move {path} "
                "to a folder only root and the service user can write",
            )
    return seen[-1][1]


def check_file_modes(policy: Policy) -> None:
    """Refuse trusted files (policy, certificates, keys) others could change, replace or read.

    Checked: the owner of each file and of each folder and link on its way from /, and the modes.
    """
    errs = Problems(policy.file)
    srv = policy.server
    for path, key in (
        (policy.file, None),
        (srv.tls_cert, "server.tls_cert"),
        (srv.client_ca, "server.client_ca"),
        (srv.tls_key, "server.tls_key"),
        (policy.audit.hmac_key_file, "audit.hmac_key_file"),
    ):
        if path is None:
            continue
        st = _check_chain(errs, path, key)
        if st is None:
            continue
        if not stat.S_ISREG(st.st_mode):
            errs.add(key, f"{path}: not a regular file", hint="point it at a file")
            continue
        mode = st.st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            errs.add(
                key,
                f"{path} is writable by group or others (mode {stat.S_IMODE(mode):o})",
                hint=f"chmod go-w {path}",
            )
        if key in ("server.tls_key", "audit.hmac_key_file") and mode & (stat.S_IRWXG | stat.S_IRWXO):
            errs.add(
                key,
                f"{path}: secret key is accessible by group or others (mode {stat.S_IMODE(mode):o})",
                hint=f"chmod 600 {path}",
            )
    errs.raise_if_any()
