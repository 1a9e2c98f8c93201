"""The request and response schemas of the OpenAPI document (components.schemas), apart from the paths
and the handler in openapi.py: the bounds in them are read from the policy and from intake's limits."""

from __future__ import annotations

from typing import Any

from appliance.config.policy import Policy
from appliance.engine.types import ModelInfo
from appliance.errors import client_error_types
from appliance.web.images import BASE64_PATTERN, DATA_URI_PATTERN
from appliance.web.intake import MAX_MESSAGES, MAX_STOP, MAX_STOP_LEN

JSON = "application/json"
Obj = dict[str, Any]

_ERROR_TYPES = client_error_types()  # declared once, with the error classes


def ref(kind: str, name: str) -> Obj:
    """A reference to a component of the document: `ref("schemas", "Error")`."""
    return {"$ref": f"#/components/{kind}/{name}"}


def _nullable(schema: Obj) -> Obj:
    return {"anyOf": [schema, {"type": "null"}]}


def schemas(policy: Policy, model: ModelInfo) -> Obj:
    lim = policy.limits
    return {
        "Error": _error_schema(),
        "Alive": _object({"status": {"const": "ok"}}),
        "Ready": _ready_schema(),
        "NotReady": _object(
            {
                "status": {"enum": ["draining", "not_ready"]},
                "reasons": {"type": "array", "items": {"type": "string"}},
            },
            required=("status",),
        ),
        "ModelList": _model_list_schema(),
        "Health": _health_schema(),
        "Usage": _object(
            {
                k: {"type": "integer", "minimum": 0}
                for k in ("prompt_tokens", "completion_tokens", "total_tokens")
            }
        ),
        "TextPart": _object({"type": {"const": "text"}, "text": {"type": "string"}}, closed=False),
        "ImageURL": _image_url_schema(),
        "ImagePart": _object(
            {"type": {"const": "image_url"}, "image_url": ref("schemas", "ImageURL")}, closed=False
        ),
        "UserMessage": _message_schema(["user"], ["TextPart", "ImagePart"]),
        "OtherMessage": _message_schema(["system", "developer", "assistant"], ["TextPart"]),
        "ChatRequest": _chat_request_schema(lim.max_tokens, lim.max_images, model.name),
        "ChatCompletion": _completion_schema(),
        "ChatChunk": _chunk_schema(),
        "ChatEvent": _event_schema(),
        "ApiChatRequest": _api_request_schema(lim.max_tokens, policy.model.data_dir is not None),
        "ApiChatResponse": _object(
            {
                "response": {"type": "string"},
                "model": {"type": "string"},
                "finish_reason": _FINISH,
                "usage": ref("schemas", "Usage"),
            }
        ),
    }


_FINISH: Obj = {"enum": ["stop", "length", "cancelled"]}


def _object(props: Obj, required: tuple[str, ...] | None = None, closed: bool = True) -> Obj:
    """An object with these properties, all required unless named; responses are closed."""
    out: Obj = {
        "type": "object",
        "properties": props,
        "required": list(props if required is None else required),
    }
    if closed:
        out["additionalProperties"] = False
    return out


def _error_schema() -> Obj:
    inner = _object({"type": {"enum": _ERROR_TYPES}, "message": {"type": "string", "minLength": 1}})
    return _object({"error": inner})


def _ready_schema() -> Obj:
    queue = _object(
        {k: {"type": "integer", "minimum": 0} for k in ("waiting", "max")} | {"busy": {"type": "boolean"}}
    )
    offload = _object({"supported": {"type": "boolean"}, "active": {"type": "boolean"}})
    return _object(
        {
            "status": {"const": "ready"},
            "model": {"type": "string"},
            "images": {"type": "boolean"},
            "queue": queue,
            "gpu_offload": offload,
        }
    )


def _model_list_schema() -> Obj:
    entry = _object(
        {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "architecture": {"type": "string"},
            "quantization": {"type": "string"},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "images": {"type": "boolean"},
        }
    )
    return _object(
        {"object": {"const": "list"}, "data": {"type": "array", "items": entry, "minItems": 1, "maxItems": 1}}
    )


def _health_schema() -> Obj:
    parts = ("engine", "queue", "gpu", "host", "audit", "certificates", "policy")
    props: Obj = {
        "status": {"enum": ["ok", "draining"]},
        "not_ready": {"type": "array", "items": {"type": "string"}},
    }
    props |= {p: {"type": "object"} for p in parts}
    return _object(props)


def _image_url_schema() -> Obj:
    """What the API really accepts: a data URI of PNG, JPEG or WebP in standard, unbroken base64."""
    uri = {
        "type": "string",
        "format": "image-data-uri",
        "pattern": DATA_URI_PATTERN + BASE64_PATTERN,
        "description": "data:image/png|jpeg|webp;base64,<standard base64, padded, no whitespace> of a "
        "decodable image within the byte and pixel limits. Nothing is ever fetched: "
        "http(s), file, ftp and every other scheme get 400.",
    }
    return {"anyOf": [uri, {"type": "object", "properties": {"url": uri, "detail": {}}, "required": ["url"]}]}


def _message_schema(roles: list[str], parts: list[str]) -> Obj:
    items = {"anyOf": [ref("schemas", p) for p in parts]}
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
    messages = {
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_MESSAGES,
        "items": {"anyOf": [ref("schemas", "UserMessage"), ref("schemas", "OtherMessage")]},
        "description": f"At most {max_images} images in the whole request; prompt plus max_tokens "
        "must fit the model's context.",
    }
    props: Obj = {
        "model": _nullable({"type": "string", "enum": [model_name]}),
        "messages": messages,
        "max_completion_tokens": _max_tokens(max_tokens),
        **_sampling(max_tokens),
        "stream": _nullable({"type": "boolean"}),
        "n": {"type": "integer", "const": 1},
    }
    return _object(props, required=("messages",), closed=False)


def _api_request_schema(max_tokens: int, paths: bool) -> Obj:
    where = "a file name under `[model] data_dir`, " if paths else ""
    image = {
        "type": "string",
        "minLength": 1,
        "format": "image-ref",
        "description": f"The image: {where}a data URI, or bare base64 of a PNG, JPEG or WebP file.",
    }
    props: Obj = {
        "prompt": {"type": "string", "pattern": "\\S", "description": "Not only whitespace."},
        "image": _nullable(image),
        **_sampling(max_tokens),
    }
    return _object(props, required=("prompt",), closed=False)


def _chunk_schema() -> Obj:
    delta = _object({"role": {"const": "assistant"}, "content": {"type": "string"}}, required=())
    choice = _object(
        {"index": {"const": 0}, "delta": delta, "finish_reason": {"anyOf": [_FINISH, {"type": "null"}]}}
    )
    return _object(
        {
            "id": {"type": "string", "pattern": "^chatcmpl-[0-9a-f]{24}$"},
            "object": {"const": "chat.completion.chunk"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice, "minItems": 1, "maxItems": 1},
            "usage": ref("schemas", "Usage"),
        },
        required=("id", "object", "created", "model", "choices"),
    )


def _event_schema() -> Obj:
    """One Server-Sent Event: a JSON chunk, the last one with usage, then `[DONE]`."""
    chunk = {"type": "string", "contentMediaType": JSON, "contentSchema": ref("schemas", "ChatChunk")}
    return {
        "type": "object",
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, chunk]}},
        "required": ["data"],
    }


def _completion_schema() -> Obj:
    message = _object({"role": {"const": "assistant"}, "content": {"type": "string"}})
    choice = _object({"index": {"const": 0}, "message": message, "finish_reason": _FINISH})
    return _object(
        {
            "id": {"type": "string", "pattern": "^chatcmpl-[0-9a-f]{24}$"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice, "minItems": 1, "maxItems": 1},
            "usage": ref("schemas", "Usage"),
        }
    )
