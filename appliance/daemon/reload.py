"""Policy reload on SIGHUP or file change: validate the whole new policy, then swap it in atomically.

An invalid policy is rejected as a whole and the running one stays. Every reload builds a whole new TLS
context (certificate, key, client CA, client_cert mode) for new handshakes; see connections.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import files
from appliance.audit.log import AuditLog, AuditUnavailable
from appliance.config import live as livepolicy
from appliance.config.load import load_policy
from appliance.config.policy import Policy, setting_value
from appliance.config.settings import restart_keys
from appliance.config.trusted import check_file_modes, file_signature
from appliance.errors import ConfigError, SetupError

if TYPE_CHECKING:
    from appliance.daemon.connections import ServerTLS

log = logging.getLogger("appliance.daemon.reload")

RESTART_ONLY = restart_keys()  # from the settings table's `restart` field
POLL_S = 0.1  # the watcher's stat() interval
SETTLE_POLLS = 2  # a changed file must be unchanged this long (and closed by its writer) before a reload
FALLBACK_SETTLE_POLLS = 10  # without inotify nothing says a writer is done: wait a full second


def _signature(path: Path) -> tuple[int, ...] | None:
    try:
        return file_signature(os.stat(path))
    except OSError:
        return None


def _digest(path: Path | None) -> str | None:
    try:
        return files.sha256_file(path) if path else None
    except OSError:
        return None


class PolicyReloader:
    """Owns the live policy; `apply` receives every accepted policy (runtime, queue, limits)."""

    def __init__(
        self,
        policy: Policy,
        tls: ServerTLS,
        apply: Callable[[Policy], None],
        audit: AuditLog | None = None,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        self.policy = policy
        self.audit = audit
        self.on_outcome = on_outcome
        self.tls = tls
        self.apply = apply
        self._tls_digests = self._tls_files(policy)
        self._file_digest = _digest(policy.file)
        self._file_sig = _signature(policy.file)
        self._writers: livepolicy.WriteWatch | None = None
        self._pending: str | None = None
        self._status = livepolicy.status_path(policy.audit.dir)
        self.accepted = 0
        self.rejected = 0

    @staticmethod
    def _tls_files(policy: Policy) -> tuple[str | None, ...]:
        s = policy.server
        return (_digest(s.tls_cert), _digest(s.tls_key), _digest(s.client_ca))

    def reload(self, reason: str) -> bool:
        """Re-read the policy file; True when a new policy is now in force. Deferred while being written."""
        old = self.policy
        if self._writers is not None and self._writers.busy():
            self._pending = reason
            log.warning(
                "policy reload (%s) deferred: %s is open for writing; it is read once its writer closes it",
                reason,
                old.file,
            )
            return False
        self._pending = None
        self._file_sig = _signature(old.file)
        self._file_digest = _digest(old.file)
        try:
            new = load_policy(old.file)
            check_file_modes(new)
            self._reload_tls(new)
        except ConfigError as exc:
            self.rejected += 1
            log.error("policy reload (%s) REJECTED, still enforcing %s: %s", reason, old.digest[:16], exc)
            keys = sorted({e.key or "-" for e in getattr(exc, "errors", [exc])})
            self._record("rejected", reason, old.digest, _digest(old.file), ", ".join(keys))
            return False
        self._warn_restart_only(old, new)
        self.policy = new
        self.apply(new)
        self.accepted += 1
        self._record("accepted", reason, old.digest, new.digest, None)
        log.info(
            "policy reload (%s) accepted: %s -> %s, %d clients",
            reason,
            old.digest[:16],
            new.digest[:16],
            len(new.clients),
        )
        return True

    def _record(self, outcome: str, trigger: str, old: str, new: str | None, keys: str | None) -> None:
        """Audit (and count) every reload; a failure here is logged, the reload decision stands."""
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        self._publish(
            {"outcome": outcome, "reason": trigger, "file_sha256": new, "keys": keys, "at": time.time()}
        )
        if self.audit is None:
            return
        try:
            self.audit.write(
                "policy.reload",
                outcome=outcome,
                reason=trigger,
                old_policy_sha256=old,
                new_policy_sha256=new,
                rejected_keys=keys,
            )
        except AuditUnavailable as exc:
            log.error("policy reload could not be audited: %s", exc)

    def _reload_tls(self, new: Policy) -> None:
        """A whole new context from the new policy, swapped in for new handshakes; on any error the old
        one stays fully in force (adding to the live one could never drop a CA)."""
        from appliance.daemon.connections import check_fd_budget

        check_fd_budget(new.server, str(new.file))
        self.tls.replace(new.server, str(new.file))
        digests = self._tls_files(new)
        if digests != self._tls_digests or new.server.client_cert != self.policy.server.client_cert:
            log.info(
                "TLS settings reloaded (certificate, key, client CA or client_cert mode changed); "
                "new handshakes use them, older connections are held to them request by request"
            )
        self._tls_digests = digests

    @staticmethod
    def _warn_restart_only(old: Policy, new: Policy) -> None:
        """The keys the settings table marks `restart` are not applied by a reload: say so, key by key."""
        for s in RESTART_ONLY:
            before, after = setting_value(old, s), setting_value(new, s)
            if (after > before) if s.restart == "raise" else (after != before):
                log.warning("policy: [%s] %s changed; it takes effect at the next restart", s.section, s.key)

    def _publish(self, last: dict[str, object]) -> None:
        """Tell admin commands which policy is in force; they wait for it (see livepolicy.confirm)."""
        try:
            livepolicy.publish(self._status, self.policy.file, self.policy.digest, last)
        except (OSError, SetupError) as exc:
            log.error("cannot write %s (admin commands cannot confirm reloads): %s", self._status, exc)

    def _open_writers(self) -> livepolicy.WriteWatch | None:
        file = self.policy.file
        try:
            return livepolicy.WriteWatch(sorted({file.absolute(), Path(os.path.realpath(file))}))
        except OSError as exc:
            log.warning(
                "inotify unavailable (%s): a changed policy is reloaded once unchanged for "
                "%.0f s; write it atomically",
                exc,
                FALLBACK_SETTLE_POLLS * POLL_S,
            )
            return None

    async def watch(self, interval: float = POLL_S, inotify: bool = True) -> None:
        """Reload a changed file once it has settled: unchanged for a few polls and closed by its writer."""
        self._writers = self._open_writers() if inotify else None
        settle = SETTLE_POLLS if self._writers is not None else FALLBACK_SETTLE_POLLS
        self._publish({"outcome": "started", "file_sha256": self.policy.digest, "at": time.time()})
        seen, stable = self._file_sig, 0
        try:
            while True:
                await asyncio.sleep(interval)
                sig = _signature(self.policy.file)
                stable = stable + 1 if sig == seen else 0
                seen = sig
                if self._writers is not None and self._writers.busy():
                    stable = 0
                elif stable >= settle and sig is not None:
                    try:
                        self._poll_due(sig)
                    except Exception:  # the watcher must outlive any one bad reload
                        log.exception(
                            "policy reload failed unexpectedly; still enforcing %s", self.policy.digest[:16]
                        )
                        self._file_sig = sig
        finally:
            if self._writers is not None:
                self._writers.close()
                self._writers = None
            livepolicy.withdraw(self._status)

    def _poll_due(self, sig: tuple[int, ...]) -> None:
        """A deferred SIGHUP, or a settled change of contents, triggers the reload."""
        if self._pending is not None:
            self.reload(self._pending)
        elif sig != self._file_sig:
            if _digest(self.policy.file) == self._file_digest:
                self._file_sig = sig  # touched or rewritten with the same bytes
            else:
                self.reload("file changed")
