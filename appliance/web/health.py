"""What an admin needs to know about the box at a glance (GET /api/v1/health) and what makes /readyz 503."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

import psutil
from cryptography import x509

from appliance.config.policy import Policy
from appliance.engine.gpu import critical_reasons


def cert_days_left(path: Path | None) -> int | None:
    """Days until a PEM certificate expires (negative once expired); None when unreadable."""
    if path is None:
        return None
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return (cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)).days


def audit_free_mb(policy: Policy) -> int | None:
    try:
        return int(psutil.disk_usage(str(policy.audit.dir)).free // 2**20)
    except OSError:
        return None


def not_ready_reasons(policy: Policy, gpu: dict[str, Any], audit_failing: str | None) -> list[str]:
    """Critical conditions from [health]: each one keeps /readyz at 503 while it holds."""
    h = policy.health
    reasons = []
    if audit_failing:
        reasons.append(f"audit trail not writable: {audit_failing}")
    free = audit_free_mb(policy)
    if free is not None and free < h.min_audit_free_mb:
        reasons.append(f"audit disk has {free} MB free, below [health] min_audit_free_mb "
                       f"{h.min_audit_free_mb}")
    reasons += critical_reasons(gpu, h.max_gpu_temp_c, h.fail_on_ecc_uncorrected)
    return reasons


def host_figures(policy: Policy) -> dict[str, Any]:
    """CPU, memory and disk of the host, from psutil."""
    vm = psutil.virtual_memory()
    return {"cpu_percent": psutil.cpu_percent(interval=None), "cpu_count": os.cpu_count(),
            "load_avg": list(os.getloadavg()), "memory_total_mb": vm.total // 2**20,
            "memory_available_mb": vm.available // 2**20,
            "process_rss_mb": psutil.Process().memory_info().rss // 2**20,
            "audit_dir_free_mb": audit_free_mb(policy)}


def certificates(policy: Policy) -> dict[str, int | None]:
    s = policy.server
    return {"server_days_left": cert_days_left(s.tls_cert),
            "client_ca_days_left": cert_days_left(s.client_ca)}


def policy_facts(policy: Policy, loaded_at: float) -> dict[str, Any]:
    return {"file": str(policy.file), "sha256": policy.digest, "clients": len(policy.clients),
            "loaded_at": dt.datetime.fromtimestamp(loaded_at, dt.timezone.utc).isoformat(),
            "age_s": round(time.time() - loaded_at)}
