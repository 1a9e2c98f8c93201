"""The chat handlers: OpenAI-compatible and simple chat, parse → queue → engine → JSON or Server-Sent Events.

A client that leaves cancels its job (queued: never runs; running: stops at the next step), and a stream
that cannot end well ends in the one JSON error shape, never in a half-written success.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, MutableMapping
from typing import Any, TypeVar, cast

from litestar import Request, Response, get, post
from litestar.response import Stream

from appliance.engine.job import Job, Prepared
from appliance.engine.scheduler import Scheduler
from appliance.engine.types import Completion, SamplingParams
from appliance.errors import (
    INTERNAL_ERROR,
    BadRequest,
    ClientClosedRequest,
    ClientError,
    ContextOverflow,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from appliance.security import state as request_states
from appliance.security.gate import error_body, internal_error_body
from appliance.security.state import RequestState
from appliance.web.cache import deterministic, request_key
from appliance.web.intake import ChatJob, read_api_chat, read_openai_chat
from appliance.web.intake_pool import Lease
from appliance.web.runtime import Runtime, json_response, request_state, runtime

log = logging.getLogger("appliance.web.chat")
T = TypeVar("T")


@get("/v1/models")
async def models(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The one model served here, as OpenAI's model list (scope models)."""
    m = runtime(request).model
    return json_response(
        {
            "object": "list",
            "data": [
                {
                    "id": m.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "qwen-appliance",
                    "architecture": m.architecture,
                    "quantization": m.quantization,
                    "sha256": m.model_sha256,
                    "images": m.supports_images,
                }
            ],
        }
    )


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
    """Parse and admit a chat request: answered from the response cache, or decoded, tokenized, queued.

    Reading, decoding and tokenizing hold a slot of the intake pool (bounded, shared fairly between
    clients). A request whose fewest possible tokens cannot fit, or cannot be paid, is refused before
    any image is decoded; one refused after decoding or tokenizing is charged what that work cost.
    """
    rt, state = runtime(request), request_state(request)
    if rt.draining:
        raise ServiceUnavailable("the appliance is shutting down", retry_after=5)
    rt.budgets.check(state.client)  # a spent token budget costs no parsing or tokenizing
    body = await _body(request)
    read = read_api_chat if api else read_openai_chat
    rules = rt.rules(state.policy)
    async with rt.intake.slot(state.client_name or "", state.policy.limits.max_queue) as lease:
        started = time.monotonic()
        draft = await lease.run(functools.partial(read, body, rules))
        rt.budgets.check(state.client, draft.at_least, draft.params.max_tokens)  # before decoding
        job_in = await _charged(state, rt, draft.at_least, lease.run(draft.decode))
        rt.metrics.intake.observe(time.monotonic() - started)
        rt.metrics.images.inc(len(job_in.images))
        state.audit = rt.trail.describe_input(job_in.messages, rt.model.model_sha256)
        return rt, job_in, await _answer_or_queue(state, rt, job_in, lease, draft.at_least)


async def _answer_or_queue(
    state: RequestState, rt: Runtime, job_in: ChatJob, lease: Lease, at_least: int
) -> Job:
    """The response cache's answer, if the client opted in and it holds one; else the queued job."""
    entry = _cache_entry(state, rt, job_in)
    if entry is not None:
        hit = rt.cache.get(*entry)
        rt.metrics.observe_cache(hit is not None, rt.cache.hit_ratio, len(rt.cache))
        state.audit["cache"] = "hit" if hit is not None else "miss"
        if hit is not None:
            return Job.answered(job_in.messages, job_in.params, hit, state.request_id)
    job = await _queue(state, rt, job_in, lease, at_least)
    if entry is not None:
        job.on_result(lambda c: rt.cache.put(*entry, c))
    return job


async def _charged(state: RequestState, rt: Runtime, estimate: int, work: Awaitable[T]) -> T:
    """Await intake work; a client error it ends in is charged to the client's token budget: the
    prompt's tokens when they are known (ContextOverflow), else the fewest it could have been."""
    try:
        return await work
    except ClientError as exc:
        cost = exc.tokens if isinstance(exc, ContextOverflow) else estimate
        rt.budgets.spend(state.client, cost)
        state.audit["charged_tokens"] = cost
        raise


async def _queue(state: RequestState, rt: Runtime, job_in: ChatJob, lease: Lease, at_least: int) -> Job:
    """Tokenize beside the engine thread, charge the client's token budget, then queue the job."""
    client = state.client
    prepared = await _charged(
        state, rt, at_least, _prepare(lease, rt.scheduler, job_in.messages, job_in.params)
    )
    max_tokens = job_in.params.max_tokens
    try:
        rt.budgets.charge(client, prepared.n_tokens, max_tokens)
    except BaseException:
        prepared.close()
        rt.budgets.spend(client, prepared.n_tokens)  # tokenized, then refused: the work is paid for
        state.audit["charged_tokens"] = prepared.n_tokens
        raise
    try:
        # the client's name: the prompt cache reuses a slot's full prefix only for the same client
        job = rt.scheduler.submit(
            job_in.messages,
            job_in.params,
            state.request_id,
            state.client_name or "",
            stream=job_in.stream,
            prepared=prepared,
        )
    except BaseException:
        prepared.close()
        rt.budgets.refund(client, prepared.n_tokens + max_tokens)
        raise
    n_prompt = prepared.n_tokens
    job.on_result(
        lambda c: rt.budgets.refund(
            client, (0 if job.admitted else n_prompt) + max_tokens - c.usage.completion_tokens
        )
    )
    return job


async def _prepare(
    lease: Lease, scheduler: Scheduler, messages: tuple[Any, ...], params: SamplingParams
) -> Prepared:
    """scheduler.prepare on an intake thread; a caller cancelled meanwhile still frees what it made."""
    return await lease.run(functools.partial(scheduler.prepare, messages, params), orphan=lambda p: p.close())


def _cache_entry(state: RequestState, rt: Runtime, job_in: ChatJob) -> tuple[str, str] | None:
    """(client, request key) when the client opted into the response cache and asked deterministically."""
    client = state.client
    if (
        client is None
        or not client.cache
        or not deterministic(job_in.params)
        or state.policy.limits.response_cache_entries == 0
    ):
        return None
    return client.name, request_key(client.name, rt.model.model_sha256, job_in.messages, job_in.params)


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
    state = request_state(request)
    _account(state, job, c)
    state.audit["cancelled_while"] = stage
    runtime(request).metrics.cancelled.labels(stage).inc()
    return ClientClosedRequest(f"the client closed the connection while its request was {stage}")


async def _await_watching(request: Request[Any, Any, Any], job: Job) -> Completion:
    """Wait for the completion, cancelling the generation if the client goes away meanwhile."""
    async with _watching(request, job) as gone:
        c = await job.result()
    if gone.is_set():
        raise _gone(request, job, c)
    _account(request_state(request), job, c)
    return c


def _account(state: RequestState, job: Job, c: Completion) -> None:
    """Token counts and queue time for the audit record (never the text)."""
    state.audit.update(
        prompt_tokens=c.usage.prompt_tokens,
        completion_tokens=c.usage.completion_tokens,
        queue_ms=round(job.queue_ms, 1),
        finish_reason=c.finish_reason,
    )


def _usage(c: Completion) -> dict[str, int]:
    u = c.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    """OpenAI-compatible chat; `stream: true` answers Server-Sent Events."""
    rt, job_in, job = await _intake(request, api=False)
    rid = f"chatcmpl-{request_state(request).request_id}"
    if job_in.stream:
        return await _sse(rt, job, rid, request)
    c = await _await_watching(request, job)
    return json_response(
        {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": rt.model.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                }
            ],
            "usage": _usage(c),
        }
    )


async def _sse(rt: Runtime, job: Job, rid: str, request: Request[Any, Any, Any]) -> Stream:
    """Start the stream only once the first piece (or an early error) is known, so errors stay JSON;
    a client that leaves before it (queued, or in prefill) cancels the job."""
    scope = cast("MutableMapping[str, Any]", request.scope)
    state = request_state(request)
    pieces = job.pieces()
    async with _watching(request, job) as gone:
        first = await anext(pieces, None)
    if gone.is_set():
        raise _gone(request, job, await job.result())
    if first is None:
        await job.result()  # raises the engine's refusal, if any, as a normal JSON error

    def chunk(delta: dict[str, str], finish: str | None, usage: Completion | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": rt.model.name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
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
                _account(state, job, c)
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

    return Stream(
        events(),
        media_type="text/event-stream",
        status_code=200,
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},
    )


_STREAM_AUDIT_DOWN = ServiceUnavailable(
    "the audit trail cannot be written, so this answer is incomplete and must not be used", retry_after=5
)


def _sse_error(exc: ClientError) -> bytes:
    """The stream's last event when it cannot end well: the one JSON error shape, and no [DONE]."""
    return b"data: " + error_body(exc) + b"\n\n"


async def _stream_failed(rt: Runtime, scope: MutableMapping[str, Any], exc: Exception) -> bytes:
    """Record and describe a generation that failed after the stream began (headers already sent)."""
    if isinstance(exc, ClientError):
        await rt.trail.complete(scope, reason=f"{exc.type}: {exc.message}")
        return _sse_error(exc)
    rid = request_states.of(scope).request_id
    log.error("request %s failed mid-stream: %s", rid, type(exc).__name__, exc_info=exc)
    await rt.trail.complete(scope, reason=f"{INTERNAL_ERROR}: {type(exc).__name__}")
    return b"data: " + internal_error_body(rid) + b"\n\n"


@post("/api/v1/chat", status_code=200)
async def api_chat(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The guide's simple API: one prompt, optionally one image by path under data_dir or base64."""
    rt, _, job = await _intake(request, api=True)
    c = await _await_watching(request, job)
    return json_response(
        {"response": c.text, "model": rt.model.name, "finish_reason": c.finish_reason, "usage": _usage(c)}
    )


HANDLERS = [models, chat_completions, api_chat]
