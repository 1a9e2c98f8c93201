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
from appliance.errors import client_error_types
from appliance.security.gate import SECURITY_HEADERS
from appliance.web.images import BASE64_PATTERN, DATA_URI_PATTERN
from appliance.web.intake import MAX_MESSAGES, MAX_STOP, MAX_STOP_LEN
from appliance.web.routes import ROUTES
from appliance.web.runtime import json_response, request_state, runtime

JSON = "application/json"
SSE = "text/event-stream"
METRICS_TYPE = "text/plain"
Obj = dict[str, Any]

_ERROR_TYPES = client_error_types()  # declared once, with the error classes
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
        "components": {"securitySchemes": _SECURITY, "headers": _HEADERS,
                       "responses": _responses(), "schemas": _schemas(policy, model)},
    }


_INTRO = ("Private Qwen3-VL appliance. Every connection is mutual TLS (a client certificate from the "
          "appliance's CA, checked in the handshake); every route except /healthz and /readyz also needs "
          "a bearer token with the route's scope. Every response carries X-Request-ID and the security "
          "headers; every error is `{\"error\": {\"type\", \"message\"}}`.")

_SECURITY: Obj = {"bearer": {"type": "http", "scheme": "bearer",
                             "description": "A token from `qwen-appliance token create`; only its SHA-256 "
                                            "is stored. Scopes: chat, models, metrics, admin."}}


def _header(schema: Obj, description: str) -> Obj:
    return {"required": True, "schema": schema, "description": description}


_SENT = {name.decode(): value.decode() for name, value in SECURITY_HEADERS}  # the gate's values, not a copy


def _fixed(name: str, description: str) -> Obj:
    return _header({"type": "string", "const": _SENT[name.lower()]}, description)


_HEADERS: Obj = {
    "X-Request-ID": _header({"type": "string", "pattern": "^[0-9a-f]{24}$"},
                            "Quote it to the admin: it names the audit record."),
    "Strict-Transport-Security": _fixed("Strict-Transport-Security", "HSTS."),
    "X-Content-Type-Options": _fixed("X-Content-Type-Options", "No sniffing."),
    "X-Frame-Options": _fixed("X-Frame-Options", "No framing."),
    "Content-Security-Policy": _fixed("Content-Security-Policy", "No content."),
    "Retry-After": _header({"type": "string", "pattern": "^[0-9]+$"}, "Seconds to wait."),
    "WWW-Authenticate": _header({"type": "string", "pattern": "^Bearer "}, "The scheme to use."),
}
_COMMON_HEADERS = ("X-Request-ID", "Strict-Transport-Security", "X-Content-Type-Options",
                   "X-Frame-Options", "Content-Security-Policy")


def _headers(*extra: str) -> Obj:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in (*_COMMON_HEADERS, *extra)}


def _ref(kind: str, name: str) -> Obj:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json_response(description: str, schema: Obj, *headers: str) -> Obj:
    return {"description": description, "headers": _headers(*headers),
            "content": {JSON: {"schema": schema}}}


def _responses() -> Obj:
    """One reusable error response per status, each with the headers it always carries."""
    extra = {"401": ("WWW-Authenticate",), "429": ("Retry-After",), "503": ("Retry-After",)}
    return {f"E{code}": _json_response(why, _ref("schemas", "Error"), *extra.get(code, ()))
            for code, why in _WHY.items()}


def _errors(*codes: str) -> Obj:
    return {code: _ref("responses", f"E{code}") for code in codes}


_GATED = ("401", "403", "413", "429", "503")  # any route behind a token: the gate's refusals
_CHAT = ("400", "401", "403", "404", "413", "415", "429", "503")


def _scope(method: str, path: str) -> str | None:
    """The route table's scope of a documented operation: the document never states its own."""
    return next(r.scope for r in ROUTES if (r.method, r.path) == (method, path))


def _get(path: str, summary: str, ok: Obj, *errors: str) -> Obj:
    op: Obj = {"summary": summary, "operationId": summary.split(":")[0].replace(" ", "_"),
               "responses": {"200": ok, **_errors(*errors)}}
    scope = _scope("GET", path)
    if scope is None:
        op["security"] = []
    else:
        op["description"] = f"Needs a token with scope `{scope}`."
    return {"get": op}


def _paths() -> Obj:
    ready_503 = _json_response(_WHY["503"] + " /readyz also while not ready (reasons listed).",
                               {"anyOf": [_ref("schemas", "Error"), _ref("schemas", "NotReady")]},
                               "Retry-After")
    ready = _get("/readyz", "readyz: 200 once the model is loaded",
                 _json_response("Ready.", _ref("schemas", "Ready")), "403")
    ready["get"]["responses"]["503"] = ready_503
    metrics_ok = {"description": "Prometheus text format.", "headers": _headers(),
                  "content": {METRICS_TYPE: {"schema": {"type": "string"}}}}
    return {
        "/healthz": _get("/healthz", "healthz: liveness",
                         _json_response("Alive.", _ref("schemas", "Alive")), "403", "503"),
        "/readyz": ready,
        "/v1/models": _get("/v1/models", "models: the loaded model",
                           _json_response("The model.", _ref("schemas", "ModelList")), *_GATED),
        "/metrics": _get("/metrics", "metrics: Prometheus metrics", metrics_ok, *_GATED),
        "/api/v1/health": _get("/api/v1/health", "health: engine, queue, GPU, host, audit",
                               _json_response("Health.", _ref("schemas", "Health")), *_GATED),
        "/openapi.json": _get("/openapi.json", "openapi: this document",
                              _json_response("OpenAPI 3.1.", {"type": "object"}), *_GATED),
        "/v1/chat/completions": {"post": _chat_op()},
        "/api/v1/chat": {"post": _api_chat_op()},
    }


def _post(path: str, op_id: str, summary: str, request: str, ok: Obj) -> Obj:
    return {"operationId": op_id, "summary": summary,
            "description": f"Needs a token with scope `{_scope('POST', path)}`.",
            "requestBody": {"required": True,
                            "content": {JSON: {"schema": _ref("schemas", request)}}},
            "responses": {"200": ok, **_errors(*_CHAT)}}


def _chat_op() -> Obj:
    ok = {"description": "The completion; Server-Sent Events ending with `data: [DONE]` when `stream`.",
          "headers": _headers(),
          "content": {JSON: {"schema": _ref("schemas", "ChatCompletion")},
                      SSE: {"schema": _ref("schemas", "ChatEvent")}}}
    return _post("/v1/chat/completions", "chat_completions", "OpenAI-compatible chat", "ChatRequest", ok)


def _api_chat_op() -> Obj:
    ok = _json_response("The answer.", _ref("schemas", "ApiChatResponse"))
    return _post("/api/v1/chat", "api_chat", "One prompt, optionally one image", "ApiChatRequest", ok)


# --- schemas ------------------------------------------------------------------------------------


def _nullable(schema: Obj) -> Obj:
    return {"anyOf": [schema, {"type": "null"}]}


def _schemas(policy: Policy, model: ModelInfo) -> Obj:
    lim = policy.limits
    return {
        "Error": _error_schema(),
        "Alive": _object({"status": {"const": "ok"}}),
        "Ready": _ready_schema(),
        "NotReady": _object({"status": {"enum": ["draining", "not_ready"]},
                             "reasons": {"type": "array", "items": {"type": "string"}}},
                            required=("status",)),
        "ModelList": _model_list_schema(),
        "Health": _health_schema(),
        "Usage": _object({k: {"type": "integer", "minimum": 0}
                          for k in ("prompt_tokens", "completion_tokens", "total_tokens")}),
        "TextPart": _object({"type": {"const": "text"}, "text": {"type": "string"}}, closed=False),
        "ImageURL": _image_url_schema(),
        "ImagePart": _object({"type": {"const": "image_url"}, "image_url": _ref("schemas", "ImageURL")},
                             closed=False),
        "UserMessage": _message_schema(["user"], ["TextPart", "ImagePart"]),
        "OtherMessage": _message_schema(["system", "developer", "assistant"], ["TextPart"]),
        "ChatRequest": _chat_request_schema(lim.max_tokens, lim.max_images, model.name),
        "ChatCompletion": _completion_schema(),
        "ChatChunk": _chunk_schema(),
        "ChatEvent": _event_schema(),
        "ApiChatRequest": _api_request_schema(lim.max_tokens, policy.model.data_dir is not None),
        "ApiChatResponse": _object({"response": {"type": "string"}, "model": {"type": "string"},
                                    "finish_reason": _FINISH, "usage": _ref("schemas", "Usage")}),
    }


_FINISH: Obj = {"enum": ["stop", "length", "cancelled"]}


def _object(props: Obj, required: tuple[str, ...] | None = None, closed: bool = True) -> Obj:
    """An object with these properties, all required unless named; responses are closed."""
    out: Obj = {"type": "object", "properties": props,
                "required": list(props if required is None else required)}
    if closed:
        out["additionalProperties"] = False
    return out


def _error_schema() -> Obj:
    inner = _object({"type": {"enum": _ERROR_TYPES}, "message": {"type": "string", "minLength": 1}})
    return _object({"error": inner})


def _ready_schema() -> Obj:
    queue = _object({k: {"type": "integer", "minimum": 0} for k in ("waiting", "max")}
                    | {"busy": {"type": "boolean"}})
    offload = _object({"supported": {"type": "boolean"}, "active": {"type": "boolean"}})
    return _object({"status": {"const": "ready"}, "model": {"type": "string"},
                    "images": {"type": "boolean"}, "queue": queue, "gpu_offload": offload})


def _model_list_schema() -> Obj:
    entry = _object({"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                     "owned_by": {"type": "string"}, "architecture": {"type": "string"},
                     "quantization": {"type": "string"},
                     "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                     "images": {"type": "boolean"}})
    return _object({"object": {"const": "list"},
                    "data": {"type": "array", "items": entry, "minItems": 1, "maxItems": 1}})


def _health_schema() -> Obj:
    parts = ("engine", "queue", "gpu", "host", "audit", "certificates", "policy")
    props: Obj = {"status": {"enum": ["ok", "draining"]},
                  "not_ready": {"type": "array", "items": {"type": "string"}}}
    props |= {p: {"type": "object"} for p in parts}
    return _object(props)


def _image_url_schema() -> Obj:
    """What the API really accepts: a data URI of PNG, JPEG or WebP in standard, unbroken base64."""
    uri = {"type": "string", "format": "image-data-uri", "pattern": DATA_URI_PATTERN + BASE64_PATTERN,
           "description": "data:image/png|jpeg|webp;base64,<standard base64, padded, no whitespace> of a "
                          "decodable image within the byte and pixel limits. Nothing is ever fetched: "
                          "http(s), file, ftp and every other scheme get 400."}
    return {"anyOf": [uri, {"type": "object", "properties": {"url": uri, "detail": {}},
                            "required": ["url"]}]}


def _message_schema(roles: list[str], parts: list[str]) -> Obj:
    items = {"anyOf": [_ref("schemas", p) for p in parts]}
    content = {"anyOf": [{"type": "string"}, {"type": "array", "items": items}]}
    return _object({"role": {"enum": roles}, "content": content}, closed=False)


def _max_tokens(limit: int) -> Obj:
    return _nullable({"type": "integer", "minimum": 1, "maximum": limit})


def _sampling(max_tokens: int) -> Obj:
    stop = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LEN}
    return {
        "max_tokens": _max_tokens(max_tokens),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "seed": _nullable({"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1}),
        "stop": _nullable({"anyOf": [stop, {"type": "array", "items": stop, "maxItems": MAX_STOP}]}),
    }


def _chat_request_schema(max_tokens: int, max_images: int, model_name: str) -> Obj:
    messages = {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES,
                "items": {"anyOf": [_ref("schemas", "UserMessage"), _ref("schemas", "OtherMessage")]},
                "description": f"At most {max_images} images in the whole request; prompt plus max_tokens "
                               "must fit the model's context."}
    props: Obj = {"model": _nullable({"type": "string", "enum": [model_name]}), "messages": messages,
                  "max_completion_tokens": _max_tokens(max_tokens), **_sampling(max_tokens),
                  "stream": _nullable({"type": "boolean"}), "n": {"type": "integer", "const": 1}}
    return _object(props, required=("messages",), closed=False)


def _api_request_schema(max_tokens: int, paths: bool) -> Obj:
    where = "a file name under `[model] data_dir`, " if paths else ""
    image = {"type": "string", "minLength": 1, "format": "image-ref",
             "description": f"The image: {where}a data URI, or bare base64 of a PNG, JPEG or WebP file."}
    props: Obj = {"prompt": {"type": "string", "pattern": "\\S", "description": "Not only whitespace."},
                  "image": _nullable(image), **_sampling(max_tokens)}
    return _object(props, required=("prompt",), closed=False)


def _chunk_schema() -> Obj:
    delta = _object({"role": {"const": "assistant"}, "content": {"type": "string"}}, required=())
    choice = _object({"index": {"const": 0}, "delta": delta,
                      "finish_reason": {"anyOf": [_FINISH, {"type": "null"}]}})
    return _object({"id": {"type": "string", "pattern": "^chatcmpl-[0-9a-f]{24}$"},
                    "object": {"const": "chat.completion.chunk"}, "created": {"type": "integer"},
                    "model": {"type": "string"},
                    "choices": {"type": "array", "items": choice, "minItems": 1, "maxItems": 1},
                    "usage": _ref("schemas", "Usage")},
                   required=("id", "object", "created", "model", "choices"))


def _event_schema() -> Obj:
    """One Server-Sent Event: a JSON chunk, the last one with usage, then `[DONE]`."""
    chunk = {"type": "string", "contentMediaType": JSON, "contentSchema": _ref("schemas", "ChatChunk")}
    return {"type": "object", "properties": {"data": {"anyOf": [{"const": "[DONE]"}, chunk]}},
            "required": ["data"]}


def _completion_schema() -> Obj:
    message = _object({"role": {"const": "assistant"}, "content": {"type": "string"}})
    choice = _object({"index": {"const": 0}, "message": message, "finish_reason": _FINISH})
    return _object({"id": {"type": "string", "pattern": "^chatcmpl-[0-9a-f]{24}$"},
                    "object": {"const": "chat.completion"}, "created": {"type": "integer"},
                    "model": {"type": "string"},
                    "choices": {"type": "array", "items": choice, "minItems": 1, "maxItems": 1},
                    "usage": _ref("schemas", "Usage")})


@get("/openapi.json")
async def openapi_document(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The API contract (scope admin), with the limits of the policy this request was admitted under."""
    return json_response(document(request_state(request).policy, runtime(request).model))
