"""The chat template: renders messages with plain Jinja so user text stays apart from template text.

Pure Python (jinja2, no llama_cpp), so it is tested without a model; the loader feeds it the model's tokens.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance.engine.types import Message, RGBImage
from appliance.errors import BadRequest

log = logging.getLogger("appliance.engine.template")

# Random per process: user text never reaches the tokenizer's marker parsing (see ChatTemplate),
# and even if it did, nobody can guess this string.
MEDIA_MARKER = f"<__media_{secrets.token_hex(16)}__>"

# What Qwen-VL chat templates emit for {"type": "image"}; libmtmd adds the same begin/end tokens
# itself around the image embeddings, so the whole block becomes one media position.
QWEN_IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"


class _GenerationTag(jinja2.ext.Extension):
    """Accepts HuggingFace's `{% generation %}` tag, as transformers and llama_cpp do."""

    tags = {"generation"}  # noqa: RUF012 - jinja2 declares it an instance attribute

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _TemplateRefusal(Exception):
    """Raised by a template's raise_exception(): the conversation breaks the model's rules."""


def _raise_exception(message: str) -> None:
    raise _TemplateRefusal(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
    """transformers' tojson: keeps non-ASCII text as is."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)


SegmentKind = Literal["template", "user", "image"]


@dataclass(frozen=True)
class Segment:
    """A piece of the prompt: template text (control tokens allowed), user text, or an image."""

    kind: SegmentKind
    text: str = ""
    image: RGBImage | None = None
    shared: bool = True  # template or system text: its KV prefix may serve other clients


ImageMode = Literal["typed", "marker"]


class ChatTemplate:
    """Renders messages with placeholders so user text is tokenized apart from template text.

    Every user-supplied text part is replaced by a random placeholder before rendering; the
    rendered string therefore holds only template text, placeholders and media markers. Template
    text is tokenized with special tokens parsed, user text without, so `<|im_start|>` typed by a
    user stays plain text and no user string can become a media marker.
    """

    def __init__(self, source: str, bos_token: str, eos_token: str, add_bos: bool) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        self._template = env.from_string(source)
        self._globals = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "raise_exception": _raise_exception,
            "strftime_now": lambda fmt: datetime.now().strftime(fmt),
        }
        self.image_mode: ImageMode = "typed"
        # Prompts are tokenized without add_special, so a BOS the model wants is added here,
        # unless the template already wrote {{ bos_token }} (a doubled BOS degrades output).
        self._bos = bos_token if add_bos else ""

    def probe(self, with_images: bool) -> None:
        """Render sample conversations once at load so a broken template fails at start-up."""
        self.segments([Message("user", ("u",))])  # system roles may be refused, by design
        if not with_images:
            return
        probe = [Message("user", (RGBImage(1, 1, b"\0\0\0", 0, "PNG"), "u"))]
        for mode in ("typed", "marker"):
            self.image_mode = mode
            try:
                self.segments(probe)
                return
            except BadRequest:
                continue
        raise ValueError("it does not place an image part anywhere in the prompt")

    def segments(self, messages: Sequence[Message]) -> list[Segment]:
        """Render the conversation and split it into template text, user text and images."""
        tag = secrets.token_hex(8)
        texts: list[tuple[str, bool]] = []  # (text, from a system message)

        def holder(role: str) -> Callable[[str], str]:
            def hold(text: str) -> str:
                texts.append((text, role == "system"))
                return f"<@{tag}:{len(texts) - 1}@>"

            return hold

        rendered = self._render([self._message(m, holder(m.role)) for m in messages])
        if self._bos and not rendered.startswith(self._bos):
            rendered = self._bos + rendered
        if self.image_mode == "typed":
            rendered = rendered.replace(QWEN_IMAGE_BLOCK, MEDIA_MARKER)
        images = [img for m in messages for img in m.images]
        if rendered.count(MEDIA_MARKER) != len(images):
            raise BadRequest(
                f"the chat template kept {rendered.count(MEDIA_MARKER)} of {len(images)} images; "
                "send images in user messages"
            )
        return list(_split(rendered, tag, texts, images))

    def _message(self, message: Message, hold: Callable[[str], str]) -> dict[str, Any]:
        """OpenAI-shaped message: text-only content as one string, else a list of typed parts."""
        if not message.images:
            text = "\n".join(p for p in message.parts if isinstance(p, str))
            return {"role": message.role, "content": hold(text) if text else ""}
        parts: list[dict[str, str]] = []
        for part in message.parts:
            if isinstance(part, str):
                parts.append({"type": "text", "text": hold(part)})
            elif self.image_mode == "typed":
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": MEDIA_MARKER})
        return {"role": message.role, "content": parts}

    def _render(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self._globals)
        except _TemplateRefusal as e:
            raise BadRequest(f"the chat template refused the conversation: {e}") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:
            log.warning("chat template failed: %s", type(e).__name__)
            raise BadRequest("the chat template cannot render this conversation") from None


# Compiled once (a per-request pattern cost 0.3 ms of every request's first-token time); the tag is checked.
_PLACEHOLDER = re.compile(r"<@([0-9a-f]{16}):(\d+)@>|" + re.escape(MEDIA_MARKER))


def _split(
    rendered: str, tag: str, texts: list[tuple[str, bool]], images: list[RGBImage]
) -> Iterator[Segment]:
    """Cut the rendered prompt at placeholders and markers, substituting the real parts."""
    pos, image_iter = 0, iter(images)
    for m in _PLACEHOLDER.finditer(rendered):
        if m.group(1) is not None and m.group(1) != tag:
            continue  # not ours: template text that happens to look like a placeholder
        if m.start() > pos:
            yield Segment("template", rendered[pos : m.start()])
        if m.group(2) is not None:
            text, system = texts[int(m.group(2))]
            if text:
                yield Segment("user", text, shared=system)
        else:
            yield Segment("image", image=next(image_iter), shared=False)
        pos = m.end()
    if pos < len(rendered):
        yield Segment("template", rendered[pos:])
