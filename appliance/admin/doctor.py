"""`qwen-appliance doctor`: one table of checks with pass/warn/fail and a hint each; the first thing to run.

Each check is a small function returning (status, detail, hint); one that raises counts as a failure, so
the doctor itself never crashes on a broken box.
"""

from __future__ import annotations

import datetime as dt
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from appliance import files
from appliance.config.load import load_policy
from appliance.config.policy import Policy
from appliance.config.trusted import check_file_modes
from appliance.errors import ApplianceError

PASS, WARN, FAIL = "pass", "warn", "FAIL"
Result = tuple[str, str, str]  # status, detail, hint


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    hint: str


def run_checks(policy_file: Path | None, hash_models: bool = True) -> list[Check]:
    """Every check in order; the policy-based ones warn as skipped when there is no valid policy."""
    policy: Policy | None = None
    results: list[Check] = []
    if policy_file is not None:
        try:
            policy = load_policy(policy_file)
            results.append(
                Check("policy valid", PASS, f"{len(policy.clients)} clients, sha256 {policy.digest[:16]}", "")
            )
        except ApplianceError as exc:
            results.append(Check("policy valid", FAIL, str(exc), exc.hint or ""))
    per_policy: list[tuple[str, Callable[[Policy], Result]]] = [
        ("file permissions", _modes),
        ("certificates", _certificates),
        ("model files", lambda p: _models(p, hash_models)),
        ("audit directory", _audit),
        ("listen port", _port),
    ]
    for name, fn in per_policy:
        results.append(_run(name, None if policy is None else partial(fn, policy)))
    for name, fn0 in (("llama.cpp build", _build), ("GPU (NVML)", _gpu), ("clock", _clock)):
        results.append(_run(name, fn0))
    return results


def _run(name: str, fn: Callable[[], Result] | None) -> Check:
    """One check; an exception is a failure with its message, never a crash of the doctor."""
    if fn is None:
        return Check(name, WARN, "skipped: no valid policy", "pass --policy FILE")
    try:
        return Check(name, *fn())
    except ApplianceError as exc:
        return Check(name, FAIL, exc.message, exc.hint or "see the message")
    except Exception as exc:
        return Check(name, FAIL, f"{type(exc).__name__}: {exc}", "report this with the full output")


def _modes(policy: Policy) -> Result:
    check_file_modes(policy)
    return PASS, "policy, certificates and key are not writable/readable by others", ""


def _certificates(policy: Policy) -> Result:
    from appliance.security import certfacts
    from appliance.security.tls import server_context

    server_context(policy.server)  # key matches certificate, CA loads
    claims = certfacts.pem_facts(policy.server.tls_cert)
    days, names = claims.days_left(), list(claims.sans)
    host = policy.server.host
    detail = f"server certificate valid {days} more days; SANs {', '.join(names) or 'none'}"
    if days < 0:
        return FAIL, detail, "issue a new one: `qwen-appliance cert server`"
    wildcard = ("0.0.0.0", "::")  # noqa: S104 - compared with the listen host, never bound  # nosec B104
    if host not in wildcard and host not in names:
        return WARN, detail, f"clients connecting to {host} will not match the certificate"
    if days < 30:
        return WARN, detail, "renew soon: `qwen-appliance cert server`, then `systemctl reload`"
    return PASS, detail, ""


def _models(policy: Policy, hash_models: bool) -> Result:
    m = policy.model
    notes = []
    for path, pin, key in ((m.path, m.sha256, "sha256"), (m.mmproj, m.mmproj_sha256, "mmproj_sha256")):
        if path is None:
            notes.append("no mmproj: text only")
            continue
        if not path.is_file():
            return FAIL, f"{path} not found", "copy the GGUF there or `qwen-appliance model import`"
        if pin and hash_models:
            digest = files.sha256_file(path)
            if digest != pin.lower():
                return FAIL, f"{path}: SHA-256 differs from [model] {key}", "re-copy the file"
            notes.append(f"{path.name} matches its pinned SHA-256")
        elif not pin:
            notes.append(f"{path.name} present, not pinned")
    unpinned = any("not pinned" in n for n in notes)
    return (
        (WARN if unpinned else PASS),
        "; ".join(notes),
        ("pin digests with [model] sha256 / mmproj_sha256" if unpinned else ""),
    )


def _audit(policy: Policy) -> Result:
    import psutil

    from appliance.audit.log import load_hmac_key

    load_hmac_key(policy.audit.hmac_key_file)
    d = policy.audit.dir
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.NamedTemporaryFile(dir=d, prefix=".doctor-"):
        pass
    free = psutil.disk_usage(str(d)).free // 2**20
    detail = f"{d} writable, {free} MB free"
    if free < policy.health.min_audit_free_mb:
        return FAIL, detail, f"below [health] min_audit_free_mb ({policy.health.min_audit_free_mb})"
    return PASS, detail, ""


def _port(policy: Policy) -> Result:
    host, port = policy.server.host, policy.server.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return (
                WARN,
                f"{host}:{port} is in use ({exc.strerror})",
                (
                    "fine if the appliance is running (`systemctl status qwen-appliance`); else find the "
                    f"owner with `ss -ltnp 'sport = :{port}'`"
                ),
            )
    return PASS, f"{host}:{port} is free", ""


def _build() -> Result:
    from appliance.engine.loader import describe_build

    info = describe_build()
    system = str(info["system_info"])
    gpu = bool(info["gpu_offload_supported"])
    detail = f"llama-cpp-python {info['llama_cpp_python']}; GPU offload {'yes' if gpu else 'no'}; {system}"
    if "AMX" in system and "AMX_INT8 = 1" in system and _cpu_flag("amx_tile"):
        return (
            WARN,
            detail,
            ("AMX kernels are built in; in VMs AMX can fault: rebuild with -DGGML_NATIVE=OFF (see README)"),
        )
    if not gpu:
        return WARN, detail, "CPU-only build: on the GPU box rebuild with CMAKE_ARGS=-DGGML_CUDA=on"
    return PASS, detail, ""


def _cpu_flag(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _gpu() -> Result:
    from appliance.engine.gpu import GpuMonitor

    monitor = GpuMonitor()
    snap = monitor.poll_once()
    monitor.stop()
    if not snap.get("available"):
        return WARN, f"no GPU: {snap.get('reason')}", "inference runs on the CPU (set require_gpu to forbid)"
    devs = ", ".join(
        f"{d.get('name')} {d.get('memory_used_mb')}/{d.get('memory_total_mb')} MB {d.get('temperature_c')} °C"
        for d in snap.get("devices", [])
    )
    return PASS, f"driver {snap.get('driver_version')}, CUDA {snap.get('cuda_version')}: {devs}", ""


def _clock() -> Result:
    now = dt.datetime.now(dt.timezone.utc)
    if now.year < 2025:
        return FAIL, f"system clock says {now.isoformat()}", "fix NTP: certificates and the audit rely on it"
    synced = Path("/run/systemd/timesync/synchronized").exists()
    return PASS, f"{now.isoformat(timespec='seconds')}{' (NTP synchronized)' if synced else ''}", ""


def render(results: list[Check]) -> str:
    """A fixed-width table an admin can paste into a ticket."""
    width = max(len(c.name) for c in results)
    lines = []
    for c in results:
        lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
        if c.hint and c.status != PASS:
            lines.append(f"{'':<4}  {'':<{width}}  hint: {c.hint}")
    failed = sum(c.status == FAIL for c in results)
    warned = sum(c.status == WARN for c in results)
    lines.append(f"\n{len(results)} checks: {failed} failed, {warned} warnings")
    return "\n".join(lines)
