"""The daemon: policy → TLS context → engine → uvicorn over HTTPS with the client certificate in every scope.

uvicorn does not fill the ASGI TLS extension, so a subclass of its httptools protocol (pinned version)
reads the verified peer certificate once per connection and puts it into each request's scope.
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

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from appliance import __version__
from appliance.audit.log import AuditConfig, AuditLog, AuditUnavailable, Hmac, load_hmac_key
from appliance.audit.record import Trail
from appliance.config.policy import Policy, check_file_modes, load_policy
from appliance.daemon import sdnotify
from appliance.daemon.connections import Handshake, Listener, ServerTLS, check_fd_budget
from appliance.daemon.harden import harden_process
from appliance.daemon.reload import PolicyReloader
from appliance.engine.batch import Engine
from appliance.engine.gpu import GpuMonitor
from appliance.engine.scheduler import Job, Scheduler
from appliance.engine.types import Completion, EngineConfig
from appliance.errors import (
    ApplianceError,
    BadRequest,
    ClientError,
    Forbidden,
    HeaderFieldsTooLarge,
    ModelLoadError,
    SetupError,
)
from appliance.security.tls import peer_cert
from appliance.web.app import Runtime, build_app
from appliance.web.metrics import Metrics

log = logging.getLogger("appliance.daemon.serve")
TINY_MODEL_MARK = "random weights"


# uvicorn bounds only the idle time between requests (timeout_keep_alive); these bound the request itself, so
# slow or endless headers and bodies (slowloris) cannot hold connections and memory open.
HEAD_TIMEOUT_S = 10.0  # request line and headers, from the end of the TLS handshake or the first byte
BODY_TIMEOUT_S = 60.0  # for each BODY_PROGRESS_BYTES of the body: a slow link is fine, a trickle is not
BODY_PROGRESS_BYTES = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024  # request line plus headers; httptools alone buffers any amount


class _Refused(Exception):
    """Raised from a parser callback to refuse the request below the gate; httptools stops parsing."""

    def __init__(self, exc: ClientError, reason: str, label: str) -> None:
        super().__init__(reason)
        self.exc, self.reason, self.label = exc, reason, label


def _upgrade() -> _Refused:
    return _Refused(BadRequest("protocol upgrades (WebSocket, h2c, CONNECT) are not served here"),
                    "protocol upgrade requested (Upgrade header or CONNECT)", "upgrade")


class CertAwareProtocol(HttpToolsProtocol):
    """Adds `scope["extensions"]["tls"]` (client certificate facts, TLS version) to every request, and
    deadlines and a size limit for each request's head and body. Refusals it makes itself (malformed
    requests, oversized heads, upgrades, connections older than the TLS policy) are audited and carry the
    security headers, like the gate's."""

    listener: Listener | None = None
    handshake: Handshake | None = None

    def attach(self, listener: Listener, handshake: Handshake) -> None:
        self.listener, self.handshake = listener, handshake

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._refusal: _Refused | None = None
        self._refusing = False
        self._arm(HEAD_TIMEOUT_S, "request headers")
        self._tls: dict[str, Any] = {"client_cert": None}
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return
        der = ssl_object.getpeercert(binary_form=True)
        self._tls = {"client_cert": peer_cert(der).as_scope() if der else None,
                     "tls_version": ssl_object.version(),
                     "cipher_suite": (ssl_object.cipher() or ("",))[0]}

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire, seconds, what)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, seconds: float, what: str) -> None:
        log.warning("closing the connection from %s: %s not received within %.0f s", self.client,
                    what, seconds)
        self._deadline = None
        self.transport.abort()

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._stop(_Refused(HeaderFieldsTooLarge(f"request line and headers are over {MAX_HEAD_BYTES} "
                                                     "bytes"),
                                f"request line and headers over {MAX_HEAD_BYTES} bytes", "headers_too_large"))

    def _stop(self, refusal: _Refused) -> None:
        """From a parser callback: remember why, and make httptools stop with a parse error."""
        self._refusal = refusal
        raise refusal

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """uvicorn's, but every parse failure becomes an audited refusal (uvicorn's own has neither)."""
        if self._refusing:
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._refuse(self._refusal or _malformed(exc))
        except httptools.HttpParserUpgrade:
            self._refuse(_upgrade())

    def send_400_response(self, msg: str) -> None:
        """Nothing in uvicorn answers unaudited: its 400 goes the same way as ours."""
        self._refuse(self._refusal or _Refused(BadRequest("the request could not be parsed"),
                                               "malformed HTTP request", "malformed"))

    def _refuse(self, refusal: _Refused) -> None:
        if self._refusing:
            return
        self._refusing = True
        self._disarm()
        if self.listener is None:  # not served by our listener (never in the daemon): plain close
            self.transport.abort()
            return
        self.transport.pause_reading()
        cert = self._tls.get("client_cert")
        idle = self.cycle is None or self.cycle.response_complete
        if not idle:  # pipelined behind a running request: that one finishes, then the connection closes
            self.cycle.keep_alive = False
        ip = self.client[0] if self.client else "unknown"
        self.listener.refuse(self.transport, ip, refusal.exc, refusal.reason, refusal.label,
                             cert.get("cert_sha256") if cert else None, answer=idle)

    def shutdown(self) -> None:
        """Drop idle keep-alive connections at once; a TLS close would wait up to 30 s for the peer."""
        if self.cycle is None or self.cycle.response_complete:
            self.transport.abort()
        else:
            self.cycle.keep_alive = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        if self._deadline is None:
            self._arm(HEAD_TIMEOUT_S, "request headers")
        tls: dict[object, object] = dict(self._tls.items())
        self.scope["extensions"] = {"tls": tls}

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade() or any(name == b"upgrade" for name, _ in self.headers):
            self._stop(_upgrade())  # WebSockets are off: nothing may go around the gate
        stale = self._stale()
        if stale is not None:
            self._stop(_Refused(Forbidden("this connection was set up under TLS settings that have since "
                                          "changed; connect again"), stale, "stale_tls"))
        self._body_bytes = 0
        self._arm(BODY_TIMEOUT_S, "request body")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes >= BODY_PROGRESS_BYTES:  # progress: the next 64 KiB get a fresh minute
            self._body_bytes = 0
            self._arm(BODY_TIMEOUT_S, "request body")
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _stale(self) -> str | None:
        """The backstop: a connection whose handshake would not pass under the TLS policy now."""
        if self.listener is None or self.handshake is None:
            return None
        return self.listener.tls.stale(self.handshake, self._tls.get("client_cert") is not None)


def _malformed(exc: Exception) -> _Refused:
    """httptools' reason is one of llhttp's fixed messages, never the request's bytes."""
    why = str(exc)[:120] if not isinstance(exc, httptools.HttpParserCallbackError) else "parser callback"
    return _Refused(BadRequest("the request is not valid HTTP/1.1"), f"malformed HTTP request ({why})",
                    "malformed")


class ApplianceServer(uvicorn.Server):
    """uvicorn's server plus policy reload (SIGHUP, file change) and draining on shutdown."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime, reloader: PolicyReloader,
                 listener: Listener) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.reloader = reloader
        self.listener = listener

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reloader.reload, "SIGHUP")
        tasks = [loop.create_task(self.reloader.watch()), loop.create_task(self._purge_hourly()),
                 loop.create_task(sdnotify.watchdog_loop(self.runtime.scheduler.healthy))]
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


def engine_config(policy: Policy) -> EngineConfig:
    m = policy.model
    return EngineConfig(
        model_path=m.path, mmproj_path=m.mmproj, n_gpu_layers=m.n_gpu_layers, n_ctx=m.n_ctx,
        threads=m.threads, chat_template=m.chat_template, name=m.name,
        image_min_tokens=m.image_min_tokens, image_max_tokens=m.image_max_tokens,
        use_mlock=m.use_mlock, split_mode=m.split_mode, main_gpu=m.main_gpu,
        tensor_split=m.tensor_split, model_sha256=m.sha256, mmproj_sha256=m.mmproj_sha256,
        parallel=m.parallel, prompt_cache=m.prompt_cache)


def setup_logging(level: str = "INFO") -> None:
    """Plain lines on stderr (the journal under systemd); request content is never logged."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn.access").disabled = True


def uvicorn_config(app: Any, listener: Listener, host: str, port: int) -> uvicorn.Config:
    """uvicorn without TLS of its own: the listener wraps each connection (see connections.py); no
    WebSockets, whose scopes would go around the gate."""
    return uvicorn.Config(
        app, host=host, port=port, http=cast(Any, listener), ws="none", loop="auto",
        proxy_headers=False, server_header=False, access_log=False, log_config=None,
        lifespan="off", timeout_graceful_shutdown=30, timeout_keep_alive=15,
        h11_max_incomplete_event_size=16 * 1024)


def serve(policy_file: Path, listen: tuple[str, int] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    policy = load_policy(policy_file)
    log.info("process hardening: %s", harden_process(mlock=policy.model.use_mlock))
    check_file_modes(policy)
    tls = ServerTLS(policy.server)  # fail on TLS problems before the slow model load
    check_fd_budget(policy.server, str(policy.file))
    audit = open_audit(policy)  # and when the audit trail cannot be written
    audit.write("daemon.start", reason=f"qwen-appliance {__version__}", pid=os.getpid(),
                policy_sha256=policy.digest)
    host, port = listen or (policy.server.host, policy.server.port)
    gpu = GpuMonitor()
    try:
        sockets = sdnotify.listen_fds()  # socket activation: systemd owns the LAN listener
        if sockets:
            log.info("serving %d socket(s) passed by systemd; [server] listen is not used",
                     len(sockets))
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
    trail = Trail(audit, Hmac(load_hmac_key(policy.audit.hmac_key_file)), policy.audit.fail_closed,
                  metrics)
    scheduler = Scheduler(engine, policy.limits.max_queue, on_done=_observer(metrics))
    runtime = Runtime(policy=policy, model=engine.info, scheduler=scheduler, trail=trail,
                      metrics=metrics, gpu=gpu)
    reloader = PolicyReloader(policy, tls, runtime.apply_policy, audit,
                              lambda outcome: metrics.reloads.labels(outcome).inc())
    app = build_app(runtime)
    listener = Listener(CertAwareProtocol, tls, lambda: runtime.policy, metrics, app.refusals)
    server = ApplianceServer(uvicorn_config(app, listener, host, port), runtime, reloader, listener)
    try:
        server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
        scheduler.close()
        engine.close()
        gpu.stop()
        audit.write("daemon.stop", reason="shutdown")
        audit.close()
    return 0 if server.started else 1


def open_audit(policy: Policy) -> AuditLog:
    """Open the trail (repairing a torn tail) and purge expired files; failure stops start-up."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit must surface as EFBIG, not a kill
    load_hmac_key(policy.audit.hmac_key_file)
    a = policy.audit
    audit = AuditLog(AuditConfig(dir=a.dir, hmac_key_file=a.hmac_key_file, fsync=a.fsync,
                                 fsync_interval_ms=a.fsync_interval_ms, rotate_bytes=a.rotate_bytes,
                                 retention_days=a.retention_days, fail_closed=a.fail_closed,
                                 forward=a.forward, forward_socket=a.forward_socket))
    try:
        audit.open()
        audit.purge()
    except OSError as exc:
        raise SetupError(f"{a.dir}: the audit trail cannot be written ({exc.strerror})",
                         hint="check [audit] dir exists, is writable by the service user and has "
                              "free space") from None
    return audit


def _observer(metrics: Metrics) -> Callable[[Job, Completion], None]:
    """Feed finished generations into the metrics (queue wait, time to first token, speed)."""
    def observe(job: Job, c: Completion) -> None:
        first = job.first_piece_at
        ttft = first - job.submitted_at if first is not None else None
        decode = time.monotonic() - first if first is not None else 0.0
        metrics.observe_generation(job.queue_ms / 1000, ttft, decode, c.usage.prompt_tokens,
                                   c.usage.completion_tokens, c.usage.cached_tokens)
    return observe


def load_engine(policy: Policy, audit: AuditLog, gpu: dict[str, Any]) -> Engine:
    """Load the model, log and audit what was loaded; refuse CPU fallback when the policy says so."""
    engine = Engine.load(engine_config(policy))
    info = engine.info
    if policy.model.require_gpu and not (info.gpu_offload_active and gpu.get("available")):
        engine.close()
        why = ("this llama-cpp-python build has no GPU offload (CPU build)"
               if not info.gpu_offload_supported else f"no usable GPU: {gpu.get('reason')}"
               if not gpu.get("available") else "[model] n_gpu_layers = 0")
        raise ModelLoadError(f"[model] require_gpu = true, but {why}",
                             hint="build with CMAKE_ARGS=-DGGML_CUDA=on (see README), check the driver "
                                  "with nvidia-smi, or set require_gpu = false to allow CPU inference")
    log.info("model %s: %s %s, %d bytes, sha256 %s; GPU offload %s", info.name,
             info.architecture, info.quantization, info.model_bytes, info.model_sha256,
             "ACTIVE" if info.gpu_offload_active else "not active (CPU inference)")
    if info.mmproj_path:
        log.info("mmproj %s: %d bytes, sha256 %s", info.mmproj_path, info.mmproj_bytes,
                 info.mmproj_sha256)
    audit.write("model.load", model_sha256=info.model_sha256, mmproj_sha256=info.mmproj_sha256,
                model_bytes=info.model_bytes, mmproj_bytes=info.mmproj_bytes,
                reason=f"{info.architecture} {info.quantization}; GPU offload "
                       f"{'active' if info.gpu_offload_active else 'not active'}")
    _warn_if_tiny(engine)
    return engine


def bind(host: str, port: int) -> socket.socket:
    """Take the listening socket before loading the model, so a taken port fails fast and clearly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise SetupError(f"cannot create a listening socket ({exc.strerror})",
                         hint="under systemd, start qwen-appliance.socket: the service itself has no "
                              "network access by design") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise SetupError(f"cannot listen on {host}:{port}: {exc.strerror}",
                         hint=f"is another program using the port? `ss -ltnp 'sport = :{port}'`; "
                              "or change [server] listen") from None
    sock.set_inheritable(False)
    return sock


def _warn_if_tiny(engine: Engine) -> None:
    if TINY_MODEL_MARK in engine.info.description.lower():
        banner = "!" * 78
        log.warning("%s\nSERVING THE SMOKE-TEST MODEL: random weights, answers are gibberish.\n"
                    "Point [model] path and mmproj at a real Qwen3-VL GGUF (see README).\n%s",
                    banner, banner)

