"""Policy reload on SIGHUP or file change: validate the whole new policy, then swap it in atomically.

An invalid policy is rejected as a whole and the running one stays. Certificates and the client CA are
re-read into the live TLS context, so new connections use them without a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from .audit import AuditLog, AuditUnavailable
from .errors import ConfigError, TLSSetupError
from .policy import Policy, check_file_modes, load_policy

log = logging.getLogger("appliance.reload")

RESTART_ONLY = ("listen address", "model", "body size ceiling", "audit settings")


def _digest(path: Path | None) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path else None
    except OSError:
        return None


class PolicyReloader:
    """Owns the live policy; `apply` receives every accepted policy (runtime, queue, limits)."""

    def __init__(self, policy: Policy, tls: ssl.SSLContext, apply: Callable[[Policy], None],
                 audit: AuditLog | None = None, on_outcome: Callable[[str], None] | None = None) -> None:
        self.policy = policy
        self.audit = audit
        self.on_outcome = on_outcome
        self.tls = tls
        self.apply = apply
        self._tls_digests = self._tls_files(policy)
        self._file_digest = _digest(policy.file)
        self.accepted = 0
        self.rejected = 0

    @staticmethod
    def _tls_files(policy: Policy) -> tuple[str | None, ...]:
        s = policy.server
        return (_digest(s.tls_cert), _digest(s.tls_key), _digest(s.client_ca))

    def reload(self, reason: str) -> bool:
        """Re-read the policy file; True when a new policy is now in force."""
        old = self.policy
        self._file_digest = _digest(old.file)
        try:
            new = load_policy(old.file)
            check_file_modes(new)
            self._reload_tls(new)
        except ConfigError as exc:
            self.rejected += 1
            log.error("policy reload (%s) REJECTED, still enforcing %s: %s", reason,
                      old.digest[:16], exc)
            keys = sorted({e.key or "-" for e in getattr(exc, "errors", [exc])})
            self._record("rejected", reason, old.digest, _digest(old.file), ", ".join(keys))
            return False
        self._warn_restart_only(old, new)
        self.policy = new
        self.apply(new)
        self.accepted += 1
        self._record("accepted", reason, old.digest, new.digest, None)
        log.info("policy reload (%s) accepted: %s -> %s, %d clients", reason, old.digest[:16],
                 new.digest[:16], len(new.clients))
        return True

    def _record(self, outcome: str, trigger: str, old: str, new: str | None, keys: str | None) -> None:
        """Audit (and count) every reload; a failure here is logged, the reload decision stands."""
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        if self.audit is None:
            return
        try:
            self.audit.write("policy.reload", outcome=outcome, reason=trigger, old_policy_sha256=old,
                             new_policy_sha256=new, rejected_keys=keys)
        except AuditUnavailable as exc:
            log.error("policy reload could not be audited: %s", exc)

    def _reload_tls(self, new: Policy) -> None:
        digests = self._tls_files(new)
        if digests == self._tls_digests:
            return
        s = new.server
        try:
            self.tls.load_cert_chain(str(s.tls_cert), str(s.tls_key))
            if s.client_ca is not None:
                self.tls.load_verify_locations(cafile=str(s.client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise TLSSetupError(f"{s.tls_cert}: cannot load the new certificate/key/CA ({exc})",
                                hint="check the files named in [server]") from None
        self._tls_digests = digests
        log.info("TLS certificate, key or client CA re-read; new connections use them")

    @staticmethod
    def _warn_restart_only(old: Policy, new: Policy) -> None:
        changed = [
            (old.server.host, old.server.port) != (new.server.host, new.server.port),
            old.model != new.model,
            new.limits.max_body_bytes > old.limits.max_body_bytes,
            old.audit != new.audit,
        ]
        for what, diff in zip(RESTART_ONLY, changed, strict=True):
            if diff:
                log.warning("policy: the %s changed; it takes effect at the next restart", what)

    async def watch(self, interval: float = 1.0) -> None:
        """Poll the file's digest; a change of contents triggers a reload (no inotify dependency)."""
        while True:
            await asyncio.sleep(interval)
            current = _digest(self.policy.file)
            if current is not None and current != self._file_digest:
                self.reload("file changed")
