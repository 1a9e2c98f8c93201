"""Health: liveness, readiness, the admin's report (GET /api/v1/health) and metrics, with their facts.

The facts (what makes /readyz 503, host and certificate figures) are plain functions the handlers serve.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from typing import Any

import psutil
from litestar import Request, Response, get

from appliance.config.policy import Policy
from appliance.engine.gpu import critical_reasons
from appliance.security.certfacts import days_left_in_file
from appliance.web.metrics import CONTENT_TYPE
from appliance.web.runtime import json_response, runtime


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
        reasons.append(
            f"audit disk has {free} MB free, below [health] min_audit_free_mb {h.min_audit_free_mb}"
        )
    reasons += critical_reasons(gpu, h.max_gpu_temp_c, h.fail_on_ecc_uncorrected)
    return reasons


def host_figures(policy: Policy) -> dict[str, Any]:
    """CPU, memory and disk of the host, from psutil."""
    vm = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "cpu_count": os.cpu_count(),
        "load_avg": list(os.getloadavg()),
        "memory_total_mb": vm.total // 2**20,
        "memory_available_mb": vm.available // 2**20,
        "process_rss_mb": psutil.Process().memory_info().rss // 2**20,
        "audit_dir_free_mb": audit_free_mb(policy),
    }


def certificates(policy: Policy) -> dict[str, int | None]:
    s = policy.server
    return {
        "server_days_left": days_left_in_file(s.tls_cert),
        "client_ca_days_left": days_left_in_file(s.client_ca),
    }


def policy_facts(policy: Policy, loaded_at: float) -> dict[str, Any]:
    return {
        "file": str(policy.file),
        "sha256": policy.digest,
        "clients": len(policy.clients),
        "loaded_at": dt.datetime.fromtimestamp(loaded_at, dt.timezone.utc).isoformat(),
        "age_s": round(time.time() - loaded_at),
    }


# --- handlers -----------------------------------------------------------------------------------


@get("/healthz")
async def healthz() -> Response[bytes]:
    """Liveness: the process answers. No identity needed, nothing revealed."""
    return json_response({"status": "ok"})


@get("/readyz")
async def readyz(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Readiness: 200 only while the model is loaded and the daemon is not draining."""
    rt = runtime(request)
    if rt.draining:
        return json_response({"status": "draining"}, 503, {"retry-after": "5"})
    reasons = not_ready_reasons(rt.policy, rt.gpu_snapshot(), rt.trail.failing)
    if reasons:
        return json_response({"status": "not_ready", "reasons": reasons}, 503, {"retry-after": "5"})
    m = rt.model
    queue = {"waiting": rt.scheduler.waiting, "busy": rt.scheduler.busy, "max": rt.scheduler.max_queue}
    return json_response(
        {
            "status": "ready",
            "model": m.name,
            "images": m.supports_images,
            "queue": queue,
            "gpu_offload": {"supported": m.gpu_offload_supported, "active": m.gpu_offload_active},
        }
    )


@get("/api/v1/health")
async def health_report(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Everything an admin checks first (scope admin): engine, queue, GPU, host, audit, certs, policy."""
    rt = runtime(request)
    m, gpu = rt.model, rt.gpu_snapshot()
    host = await asyncio.to_thread(host_figures, rt.policy)
    return json_response(
        {
            "status": "draining" if rt.draining else "ok",
            "not_ready": not_ready_reasons(rt.policy, gpu, rt.trail.failing),
            "engine": {
                "model": m.name,
                "architecture": m.architecture,
                "quantization": m.quantization,
                "model_sha256": m.model_sha256,
                "mmproj_sha256": m.mmproj_sha256,
                "images": m.supports_images,
                "n_ctx": m.n_ctx,
                "threads": m.threads,
                "gpu_offload": {
                    "supported": m.gpu_offload_supported,
                    "active": m.gpu_offload_active,
                    "n_gpu_layers": m.n_gpu_layers,
                },
                "busy": rt.scheduler.busy,
            },
            "queue": {
                "waiting": rt.scheduler.waiting,
                "max": rt.scheduler.max_queue,
                "intake": {
                    "workers": rt.intake.workers,
                    "busy": rt.intake.busy,
                    "waiting": rt.intake.waiting,
                },
            },
            "gpu": gpu,
            "host": host,
            "audit": {
                "failing": rt.trail.failing,
                "dir": str(rt.policy.audit.dir),
                "fsync": rt.policy.audit.fsync,
                "records_failed": rt.trail.audit.failures,
            },
            "certificates": certificates(rt.policy),
            "policy": policy_facts(rt.policy, rt.policy_loaded_at),
        }
    )


@get("/metrics")
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Prometheus text format (scope metrics)."""
    rt = runtime(request)

    def refresh() -> None:
        rt.metrics.queue_depth.set(rt.scheduler.waiting + rt.intake.waiting)  # for the engine or intake
        for name, days in certificates(rt.policy).items():
            if days is not None:
                rt.metrics.cert_days.labels(name.removesuffix("_days_left")).set(days)
        rt.metrics.observe_gpu(rt.gpu_snapshot())

    return Response(rt.metrics.render(refresh), media_type=CONTENT_TYPE)


HANDLERS = [healthz, readyz, health_report, metrics]
