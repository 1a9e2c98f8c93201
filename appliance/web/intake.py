"""Request bodies (OpenAI chat and the guide's /api/v1/chat) parsed into engine inputs with clear 4xx errors.

Every field is checked by hand so that the message names the field; nothing unchecked reaches the engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.engine.types import Message, RGBImage, Role, SamplingParams
from appliance.errors import BadRequest, NotFound
from appliance.web import images

MAX_MESSAGES = 512
MAX_STOP = 4
MAX_STOP_LEN = 64
DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class IntakeRules:
    """What parsing needs from the policy and the loaded model."""

    model_name: str
    max_tokens: int
    max_images: int
    image_limits: images.ImageLimits
    images_allowed: bool = True
    n_ctx: int = 0  # the model's context per request (0: not checked here)
    max_token_bytes: int = 0  # the vocabulary's longest token in bytes (0: not checked here)
    image_token_pixels: int = 0  # pixels of one image token, when tokens grow with area (0: not known)
    image_min_tokens: int = 0  # the fewest tokens any image becomes

    def check_text(self, texts: list[str], max_tokens: int, image_tokens: int = 0) -> int:
        """Refuse a prompt that cannot fit before anything is decoded or tokenized; returns the fewest
        tokens it can be. No token covers more than max_token_bytes bytes, so bytes / max_token_bytes
        bounds the text from below; image_tokens is the images' bound (image_tokens_at_least)."""
        n_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        at_least = (
            -(-n_bytes // self.max_token_bytes) + image_tokens if self.max_token_bytes else image_tokens
        )
        room = self.n_ctx - max_tokens
        if self.n_ctx and at_least > room:
            of_images = f"; its images alone make at least {image_tokens}" if image_tokens else ""
            raise BadRequest(
                f"prompt is at least {at_least} tokens ({n_bytes} bytes of text{of_images}); the "
                f"context holds {max(room, 0)} ({self.n_ctx} minus max_tokens {max_tokens})"
            )
        return at_least

    def image_tokens_at_least(self, image: images.Encoded) -> int:
        """The fewest tokens an image can become, from its header: its size once scaled, in whole token
        cells per side (less a pixel, for a JPEG decoded at a reduced scale), at least image_min_tokens."""
        side = math.isqrt(self.image_token_pixels)
        if side < 1:
            return max(1, self.image_min_tokens)
        width, height = image.scaled_size(self.image_limits)
        cells = max(1, (width - 1) // side) * max(1, (height - 1) // side)
        return max(cells, self.image_min_tokens)

    def image(self, read: Callable[[], images.Encoded]) -> images.Encoded:
        """Refuse images on a text-only model before spending any work on reading them."""
        if not self.images_allowed:
            raise BadRequest("this model has no vision projector (mmproj); send text only")
        return read()


@dataclass(frozen=True)
class ChatJob:
    """A validated request ready for the queue."""

    messages: tuple[Message, ...]
    params: SamplingParams
    stream: bool

    @property
    def images(self) -> tuple[RGBImage, ...]:
        return tuple(img for m in self.messages for img in m.images)


Draft = tuple[Role, tuple[str | images.Encoded, ...]]  # a message whose images are not decoded yet


@dataclass(frozen=True)
class ChatDraft:
    """A request checked up to its images' headers: what it costs at the least, before any decoding."""

    drafts: tuple[Draft, ...]
    params: SamplingParams
    stream: bool
    at_least: int  # prompt tokens it becomes at the fewest (text bytes and image sizes)
    limits: images.ImageLimits

    def decode(self) -> ChatJob:
        """Decode the images (the costly part of intake)."""
        messages = tuple(
            Message(role, tuple(p if isinstance(p, str) else p.decode(self.limits) for p in parts))
            for role, parts in self.drafts
        )
        return ChatJob(messages, self.params, self.stream)


def parse_openai_chat(body: Any, rules: IntakeRules) -> ChatJob:
    """POST /v1/chat/completions, images decoded."""
    return read_openai_chat(body, rules).decode()


def parse_api_chat(body: Any, rules: IntakeRules) -> ChatJob:
    """POST /api/v1/chat, the image decoded."""
    return read_api_chat(body, rules).decode()


def read_openai_chat(body: Any, rules: IntakeRules) -> ChatDraft:
    """POST /v1/chat/completions."""
    body = _object(body, "body")
    model = body.get("model")
    if model is not None and model != rules.model_name:
        raise NotFound(f"that model is not served here; GET /v1/models lists {rules.model_name!r}")
    if _integer(body.get("n", 1)) != 1:
        raise BadRequest("n must be 1: one completion per request")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages must be a non-empty array")
    if len(raw) > MAX_MESSAGES:
        raise BadRequest(f"messages has {len(raw)} entries; at most {MAX_MESSAGES}")
    _precount_images(raw, rules)
    legacy = body.get("max_tokens")
    if legacy is not None:
        _max_tokens(legacy, rules)  # checked even when max_completion_tokens wins: never silently ignored
    max_tokens = body.get("max_completion_tokens")
    params = _params(body, legacy if max_tokens is None else max_tokens, rules)
    texts = _raw_texts(raw)
    rules.check_text(texts, params.max_tokens)  # before any image is read
    drafts = tuple(_message(m, i, rules) for i, m in enumerate(raw))
    return _draft(drafts, params, _bool(body, "stream", False), texts, rules)


def read_api_chat(body: Any, rules: IntakeRules) -> ChatDraft:
    """POST /api/v1/chat: `{"prompt": "...", "image": "<path under data_dir or base64>"}`."""
    body = _object(body, "body")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("prompt must be a non-empty string")
    params = _params(body, body.get("max_tokens"), rules)
    rules.check_text([prompt], params.max_tokens)
    parts: list[str | images.Encoded] = []
    image = body.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise BadRequest("image must be a string: a path under the data directory or base64")
        parts.append(rules.image(lambda: images.read_api_field(image, rules.image_limits)))
    parts.append(prompt)
    return _draft((("user", tuple(parts)),), params, False, [prompt], rules)


def _draft(
    drafts: tuple[Draft, ...], params: SamplingParams, stream: bool, texts: list[str], rules: IntakeRules
) -> ChatDraft:
    """Count the images and refuse a prompt whose fewest tokens (text and image headers) cannot fit."""
    found = [p for _, parts in drafts for p in parts if isinstance(p, images.Encoded)]
    if len(found) > rules.max_images:
        raise BadRequest(f"request has {len(found)} images; at most {rules.max_images}")
    image_tokens = sum(rules.image_tokens_at_least(img) for img in found)
    at_least = rules.check_text(texts, params.max_tokens, image_tokens)
    return ChatDraft(drafts, params, stream, at_least, rules.image_limits)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def _message(raw: Any, i: int, rules: IntakeRules) -> Draft:
    msg = _object(raw, f"messages[{i}]")
    role = msg.get("role")
    if role == "developer":
        role = "system"
    if role not in ("system", "user", "assistant"):
        raise BadRequest(f"messages[{i}].role must be system, user or assistant")
    content = msg.get("content")
    if isinstance(content, str):
        return role, (content,)
    if not isinstance(content, list):
        raise BadRequest(f"messages[{i}].content must be a string or an array of parts")
    return role, tuple(_part(p, f"messages[{i}].content[{j}]", role, rules) for j, p in enumerate(content))


def _part(raw: Any, where: str, role: str, rules: IntakeRules) -> str | images.Encoded:
    part = _object(raw, where)
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise BadRequest(f"{where}.text must be a string")
        return text
    if kind == "image_url":
        if role != "user":
            raise BadRequest(f"{where}: images are accepted in user messages only")
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str):
            raise BadRequest(f"{where}.image_url.url must be a string")
        return rules.image(lambda: images.read_image_url(url, rules.image_limits))
    raise BadRequest(f'{where}.type must be "text" or "image_url"')


def _precount_images(raw: list[Any], rules: IntakeRules) -> None:
    """Refuse too many image parts before decoding any: 10,000 tiny images must not cost 10,000 decodes."""
    count = sum(
        1
        for m in raw
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") == "image_url"
    )
    if count > rules.max_images:
        raise BadRequest(f"request has {count} images; at most {rules.max_images}")


def _raw_texts(raw: list[Any]) -> list[str]:
    """Every text of the raw messages (malformed ones are refused later, when parsed)."""
    texts: list[str] = []
    for m in raw:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [
                p["text"]
                for p in content
                if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            ]
    return texts


def _params(body: dict[str, Any], max_tokens: Any, rules: IntakeRules) -> SamplingParams:
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, rules.max_tokens)
    max_tokens = _max_tokens(max_tokens, rules)
    seed = _integer(body.get("seed"))
    if (seed is None and body.get("seed") is not None) or (seed is not None and not -(2**63) <= seed < 2**64):
        raise BadRequest("seed must be an integer from -2**63 to 2**64-1")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.7, 0.0, 2.0),
        top_p=_number(body, "top_p", 0.95, 0.0, 1.0),
        seed=seed,
        stop=_stop(body.get("stop")),
    )


def _integer(value: Any) -> int | None:
    """A JSON integer: 16 and 16.0 are the same number in JSON (and in JSON Schema); true is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _max_tokens(value: Any, rules: IntakeRules) -> int:
    number = _integer(value)
    if number is None or number < 1:
        raise BadRequest("max_tokens must be a positive integer")
    if number > rules.max_tokens:
        raise BadRequest(f"max_tokens is {number}; this appliance allows at most {rules.max_tokens}")
    return number


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise BadRequest(f"{key} must be a number from {lo} to {hi}")
    return float(value)


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LEN for s in stops)
    ):
        raise BadRequest(
            f"stop must be a string or up to {MAX_STOP} strings of 1 to {MAX_STOP_LEN} characters"
        )
    return tuple(stops)
