"""The daemon: policy → TLS context → audit trail → engine → uvicorn over HTTPS, then an orderly stop.

Start-up fails early and clearly (policy, TLS, file modes, audit, port) before the slow model load; the
HTTP protocol class with the client certificate and request deadlines is in protocol.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import uvicorn

from appliance import __version__
from appliance.audit.log import AuditLog, AuditUnavailable, Hmac, load_hmac_key
from appliance.audit.record import Trail
from appliance.config.load import load_policy
from appliance.config.policy import Policy
from appliance.config.trusted import check_file_modes
from appliance.daemon import sdnotify
from appliance.daemon.connections import Listener, ServerTLS, check_fd_budget
from appliance.daemon.harden import harden_process
from appliance.daemon.protocol import CertAwareProtocol
from appliance.daemon.reload import PolicyReloader
from appliance.engine.batch import Engine
from appliance.engine.gpu import GpuMonitor
from appliance.engine.job import Job
from appliance.engine.scheduler import Scheduler
from appliance.engine.types import Completion
from appliance.errors import ApplianceError, ModelLoadError, SetupError
from appliance.web.app import build_app
from appliance.web.metrics import Metrics
from appliance.web.runtime import Runtime

log = logging.getLogger("appliance.daemon.serve")
TINY_MODEL_MARK = "random weights"


class ApplianceServer(uvicorn.Server):
    """uvicorn's server plus policy reload (SIGHUP, file change) and draining on shutdown."""

    def __init__(
        self, config: uvicorn.Config, runtime: Runtime, reloader: PolicyReloader, listener: Listener
    ) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.reloader = reloader
        self.listener = listener

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reloader.reload, "SIGHUP")
        tasks = [
            loop.create_task(self.reloader.watch()),
            loop.create_task(self._purge_hourly()),
            loop.create_task(sdnotify.watchdog_loop(self.runtime.scheduler.healthy)),
        ]
        try:
            await super().serve(sockets)
        finally:
            for task in tasks:
                task.cancel()
            loop.remove_signal_handler(signal.SIGHUP)
            await self.listener.refusals.flush()  # suppressed refusals are summarised, never lost

    async def _purge_hourly(self) -> None:
        while True:
            await asyncio.sleep(3600)
            try:
                await asyncio.to_thread(self.runtime.trail.audit.purge)
            except (OSError, AuditUnavailable) as exc:
                log.error("audit retention purge failed: %s", exc)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """READY=1 only once the model is loaded (before this) and the listener is up (now)."""
        await super().startup(sockets)
        if self.started:
            m = self.runtime.model
            sdnotify.ready(f"serving {m.name}; GPU offload {'active' if m.gpu_offload_active else 'off'}")

    def handle_exit(self, sig: int, frame: Any) -> None:
        sdnotify.stopping()
        self.runtime.draining = True
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # a requested, drained shutdown exits 0, not by re-raising


def setup_logging(level: str = "INFO") -> None:
    """Plain lines on stderr (the journal under systemd); request content is never logged."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn.access").disabled = True


def uvicorn_config(app: Any, listener: Listener, host: str, port: int) -> uvicorn.Config:
    """uvicorn without TLS of its own: the listener wraps each connection (see connections.py); no
    WebSockets, whose scopes would go around the gate."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=cast(Any, listener),
        ws="none",
        loop="auto",
        proxy_headers=False,
        server_header=False,
        access_log=False,
        log_config=None,
        lifespan="off",
        timeout_graceful_shutdown=30,
        timeout_keep_alive=15,
        h11_max_incomplete_event_size=16 * 1024,
    )


def serve(policy_file: Path, listen: tuple[str, int] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    policy = load_policy(policy_file)
    log.info("process hardening: %s", harden_process(mlock=policy.model.use_mlock))
    check_file_modes(policy)
    tls = ServerTLS(policy.server)  # fail on TLS problems before the slow model load
    check_fd_budget(policy.server, str(policy.file))
    audit = open_audit(policy)  # and when the audit trail cannot be written
    audit.write(
        "daemon.start", reason=f"qwen-appliance {__version__}", pid=os.getpid(), policy_sha256=policy.digest
    )
    host, port = listen or (policy.server.host, policy.server.port)
    gpu = GpuMonitor()
    try:
        sockets = sdnotify.listen_fds()  # socket activation: systemd owns the LAN listener
        if sockets:
            log.info("serving %d socket(s) passed by systemd; [server] listen is not used", len(sockets))
        else:
            sockets = [bind(host, port)]  # take it now: a taken port fails before the model load
        gpu.start(policy.health.gpu_poll_seconds)
        engine = load_engine(policy, audit, gpu.snapshot())
    except ApplianceError as exc:
        gpu.stop()
        audit.write("daemon.stop", reason=f"start-up failed: {exc.message}")
        audit.close()
        raise
    metrics = Metrics()
    trail = Trail(audit, Hmac(load_hmac_key(policy.audit.hmac_key_file)), policy.audit.fail_closed, metrics)
    scheduler = Scheduler(engine, policy.limits.max_queue, on_done=_observer(metrics))
    runtime = Runtime(
        policy=policy, model=engine.info, scheduler=scheduler, trail=trail, metrics=metrics, gpu=gpu
    )
    reloader = PolicyReloader(
        policy, tls, runtime.apply_policy, audit, lambda outcome: metrics.reloads.labels(outcome).inc()
    )
    app = build_app(runtime)
    listener = Listener(CertAwareProtocol, tls, lambda: runtime.policy, metrics, app.refusals)
    server = ApplianceServer(uvicorn_config(app, listener, host, port), runtime, reloader, listener)
    try:
        server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
        scheduler.close()
        runtime.intake.close()
        engine.close()
        trail.close()
        gpu.stop()
        audit.write("daemon.stop", reason="shutdown")
        audit.close()
    return 0 if server.started else 1


def open_audit(policy: Policy) -> AuditLog:
    """Open the trail (repairing a torn tail) and purge expired files; failure stops start-up."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit must surface as EFBIG, not a kill
    load_hmac_key(policy.audit.hmac_key_file)
    audit = AuditLog(policy.audit)
    try:
        audit.open()
        audit.purge()
    except OSError as exc:
        raise SetupError(
            f"{policy.audit.dir}: the audit trail cannot be written ({exc.strerror})",
            hint="check [audit] dir exists, is writable by the service user and has free space",
        ) from None
    except AuditUnavailable as exc:  # at start-up a record that cannot be written is a set-up problem
        raise SetupError(exc.message, hint=exc.hint) from None
    return audit


def _observer(metrics: Metrics) -> Callable[[Job, Completion], None]:
    """Feed finished generations into the metrics (queue wait, time to first token, speed)."""

    def observe(job: Job, c: Completion) -> None:
        first = job.first_piece_at
        ttft = first - job.submitted_at if first is not None else None
        decode = time.monotonic() - first if first is not None else 0.0
        metrics.observe_generation(
            job.queue_ms / 1000,
            ttft,
            decode,
            c.usage.prompt_tokens,
            c.usage.completion_tokens,
            c.usage.cached_tokens,
        )

    return observe


def load_engine(policy: Policy, audit: AuditLog, gpu: dict[str, Any]) -> Engine:
    """Load the model, log and audit what was loaded; refuse CPU fallback when the policy says so."""
    engine = Engine.load(policy.model)
    info = engine.info
    if policy.model.require_gpu and not (info.gpu_offload_active and gpu.get("available")):
        engine.close()
        why = (
            "this llama-cpp-python build has no GPU offload (CPU build)"
            if not info.gpu_offload_supported
            else f"no usable GPU: {gpu.get('reason')}"
            if not gpu.get("available")
            else "[model] n_gpu_layers = 0"
        )
        raise ModelLoadError(
            f"[model] require_gpu = true, but {why}",
            hint="build with CMAKE_ARGS=-DGGML_CUDA=on (see README), check the driver "
            "with nvidia-smi, or set require_gpu = false to allow CPU inference",
        )
    log.info(
        "model %s: %s %s, %d bytes, sha256 %s; GPU offload %s",
        info.name,
        info.architecture,
        info.quantization,
        info.model_bytes,
        info.model_sha256,
        "ACTIVE" if info.gpu_offload_active else "not active (CPU inference)",
    )
    if info.mmproj_path:
        log.info("mmproj %s: %d bytes, sha256 %s", info.mmproj_path, info.mmproj_bytes, info.mmproj_sha256)
    audit.write(
        "model.load",
        model_sha256=info.model_sha256,
        mmproj_sha256=info.mmproj_sha256,
        model_bytes=info.model_bytes,
        mmproj_bytes=info.mmproj_bytes,
        reason=f"{info.architecture} {info.quantization}; GPU offload "
        f"{'active' if info.gpu_offload_active else 'not active'}",
    )
    _warn_if_tiny(engine)
    return engine


def bind(host: str, port: int) -> socket.socket:
    """Take the listening socket before loading the model, so a taken port fails fast and clearly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise SetupError(
            f"cannot create a listening socket ({exc.strerror})",
            hint="under systemd, start qwen-appliance.socket: the service itself has no "
            "network access by design",
        ) from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise SetupError(
            f"cannot listen on {host}:{port}: {exc.strerror}",
            hint=f"is another program using the port? `ss -ltnp 'sport = :{port}'`; "
            "or change [server] listen",
        ) from None
    sock.set_inheritable(False)
    return sock


def _warn_if_tiny(engine: Engine) -> None:
    if TINY_MODEL_MARK in engine.info.description.lower():
        banner = "!" * 78
        log.warning(
            "%s\nSERVING THE SMOKE-TEST MODEL: random weights, answers are gibberish.\n"
            "Point [model] path and mmproj at a real Qwen3-VL GGUF (see README).\n%s",
            banner,
            banner,
        )
