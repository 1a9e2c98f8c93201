"""The OpenAPI 3.1 description of the API, built from the live policy so its limits are the enforced ones.

Served only to the `admin` scope (`GET /openapi.json`, no docs UI): a client learns its own API from the
README, an auditor or tester with admin rights gets the machine-readable contract. tests/web/test_fuzz.py runs
schemathesis against it with every check, so the document and the daemon cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get

from appliance.config.policy import Policy
from appliance.engine.types import ModelInfo
from appliance.security.gate import SECURITY_HEADERS
from appliance.web.openapi_schemas import JSON, Obj, ref, schemas
from appliance.web.routes import ROUTES
from appliance.web.runtime import json_response, request_state, runtime

SSE = "text/event-stream"
METRICS_TYPE = "text/plain"

_WHY = {
    "400": "Bad input: malformed JSON, a field outside its bounds, a refused image URL or path, a corrupt "
    "image, more images than `[limits] max_images`, or a prompt that does not fit the context.",
    "401": "No bearer token, or an unknown, disabled or expired one.",
    "403": "Address outside `[server] allow`, revoked certificate, the client's address range or "
    "certificate binding does not match, or the token lacks the route's scope.",
    "404": "The `model` named is not the one served here.",
    "413": "Body over `[limits] max_body_bytes`, or an image over the byte or pixel limit.",
    "415": "Body not sent as application/json, or an image that is not PNG, JPEG or WebP.",
    "429": "Over the client's `rate`, `max_concurrent` or `token_budget`.",
    "503": "Queue full, shutting down, or the audit trail cannot be written (fail closed).",
}


def document(policy: Policy, model: ModelInfo) -> Obj:
    """The whole document for the policy snapshot a request was admitted under."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "qwen-appliance", "version": "1", "description": _INTRO},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": _SECURITY,
            "headers": _HEADERS,
            "responses": _responses(),
            "schemas": schemas(policy, model),
        },
    }


_INTRO = (
    "Private Qwen3-VL appliance. Every connection is mutual TLS (a client certificate from the "
    "appliance's CA, checked in the handshake); every route except /healthz and /readyz also needs "
    "a bearer token with the route's scope. Every response carries X-Request-ID and the security "
    'headers; every error is `{"error": {"type", "message"}}`.'
)

_SECURITY: Obj = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "A token from `qwen-appliance token create`; only its SHA-256 "
        "is stored. Scopes: chat, models, metrics, admin.",
    }
}


def _header(schema: Obj, description: str) -> Obj:
    return {"required": True, "schema": schema, "description": description}


_SENT = {name.decode(): value.decode() for name, value in SECURITY_HEADERS}  # the gate's values, not a copy


def _fixed(name: str, description: str) -> Obj:
    return _header({"type": "string", "const": _SENT[name.lower()]}, description)


_HEADERS: Obj = {
    "X-Request-ID": _header(
        {"type": "string", "pattern": "^[0-9a-f]{24}$"}, "Quote it to the admin: it names the audit record."
    ),
    "Strict-Transport-Security": _fixed("Strict-Transport-Security", "HSTS."),
    "X-Content-Type-Options": _fixed("X-Content-Type-Options", "No sniffing."),
    "X-Frame-Options": _fixed("X-Frame-Options", "No framing."),
    "Content-Security-Policy": _fixed("Content-Security-Policy", "No content."),
    "Retry-After": _header({"type": "string", "pattern": "^[0-9]+$"}, "Seconds to wait."),
    "WWW-Authenticate": _header({"type": "string", "pattern": "^Bearer "}, "The scheme to use."),
}
_COMMON_HEADERS = (
    "X-Request-ID",
    "Strict-Transport-Security",
    "X-Content-Type-Options",
    "X-Frame-Options",
    "Content-Security-Policy",
)


def _headers(*extra: str) -> Obj:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in (*_COMMON_HEADERS, *extra)}


def _json_response(description: str, schema: Obj, *headers: str) -> Obj:
    return {"description": description, "headers": _headers(*headers), "content": {JSON: {"schema": schema}}}


def _responses() -> Obj:
    """One reusable error response per status, each with the headers it always carries."""
    extra = {"401": ("WWW-Authenticate",), "429": ("Retry-After",), "503": ("Retry-After",)}
    return {
        f"E{code}": _json_response(why, ref("schemas", "Error"), *extra.get(code, ()))
        for code, why in _WHY.items()
    }


def _errors(*codes: str) -> Obj:
    return {code: ref("responses", f"E{code}") for code in codes}


_GATED = ("401", "403", "413", "429", "503")  # any route behind a token: the gate's refusals
_CHAT = ("400", "401", "403", "404", "413", "415", "429", "503")


def _scope(method: str, path: str) -> str | None:
    """The route table's scope of a documented operation: the document never states its own."""
    return next(r.scope for r in ROUTES if (r.method, r.path) == (method, path))


def _get(path: str, summary: str, ok: Obj, *errors: str) -> Obj:
    op: Obj = {
        "summary": summary,
        "operationId": summary.split(":")[0].replace(" ", "_"),
        "responses": {"200": ok, **_errors(*errors)},
    }
    scope = _scope("GET", path)
    if scope is None:
        op["security"] = []
    else:
        op["description"] = f"Needs a token with scope `{scope}`."
    return {"get": op}


def _paths() -> Obj:
    ready_503 = _json_response(
        _WHY["503"] + " /readyz also while not ready (reasons listed).",
        {"anyOf": [ref("schemas", "Error"), ref("schemas", "NotReady")]},
        "Retry-After",
    )
    ready = _get(
        "/readyz",
        "readyz: 200 once the model is loaded",
        _json_response("Ready.", ref("schemas", "Ready")),
        "403",
    )
    ready["get"]["responses"]["503"] = ready_503
    metrics_ok = {
        "description": "Prometheus text format.",
        "headers": _headers(),
        "content": {METRICS_TYPE: {"schema": {"type": "string"}}},
    }
    return {
        "/healthz": _get(
            "/healthz", "healthz: liveness", _json_response("Alive.", ref("schemas", "Alive")), "403", "503"
        ),
        "/readyz": ready,
        "/v1/models": _get(
            "/v1/models",
            "models: the loaded model",
            _json_response("The model.", ref("schemas", "ModelList")),
            *_GATED,
        ),
        "/metrics": _get("/metrics", "metrics: Prometheus metrics", metrics_ok, *_GATED),
        "/api/v1/health": _get(
            "/api/v1/health",
            "health: engine, queue, GPU, host, audit",
            _json_response("Health.", ref("schemas", "Health")),
            *_GATED,
        ),
        "/openapi.json": _get(
            "/openapi.json",
            "openapi: this document",
            _json_response("OpenAPI 3.1.", {"type": "object"}),
            *_GATED,
        ),
        "/v1/chat/completions": {"post": _chat_op()},
        "/api/v1/chat": {"post": _api_chat_op()},
    }


def _post(path: str, op_id: str, summary: str, request: str, ok: Obj) -> Obj:
    return {
        "operationId": op_id,
        "summary": summary,
        "description": f"Needs a token with scope `{_scope('POST', path)}`.",
        "requestBody": {"required": True, "content": {JSON: {"schema": ref("schemas", request)}}},
        "responses": {"200": ok, **_errors(*_CHAT)},
    }


def _chat_op() -> Obj:
    ok = {
        "description": "The completion; Server-Sent Events ending with `data: [DONE]` when `stream`.",
        "headers": _headers(),
        "content": {
            JSON: {"schema": ref("schemas", "ChatCompletion")},
            SSE: {"schema": ref("schemas", "ChatEvent")},
        },
    }
    return _post("/v1/chat/completions", "chat_completions", "OpenAI-compatible chat", "ChatRequest", ok)


def _api_chat_op() -> Obj:
    ok = _json_response("The answer.", ref("schemas", "ApiChatResponse"))
    return _post("/api/v1/chat", "api_chat", "One prompt, optionally one image", "ApiChatRequest", ok)


@get("/openapi.json")
async def openapi_document(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The API contract (scope admin), with the limits of the policy this request was admitted under."""
    return json_response(document(request_state(request).policy, runtime(request).model))
