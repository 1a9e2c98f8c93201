"""The HTTP API (Litestar): parse → queue → engine → response, with one JSON error shape for every failure."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.response import Stream

from appliance.audit.record import Trail
from appliance.config.policy import Client, Policy
from appliance.engine.gpu import GpuMonitor
from appliance.engine.scheduler import Job, Prepared, Scheduler
from appliance.engine.types import Completion, ModelInfo, SamplingParams
from appliance.errors import (
    BadRequest,
    ClientClosedRequest,
    ClientError,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from appliance.security.gate import ASGIApp, Gate, error_body
from appliance.security.identity import ROUTES
from appliance.security.ratelimit import TokenBudgets
from appliance.web import console as webconsole
from appliance.web import health, images, openapi
from appliance.web.cache import ResponseCache, deterministic, request_key
from appliance.web.intake import ChatJob, IntakeRules, parse_api_chat, parse_openai_chat
from appliance.web.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("appliance.web.app")


@dataclass
class Runtime:
    """Everything a request handler needs, built once at start-up."""

    policy: Policy
    model: ModelInfo
    scheduler: Scheduler
    trail: Trail
    metrics: Metrics = field(default_factory=Metrics)
    gpu: GpuMonitor | None = None
    policy_loaded_at: float = field(default_factory=time.time)
    draining: bool = False
    cache: ResponseCache = field(default_factory=lambda: ResponseCache(0, 1))
    budgets: TokenBudgets = field(default_factory=TokenBudgets)  # per client; survives reloads

    def __post_init__(self) -> None:
        self._configure_cache(self.policy)

    def _configure_cache(self, policy: Policy) -> None:
        self.cache.configure(policy.limits.response_cache_entries, policy.limits.response_cache_ttl_s,
                             [c.name for c in policy.clients if c.cache])

    def gpu_snapshot(self) -> dict[str, Any]:
        return self.gpu.snapshot() if self.gpu is not None else {"available": False,
                                                                 "reason": "GPU monitor not started"}

    def apply_policy(self, policy: Policy) -> None:
        """Swap in a reloaded policy; requests already admitted keep their snapshot."""
        self.policy = policy
        self.policy_loaded_at = time.time()
        self.scheduler.max_queue = policy.limits.max_queue
        self._configure_cache(policy)

    def rules(self, policy: Policy) -> IntakeRules:
        """Intake limits from the policy snapshot the request was admitted under."""
        lim, mdl = policy.limits, policy.model
        return IntakeRules(
            model_name=self.model.name, max_tokens=lim.max_tokens, max_images=lim.max_images,
            images_allowed=self.model.supports_images, n_ctx=self.model.n_ctx,
            max_token_bytes=self.model.max_token_bytes,
            image_limits=images.ImageLimits(lim.max_image_bytes, lim.max_image_pixels,
                                            mdl.data_dir, self.model.image_max_pixels))


def _rt(request: Request[Any, Any, Any]) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(content=json.dumps(payload).encode(), status_code=status,
                    media_type="application/json", headers=headers)


# --- health -------------------------------------------------------------------------------------


@get("/healthz")
async def healthz() -> Response[bytes]:
    """Liveness: the process answers. No identity needed, nothing revealed."""
    return _json({"status": "ok"})


@get("/readyz")
async def readyz(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Readiness: 200 only while the model is loaded and the daemon is not draining."""
    rt = _rt(request)
    if rt.draining:
        return _json({"status": "draining"}, 503, {"retry-after": "5"})
    reasons = health.not_ready_reasons(rt.policy, rt.gpu_snapshot(), rt.trail.failing)
    if reasons:
        return _json({"status": "not_ready", "reasons": reasons}, 503, {"retry-after": "5"})
    m = rt.model
    queue = {"waiting": rt.scheduler.waiting, "busy": rt.scheduler.busy,
             "max": rt.scheduler.max_queue}
    return _json({"status": "ready", "model": m.name, "images": m.supports_images, "queue": queue,
                  "gpu_offload": {"supported": m.gpu_offload_supported,
                                  "active": m.gpu_offload_active}})


@get("/api/v1/health")
async def health_report(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Everything an admin checks first (scope admin): engine, queue, GPU, host, audit, certs, policy."""
    rt = _rt(request)
    m, gpu = rt.model, rt.gpu_snapshot()
    host = await asyncio.to_thread(health.host_figures, rt.policy)
    return _json({
        "status": "draining" if rt.draining else "ok",
        "not_ready": health.not_ready_reasons(rt.policy, gpu, rt.trail.failing),
        "engine": {"model": m.name, "architecture": m.architecture, "quantization": m.quantization,
                   "model_sha256": m.model_sha256, "mmproj_sha256": m.mmproj_sha256,
                   "images": m.supports_images, "n_ctx": m.n_ctx, "threads": m.threads,
                   "gpu_offload": {"supported": m.gpu_offload_supported,
                                   "active": m.gpu_offload_active, "n_gpu_layers": m.n_gpu_layers},
                   "busy": rt.scheduler.busy},
        "queue": {"waiting": rt.scheduler.waiting, "max": rt.scheduler.max_queue},
        "gpu": gpu, "host": host,
        "audit": {"failing": rt.trail.failing, "dir": str(rt.policy.audit.dir),
                  "fsync": rt.policy.audit.fsync, "records_failed": rt.trail.audit.failures},
        "certificates": health.certificates(rt.policy),
        "policy": health.policy_facts(rt.policy, rt.policy_loaded_at)})


@get("/metrics")
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Prometheus text format (scope metrics)."""
    rt = _rt(request)

    def refresh() -> None:
        rt.metrics.queue_depth.set(rt.scheduler.waiting)
        for name, days in health.certificates(rt.policy).items():
            if days is not None:
                rt.metrics.cert_days.labels(name.removesuffix("_days_left")).set(days)
        rt.metrics.observe_gpu(rt.gpu_snapshot())

    return Response(rt.metrics.render(refresh), media_type=CONTENT_TYPE)


@get("/openapi.json")
async def openapi_document(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The API contract (scope admin), with the limits of the policy this request was admitted under."""
    rt = _rt(request)
    return _json(openapi.document(request.scope["state"]["policy"], rt.model))


@get("/v1/models")
async def models(request: Request[Any, Any, Any]) -> Response[bytes]:
    m = _rt(request).model
    return _json({"object": "list", "data": [{
        "id": m.name, "object": "model", "created": 0, "owned_by": "qwen-appliance",
        "architecture": m.architecture, "quantization": m.quantization,
        "sha256": m.model_sha256, "images": m.supports_images}]})


# --- chat ---------------------------------------------------------------------------------------


async def _body(request: Request[Any, Any, Any]) -> Any:
    """Decode a JSON body; wrong content type is 415, malformed JSON 400."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise UnsupportedMediaType("send the request body as application/json")
    raw = await request.body()
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_not_json)
        if _SURROGATE_ESCAPE.search(raw):  # "\ud800" alone decodes to a lone surrogate: no text, no UTF-8
            json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeDecodeError and UnicodeEncodeError are ValueErrors
        raise BadRequest("request body is not valid JSON (UTF-8)") from None
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _not_json(name: str) -> Any:
    """Python's json module reads NaN and Infinity; JSON (RFC 8259) has no such numbers."""
    raise ValueError(f"{name} is not a JSON number")


async def _intake(request: Request[Any, Any, Any], api: bool) -> tuple[Runtime, ChatJob, Job]:
    rt = _rt(request)
    if rt.draining:
        raise ServiceUnavailable("the appliance is shutting down", retry_after=5)
    client = _client(request)
    rt.budgets.check(client)  # a spent token budget costs no parsing or tokenizing
    body = await _body(request)
    parse = parse_api_chat if api else parse_openai_chat
    started = time.monotonic()
    job_in = await asyncio.to_thread(parse, body, rt.rules(request.scope["state"]["policy"]))
    rt.metrics.intake.observe(time.monotonic() - started)
    rt.metrics.images.inc(len(job_in.images))
    state = request.scope["state"]
    state["audit"] = rt.trail.describe_input(job_in.messages, rt.model.model_sha256)
    tag = state["request_id"]
    entry = _cache_entry(request, rt, job_in)
    if entry is not None:
        hit = rt.cache.get(*entry)
        rt.metrics.observe_cache(hit is not None, rt.cache.hit_ratio, len(rt.cache))
        state["audit"]["cache"] = "hit" if hit is not None else "miss"
        if hit is not None:
            return rt, job_in, Job.answered(job_in.messages, job_in.params, hit, tag)
    job = await _queue(request, rt, job_in, client)
    if entry is not None:
        job.on_result(lambda c: rt.cache.put(*entry, c))
    return rt, job_in, job


async def _queue(request: Request[Any, Any, Any], rt: Runtime, job_in: ChatJob, client: Client | None
                 ) -> Job:
    """Tokenize beside the engine thread, charge the client's token budget, then queue the job."""
    prepared = await _prepare(rt.scheduler, job_in.messages, job_in.params)
    max_tokens = job_in.params.max_tokens
    try:
        rt.budgets.charge(client, prepared.n_tokens, max_tokens)
    except BaseException:
        prepared.close()
        raise
    try:
        job = rt.scheduler.submit(job_in.messages, job_in.params, request.scope["state"]["request_id"],
                                  _client_name(request), stream=job_in.stream, prepared=prepared)
    except BaseException:
        prepared.close()
        rt.budgets.refund(client, prepared.n_tokens + max_tokens)
        raise
    n_prompt = prepared.n_tokens
    job.on_result(lambda c: rt.budgets.refund(
        client, (0 if job.admitted else n_prompt) + max_tokens - c.usage.completion_tokens))
    return job


async def _prepare(scheduler: Scheduler, messages: tuple[Any, ...], params: SamplingParams) -> Prepared:
    """scheduler.prepare in a worker thread; a caller cancelled meanwhile still frees what it made."""
    future = asyncio.get_running_loop().run_in_executor(None, scheduler.prepare, messages, params)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda f: f.result().close()
                                 if not f.cancelled() and f.exception() is None else None)
        raise


def _client(request: Request[Any, Any, Any]) -> Client | None:
    caller = request.scope["state"].get("caller")
    return caller.client if caller is not None else None


def _cache_entry(request: Request[Any, Any, Any], rt: Runtime, job_in: ChatJob) -> tuple[str, str] | None:
    """(client, request key) when the client opted into the response cache and asked deterministically."""
    state = request.scope["state"]
    caller = state.get("caller")
    client = caller.client if caller is not None else None
    if client is None or not client.cache or not deterministic(job_in.params) \
            or state["policy"].limits.response_cache_entries == 0:
        return None
    return client.name, request_key(client.name, rt.model.model_sha256, job_in.messages, job_in.params)


def _client_name(request: Request[Any, Any, Any]) -> str:
    """The identified client (the prompt cache reuses a slot's full prefix only for the same one)."""
    caller = request.scope["state"].get("caller")
    return caller.client.name if caller is not None and caller.client is not None else ""


@contextlib.asynccontextmanager
async def _watching(request: Request[Any, Any, Any], job: Job) -> AsyncIterator[asyncio.Event]:
    """While the block runs, a client that disconnects cancels its job: one still queued never runs,
    one in prefill stops at the next step. The event tells whether that happened."""
    gone = asyncio.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()
        job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield gone
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def _gone(request: Request[Any, Any, Any], job: Job, c: Completion) -> ClientClosedRequest:
    """Audit and count a request whose client left before its answer (status 499)."""
    stage = "running" if job.admitted else "queued"
    _account(request.scope, job, c)
    request.scope["state"]["audit"]["cancelled_while"] = stage
    _rt(request).metrics.cancelled.labels(stage).inc()
    return ClientClosedRequest(f"the client closed the connection while its request was {stage}")


async def _await_watching(request: Request[Any, Any, Any], job: Job) -> Completion:
    """Wait for the completion, cancelling the generation if the client goes away meanwhile."""
    async with _watching(request, job) as gone:
        c = await job.result()
    if gone.is_set():
        raise _gone(request, job, c)
    _account(request.scope, job, c)
    return c


def _account(scope: Any, job: Job, c: Completion) -> None:
    """Token counts and queue time for the audit record (never the text)."""
    scope["state"]["audit"].update(prompt_tokens=c.usage.prompt_tokens,
                                   completion_tokens=c.usage.completion_tokens,
                                   queue_ms=round(job.queue_ms, 1), finish_reason=c.finish_reason)


def _usage(c: Completion) -> dict[str, int]:
    u = c.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    """OpenAI-compatible chat; `stream: true` answers Server-Sent Events."""
    rt, job_in, job = await _intake(request, api=False)
    rid = f"chatcmpl-{request.scope['state']['request_id']}"
    if job_in.stream:
        return await _sse(rt, job, rid, request)
    c = await _await_watching(request, job)
    return _json({
        "id": rid, "object": "chat.completion", "created": int(time.time()),
        "model": rt.model.name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                     "finish_reason": c.finish_reason}],
        "usage": _usage(c)})


async def _sse(rt: Runtime, job: Job, rid: str, request: Request[Any, Any, Any]) -> Stream:
    """Start the stream only once the first piece (or an early error) is known, so errors stay JSON;
    a client that leaves before it (queued, or in prefill) cancels the job."""
    scope: Any = request.scope
    pieces = job.pieces()
    async with _watching(request, job) as gone:
        first = await anext(pieces, None)
    if gone.is_set():
        raise _gone(request, job, await job.result())
    if first is None:
        await job.result()  # raises the engine's refusal, if any, as a normal JSON error

    def chunk(delta: dict[str, str], finish: str | None, usage: Completion | None = None) -> bytes:
        obj: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk",
                               "created": int(time.time()), "model": rt.model.name,
                               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            obj["usage"] = _usage(usage)
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    async def events() -> AsyncIterator[bytes]:
        try:
            try:
                yield chunk({"role": "assistant", "content": ""}, None)
                if first is not None:
                    yield chunk({"content": first}, None)
                    async for piece in pieces:
                        yield chunk({"content": piece}, None)
                c = await job.result()
                _account(scope, job, c)
            except Exception as exc:  # a failure mid-stream ends in an error event, never in uvicorn
                yield await _stream_failed(rt, scope, exc)
                return
            if not await rt.trail.complete(scope):  # the record comes before the end: none, no [DONE]
                yield _sse_error(_STREAM_AUDIT_DOWN)
                return
            yield chunk({}, c.finish_reason, c)
            yield b"data: [DONE]\n\n"
        finally:
            job.cancel()  # a client that went away stops its generation

    return Stream(events(), media_type="text/event-stream", status_code=200,
                  headers={"cache-control": "no-store", "x-accel-buffering": "no"})


_STREAM_AUDIT_DOWN = ServiceUnavailable("the audit trail cannot be written, so this answer is incomplete "
                                        "and must not be used", retry_after=5)


def _sse_error(exc: ClientError) -> bytes:
    """The stream's last event when it cannot end well: the one JSON error shape, and no [DONE]."""
    return b"data: " + error_body(exc) + b"\n\n"


async def _stream_failed(rt: Runtime, scope: Any, exc: Exception) -> bytes:
    """Record and describe a generation that failed after the stream began (headers already sent)."""
    if isinstance(exc, ClientError):
        await rt.trail.complete(scope, reason=f"{exc.type}: {exc.message}")
        return _sse_error(exc)
    rid = scope["state"].get("request_id", "-")
    log.error("request %s failed mid-stream: %s", rid, type(exc).__name__, exc_info=exc)
    await rt.trail.complete(scope, reason=f"internal_error: {type(exc).__name__}")
    payload = {"error": {"type": "internal_error",
                         "message": f"internal error; quote request id {rid} to the admin"}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


@post("/api/v1/chat", status_code=200)
async def api_chat(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The guide's simple API: one prompt, optionally one image by path under data_dir or base64."""
    rt, _, job = await _intake(request, api=True)
    c = await _await_watching(request, job)
    return _json({"response": c.text, "model": rt.model.name, "finish_reason": c.finish_reason,
                  "usage": _usage(c)})


# --- errors -------------------------------------------------------------------------------------


def _client_error(request: Request[Any, Any, Any], exc: ClientError) -> Response[bytes]:
    request.scope["state"]["audit_reason"] = f"{exc.type}: {exc.message}"
    headers = {"retry-after": str(exc.retry_after)} if exc.retry_after is not None else None
    return Response(error_body(exc), status_code=exc.status, media_type="application/json",
                    headers=headers)


_HTTP_TYPES = {404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large"}


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code if 400 <= exc.status_code < 500 else 500
    message = {404: "no such route", 405: "method not allowed on this route",
               413: "request body is too large"}.get(status, "bad request")
    if status == 500:
        message = "internal error"
    payload = {"error": {"type": _HTTP_TYPES.get(status, "invalid_request_error"),
                         "message": message}}
    request.scope["state"]["audit_reason"] = f"{payload['error']['type']}: {message}"
    allow = (exc.headers or {}).get("allow") if status == 405 else None  # RFC 9110: a 405 names them
    return Response(json.dumps(payload).encode(), status_code=status,
                    media_type="application/json", headers={"allow": allow} if allow else None)


def _crash(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Log the failure server-side; the client learns only the request id."""
    rid = request.scope.get("state", {}).get("request_id", "-")
    log.error("request %s failed: %s", rid, type(exc).__name__, exc_info=exc)
    request.scope["state"]["audit_reason"] = f"internal_error: {type(exc).__name__}"
    payload = {"error": {"type": "internal_error",
                         "message": f"internal error; quote request id {rid} to the admin"}}
    return Response(json.dumps(payload).encode(), status_code=500, media_type="application/json")


ROUTE_HANDLERS = [healthz, readyz, health_report, metrics, models, chat_completions, api_chat,
                  openapi_document, *webconsole.ROUTES]


def registered_routes(app: Litestar) -> set[tuple[str, str]]:
    """(method, path) of every handler Litestar can dispatch, less the OPTIONS it adds by itself."""
    return {(method, route.path_format) for route in app.routes
            for method in getattr(route, "methods", {"ANY"}) if method != "OPTIONS"}


def _check_routes(app: Litestar) -> None:
    """The gate authorises rows of identity.ROUTES only: a handler outside the table must not start."""
    table = {(r.method, r.path) for r in ROUTES}
    if registered_routes(app) != table:
        raise RuntimeError(f"HTTP routes {sorted(registered_routes(app) ^ table)} are not exactly "
                           "identity.ROUTES; declare each route there with its scope")


def build_app(runtime: Runtime) -> Gate:
    """The Litestar app wrapped in the gate; nothing is reachable around it."""
    app = Litestar(
        route_handlers=ROUTE_HANDLERS,
        exception_handlers={ClientError: _client_error, HTTPException: _http_error,
                            Exception: _crash},
        request_max_body_size=runtime.policy.limits.max_body_bytes,
        openapi_config=None,
        debug=False,
        logging_config=None,
    )
    _check_routes(app)
    app.state.runtime = runtime
    return Gate(cast(ASGIApp, app), lambda: runtime.policy, runtime.trail)
