"""The llama.cpp engine: loads a GGUF model (and optional vision projector) and generates.

This is the only module that imports llama_cpp. It talks to llama.cpp and libmtmd directly instead
of through `Llama.create_chat_completion` / `MTMDChatHandler`, because those fetch image URLs, let
user text become control tokens, and log prompts to stderr.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import jinja2
import jinja2.ext
import llama_cpp
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp import mtmd_cpp

from appliance.engine.types import (
    FTYPE_NAMES,
    Completion,
    EngineConfig,
    FinishReason,
    Message,
    ModelInfo,
    RGBImage,
    SamplingParams,
    Usage,
)
from appliance.errors import BadRequest, ModelLoadError

log = logging.getLogger("appliance.engine.batch")
native_log = logging.getLogger("appliance.llama")

# Random per process: user text never reaches the tokenizer's marker parsing (see _ChatTemplate),
# and even if it did, nobody can guess this string.
MEDIA_MARKER = f"<__media_{secrets.token_hex(16)}__>"
_MEDIA_MARKER_C = MEDIA_MARKER.encode()  # mtmd keeps the pointer; keep the bytes alive

# What Qwen-VL chat templates emit for {"type": "image"}; libmtmd adds the same begin/end tokens
# itself around the image embeddings, so the whole block becomes one media position.
QWEN_IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"

TOP_K = 40  # llama-server's default; bounds sampling cost on 150k-token vocabularies
MAX_AUTO_THREADS = 4  # more threads rarely help decode speed, and they starve the HTTP side

_FTYPE_GUESSED = 1024


# --- native logging ---------------------------------------------------------------------------

_GGML_WARN, _GGML_ERROR, _GGML_CONT = 3, 4, 5
_MAX_LOG_CHARS = 500


class _NativeLogFilter:
    """Forwards only WARN/ERROR lines of one native library to logging; prompts never pass.

    libmtmd logs every text chunk at DEBUG (`add_text: <prompt>`); anything below WARN is dropped,
    and lines mentioning add_text are dropped at any level, continuation lines included.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.capture: list[str] | None = None  # set while loading, to explain failures
        self._forwarding = False
        self._level = logging.WARNING
        self.callback = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes | None, _user_data: object) -> None:
        with suppress(Exception):  # an exception must never unwind into C
            self._handle(level, (text or b"").decode("utf-8", "replace"))

    def _handle(self, level: int, line: str) -> None:
        if level != _GGML_CONT:
            self._forwarding = level in (_GGML_WARN, _GGML_ERROR)
            self._level = logging.ERROR if level == _GGML_ERROR else logging.WARNING
        if "add_text" in line:
            self._forwarding = False
        line = line.strip()
        if not self._forwarding or not line:
            return
        line = line[:_MAX_LOG_CHARS]
        if self.capture is not None and self._level == logging.ERROR:
            self.capture.append(line)
        native_log.log(self._level, "%s: %s", self.source, line)


# Module-level: ctypes callbacks must outlive every native call that may log.
_LLAMA_LOG = _NativeLogFilter("llama.cpp")
_MTMD_LOG = _NativeLogFilter("mtmd")


def _install_native_logging() -> None:
    """Route llama.cpp, ggml and libmtmd logging through the filters (idempotent)."""
    llama_cpp.llama_log_set(_LLAMA_LOG.callback, ctypes.c_void_p(0))
    if hasattr(mtmd_cpp, "mtmd_helper_log_set"):  # also sets mtmd_log_set (clip)
        mtmd_cpp.mtmd_helper_log_set(_MTMD_LOG.callback, ctypes.c_void_p(0))
    else:
        mtmd_cpp.mtmd_log_set(_MTMD_LOG.callback, ctypes.c_void_p(0))


_install_native_logging()  # before anything can load a model and log a prompt


@contextmanager
def _capture_native_errors() -> Iterator[list[str]]:
    """Collect native ERROR lines meanwhile, to put llama.cpp's reason into a ModelLoadError."""
    lines: list[str] = []
    _LLAMA_LOG.capture = _MTMD_LOG.capture = lines
    try:
        yield lines
    finally:
        _LLAMA_LOG.capture = _MTMD_LOG.capture = None


# --- files and build ----------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks so multi-GB models do not need the memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_gguf(path: Path, what: str) -> tuple[int, str]:
    """Size and SHA-256 of a readable GGUF file, or a ModelLoadError naming the path."""
    hint = f"set the {what} path in [model] to an existing .gguf file"
    if not path.exists():
        raise ModelLoadError(f"{what} file not found: {path}", hint=hint)
    if not path.is_file():
        raise ModelLoadError(f"{what} path is not a regular file: {path}", hint=hint)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        digest = sha256_file(path)
        size = path.stat().st_size
    except OSError as e:
        raise ModelLoadError(
            f"cannot read {what} file {path}: {e.strerror}",
            hint="the service user needs read permission on the file and its directories",
        ) from e
    if magic != b"GGUF":
        raise ModelLoadError(
            f"{what} file is not a GGUF file: {path}",
            hint="download the .gguf file again; other formats must be converted first",
        )
    return size, digest


def _check_pin(path: Path, actual: str, expected: str | None, key: str) -> None:
    """Refuse a file whose digest differs from the one pinned in the policy, before llama.cpp parses it."""
    if expected is not None and actual != expected.lower():
        raise ModelLoadError(
            f"{path}: SHA-256 is {actual}, but [model] {key} pins {expected.lower()}",
            hint="copy the exact file the policy was written for, or update the pin")


def describe_build() -> dict[str, object]:
    """What this llama.cpp build can do, without loading a model (for doctor and /readyz)."""
    return {
        "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
        "system_info": _system_info(),
        "llama_cpp_python": llama_cpp.__version__,
    }


def _system_info() -> str:
    """llama.cpp's one-line summary of the CPU features and backends compiled in."""
    raw: bytes = llama_cpp.llama_print_system_info()
    return raw.decode("utf-8", "replace").strip()


def _physical_cores() -> int | None:
    """Distinct (package, core) pairs from /proc/cpuinfo; None where that is not available."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores = set(re.findall(r"physical id\s*:\s*(\d+).*?core id\s*:\s*(\d+)", text, re.S))
    return len(cores) or None


def choose_threads(requested: int) -> int:
    """Threads for llama.cpp: as configured, else one per usable physical core, at most 4."""
    if requested > 0:
        return requested
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    usable = usable or 1
    return max(1, min(usable, _physical_cores() or usable, MAX_AUTO_THREADS))


def _quantization(raw: str | None, model: llama_cpp.llama_model_p) -> str:
    """Quantization name from general.file_type, else from llama.cpp's own guess."""
    ftype = int(raw) if raw is not None and raw.isdigit() else llama_cpp.llama_model_ftype(model)
    return FTYPE_NAMES.get(ftype & ~_FTYPE_GUESSED, f"ftype {ftype}")


# --- chat template ------------------------------------------------------------------------------


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
class _Segment:
    """A piece of the prompt: template text (control tokens allowed), user text, or an image."""

    kind: SegmentKind
    text: str = ""
    image: RGBImage | None = None
    shared: bool = True  # template or system text: its KV prefix may serve other clients


ImageMode = Literal["typed", "marker"]


class _ChatTemplate:
    """Renders messages with placeholders so user text is tokenized apart from template text.

    Every user-supplied text part is replaced by a random placeholder before rendering; the
    rendered string therefore holds only template text, placeholders and media markers. Template
    text is tokenized with special tokens parsed, user text without, so `<|im_start|>` typed by a
    user stays plain text and no user string can become a media marker.
    """

    def __init__(self, source: str, bos_token: str, eos_token: str, add_bos: bool) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationTag, jinja2.ext.loopcontrols],
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

    def segments(self, messages: Sequence[Message]) -> list[_Segment]:
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
            return self._template.render(
                messages=messages, add_generation_prompt=True, **self._globals
            )
        except _TemplateRefusal as e:
            raise BadRequest(f"the chat template refused the conversation: {e}") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:
            log.warning("chat template failed: %s", type(e).__name__)
            raise BadRequest("the chat template cannot render this conversation") from None


# Compiled once (a per-request pattern cost 0.3 ms of every request's first-token time); the tag is checked.
_PLACEHOLDER = re.compile(r"<@([0-9a-f]{16}):(\d+)@>|" + re.escape(MEDIA_MARKER))


def _split(
    rendered: str, tag: str, texts: list[tuple[str, bool]], images: list[RGBImage]
) -> Iterator[_Segment]:
    """Cut the rendered prompt at placeholders and markers, substituting the real parts."""
    pos, image_iter = 0, iter(images)
    for m in _PLACEHOLDER.finditer(rendered):
        if m.group(1) is not None and m.group(1) != tag:
            continue  # not ours: template text that happens to look like a placeholder
        if m.start() > pos:
            yield _Segment("template", rendered[pos : m.start()])
        if m.group(2) is not None:
            text, system = texts[int(m.group(2))]
            if text:
                yield _Segment("user", text, shared=system)
        else:
            yield _Segment("image", image=next(image_iter), shared=False)
        pos = m.end()
    if pos < len(rendered):
        yield _Segment("template", rendered[pos:])


# --- tokenized prompts --------------------------------------------------------------------------


@dataclass(frozen=True)
class _ImageItem:
    """One image chunk of a prompt: libmtmd evaluates it on its own, then it is KV like text."""

    chunk: Any  # mtmd_input_chunk_p, owned by the prompt's chunk list
    key: str  # "img:<digest>": the prompt cache matches images by content
    n_tokens: int  # KV cells it fills
    n_pos: int  # positions it advances (M-RoPE: fewer than tokens)


Item = int | _ImageItem  # a text token id, or an image
Key = int | str


def _key(item: Item) -> Key:
    return item if isinstance(item, int) else item.key


class _Prompt(Protocol):
    """A tokenized prompt: the items one sequence evaluates, and how they are counted."""

    items: list[Item]
    n_tokens: int
    n_image_tokens: int
    n_shared: int  # leading items of template or system text: reusable across clients

    def close(self) -> None: ...


def _tokenize(vocab: llama_cpp.llama_vocab_p, text: str, special: bool) -> list[int]:
    """llama_tokenize without BOS/EOS; `special` decides whether `<|...|>` become control tokens."""
    data = text.encode("utf-8")
    n_max = len(data) + 8
    for _ in range(2):
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, False, special)
        if n >= 0:
            return list(buf[:n])
        n_max = -n
    raise RuntimeError("llama_tokenize failed")


def _shared_tokens(vocab: llama_cpp.llama_vocab_p, segments: list[_Segment]) -> list[int]:
    """Tokens of the leading template and system segments, the part any client may reuse."""
    tokens: list[int] = []
    for seg in segments:
        if not seg.shared or seg.kind == "image":
            break
        tokens += _tokenize(vocab, seg.text, seg.kind == "template")
    return tokens


class _TextPrompt:
    """Text-only prompt for models without a projector: plain token ids."""

    n_image_tokens = 0

    def __init__(self, vocab: llama_cpp.llama_vocab_p, segments: list[_Segment]) -> None:
        self.items: list[Item] = []
        for seg in segments:
            self.items += _tokenize(vocab, seg.text, seg.kind == "template")
        self.n_tokens = len(self.items)
        self.n_shared = len(_shared_tokens(vocab, segments))

    def close(self) -> None:
        pass


class _MtmdPrompt:
    """Prompt tokenized by libmtmd from parts: text chunks and preprocessed image chunks."""

    def __init__(
        self, vocab: llama_cpp.llama_vocab_p, mctx: mtmd_cpp.mtmd_context_p, segments: list[_Segment]
    ) -> None:
        self._mctx = mctx
        self._bitmaps: list[mtmd_cpp.mtmd_bitmap_p] = []
        self._chunks = mtmd_cpp.mtmd_input_chunks_init()
        if self._chunks is None:
            raise MemoryError("mtmd_input_chunks_init failed")
        try:
            self._tokenize(segments)
            self._collect()
            shared = _shared_tokens(vocab, segments)
            # Only a prefix proven identical to what libmtmd produced may be shared across clients.
            self.n_shared = len(shared) if self.items[: len(shared)] == shared else 0
        except BaseException:
            self.close()
            raise

    def _tokenize(self, segments: list[_Segment]) -> None:
        keep: list[object] = []  # ctypes objects that must outlive the call
        ptrs = (ctypes.POINTER(mtmd_cpp.mtmd_input_part) * len(segments))()
        for i, seg in enumerate(segments):
            part = mtmd_cpp.mtmd_input_part()
            if seg.image is not None:
                part.bitmap = self._bitmap(seg.image)
            else:
                data = seg.text.encode("utf-8")
                text = mtmd_cpp.mtmd_input_text(data, len(data), False, seg.kind == "template")
                part.text = ctypes.pointer(text)
                keep += [data, text]
            keep.append(part)
            ptrs[i] = ctypes.pointer(part)
        rc = mtmd_cpp.mtmd_tokenize_from_parts(self._mctx, self._chunks, ptrs, len(segments), False)
        if rc != 0:
            raise BadRequest("an image could not be prepared for the model")

    def _bitmap(self, image: RGBImage) -> mtmd_cpp.mtmd_bitmap_p:
        """mtmd bitmap from raw RGB rows, so stb_image never parses anything a client sent."""
        w, h = image.width, image.height
        if w <= 0 or h <= 0 or len(image.rgb) != w * h * 3:
            raise BadRequest("an image has inconsistent dimensions")
        data = (ctypes.c_uint8 * len(image.rgb)).from_buffer_copy(image.rgb)
        bitmap: mtmd_cpp.mtmd_bitmap_p | None = mtmd_cpp.mtmd_bitmap_init(w, h, data)
        if bitmap is None:
            raise MemoryError("mtmd_bitmap_init failed")
        self._bitmaps.append(bitmap)
        mtmd_cpp.mtmd_bitmap_set_id(bitmap, _image_digest(image).encode())  # becomes the chunk id
        return bitmap

    def _chunk_list(self) -> list[mtmd_cpp.mtmd_input_chunk_p]:
        assert self._chunks is not None
        n = mtmd_cpp.mtmd_input_chunks_size(self._chunks)
        out = [mtmd_cpp.mtmd_input_chunks_get(self._chunks, i) for i in range(n)]
        return [c for c in out if c is not None]

    def _collect(self) -> None:
        """Items and counts; tokens include image tokens (llama.cpp's own count is of positions)."""
        self.items: list[Item] = []
        self.n_tokens = self.n_image_tokens = 0
        for chunk in self._chunk_list():
            n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
            self.n_tokens += n
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                size = ctypes.c_size_t(0)
                ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(size))
                self.items += [int(ptr[i]) for i in range(size.value)] if ptr else []
                continue
            self.n_image_tokens += n
            chunk_id = (mtmd_cpp.mtmd_input_chunk_get_id(chunk) or b"").decode("ascii", "replace")
            self.items.append(_ImageItem(chunk, "img:" + (chunk_id or secrets.token_hex(16)), n,
                                         mtmd_cpp.mtmd_input_chunk_get_n_pos(chunk)))
        if not self.items or not isinstance(self.items[-1], int):  # sampling needs final text logits
            raise BadRequest("the chat template must end the prompt with text")

    def close(self) -> None:
        if self._chunks is not None:
            mtmd_cpp.mtmd_input_chunks_free(self._chunks)
            self._chunks = None
        while self._bitmaps:
            mtmd_cpp.mtmd_bitmap_free(self._bitmaps.pop())


def _image_digest(image: RGBImage) -> str:
    """Identity of an image's content: the encoded file's digest, else one over the pixels."""
    if image.source_sha256:
        return f"{image.source_sha256}:{image.width}x{image.height}"
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.rgb)
    return digest.hexdigest()


# --- output -------------------------------------------------------------------------------------


class _TextOut:
    """Turns token bytes into pieces: UTF-8-safe, and stop strings held back and never emitted."""

    def __init__(self, stops: Sequence[str], on_piece: Callable[[str], None]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stops if s)
        self._on_piece = on_piece
        self._pending = ""
        self.parts: list[str] = []

    def feed(self, data: bytes) -> bool:
        """Add a token's bytes; True when a stop string completed (generation must end)."""
        self._pending += self._decoder.decode(data)
        return self._flush(final=False)

    def finish(self) -> None:
        """Emit what is still held back once generation ended for another reason."""
        self._pending += self._decoder.decode(b"", final=True)
        self._flush(final=True)

    def _flush(self, final: bool) -> bool:
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._emit(self._pending[: min(hits)])
            self._pending = ""
            return True
        keep = 0 if final else self._holdback()
        self._emit(self._pending[: len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep :]
        return False

    def _holdback(self) -> int:
        """Length of the longest tail of pending text that could start a stop string."""
        text = self._pending
        for k in range(min(len(text), max((len(s) for s in self._stops), default=1) - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self._stops):
                return k
        return 0

    def _emit(self, text: str) -> None:
        if text:
            self.parts.append(text)
            self._on_piece(text)


# --- slots and sequences ------------------------------------------------------------------------


@dataclass
class _Slot:
    """One llama.cpp sequence id and what its KV memory holds, so a later prompt can reuse it."""

    seq_id: int
    keys: list[Key] = field(default_factory=list)  # items in KV, in order
    ends: list[int] = field(default_factory=list)  # position after each item
    owner: str = ""  # client whose request last filled it
    n_shared: int = 0  # leading keys any client may reuse (template and system text)
    busy: bool = False
    last_used: int = 0

    def common(self, keys: list[Key], owner: str, n_shared: int) -> int:
        """Items of `keys` this slot already holds; another client's prefix only up to the shared part.

        At least the last item is always evaluated again: sampling needs its logits.
        """
        limit = min(len(keys) - 1, len(self.keys))
        if owner != self.owner:
            limit = min(limit, n_shared, self.n_shared)
        n = 0
        while n < limit and self.keys[n] == keys[n]:
            n += 1
        return n

    def forget(self) -> None:
        """The KV memory was wiped: nothing to reuse."""
        self.keys, self.ends, self.n_shared = [], [], 0


class _Sequence:
    """One request in a slot: prompt items still to evaluate, its sampler, and the output so far."""

    def __init__(self, slot: _Slot, prompt: _Prompt, params: SamplingParams,
                 cancelled: Callable[[], bool], on_piece: Callable[[str], None], start: int) -> None:
        self.slot, self.prompt, self.params, self.cancelled = slot, prompt, params, cancelled
        self.cursor = start  # next prompt item to evaluate
        self.n_past = slot.ends[start - 1] if start else 0
        self.out = _TextOut(params.stop, on_piece)
        self.sampler: llama_cpp.llama_sampler_p | None = _make_sampler(params)
        self.n_gen = 0
        self.next_token: int | None = None  # sampled, still to be decoded
        cached = sum(1 if isinstance(i, int) else i.n_tokens for i in prompt.items[:start])
        self.usage = Usage(prompt.n_tokens, image_tokens=prompt.n_image_tokens, cached_tokens=cached)
        self.completion: Completion | None = None
        self.error: BaseException | None = None

    @property
    def prompting(self) -> bool:
        return self.cursor < len(self.prompt.items)

    @property
    def finished(self) -> bool:
        return self.completion is not None or self.error is not None

    def next_image(self) -> _ImageItem | None:
        item = self.prompt.items[self.cursor] if self.prompting else None
        return item if isinstance(item, _ImageItem) else None

    def text_run(self, limit: int) -> list[int]:
        """Up to `limit` prompt tokens from the cursor, stopping before an image."""
        run: list[int] = []
        for item in self.prompt.items[self.cursor : self.cursor + limit]:
            if not isinstance(item, int):
                break
            run.append(item)
        return run

    def remember(self, tokens: Sequence[int], first_pos: int) -> None:
        """Record tokens now in this slot's KV memory at first_pos.. (for the prompt cache)."""
        self.slot.keys.extend(tokens)
        self.slot.ends.extend(range(first_pos + 1, first_pos + len(tokens) + 1))


@dataclass
class _Span:
    """Tokens of one sequence inside a batch; `index` is the batch row whose logits it samples."""

    seq: _Sequence
    tokens: list[int]
    pos: int
    index: int  # -1: no logits wanted (a prompt chunk that is not the last)
    prompt: bool


# --- engine -------------------------------------------------------------------------------------


class Engine:
    """One loaded model with `parallel` slots; not thread-safe: one worker thread calls everything.

    Requests are admitted into free slots (sequence ids) and advanced together by `step()`: each
    step evaluates at most one image, then decodes one llama_batch holding the next token of every
    generating sequence plus prompt tokens of admitted ones (oldest first, up to n_batch).
    """

    info: ModelInfo

    def __init__(self, model: llama_cpp.llama_model_p, ctx: llama_cpp.llama_context_p,
                 mctx: mtmd_cpp.mtmd_context_p | None, template: _ChatTemplate, info: ModelInfo,
                 prompt_cache: bool = True) -> None:
        self._model: llama_cpp.llama_model_p | None = model
        self._ctx: llama_cpp.llama_context_p | None = ctx
        self._mctx = mctx
        self._template = template
        self.info = info
        self._prompt_cache = prompt_cache
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._n_batch = int(llama_cpp.llama_n_batch(ctx))
        self._n_ctx = info.n_ctx
        self._slots = [_Slot(i) for i in range(info.parallel)]
        self._active: list[_Sequence] = []  # in admission order: prompts are served oldest first
        self._finished: list[_Sequence] = []  # ended since the last step() returned
        self._clock = 0
        n_rows = max(self._n_batch, info.parallel)
        self._batch: llama_cpp.llama_batch | None = llama_cpp.llama_batch_init(n_rows, 0, 1)
        self._prepare_lock = threading.Condition()
        self._preparing = 0  # prepare() calls in flight on other threads: close() waits for them
        self._closing = False

    @property
    def parallel(self) -> int:
        return len(self._slots)

    @property
    def free_slots(self) -> int:
        return sum(not s.busy for s in self._slots)

    @property
    def active(self) -> int:
        return len(self._active)

    # load ---------------------------------------------------------------------------------------

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        """Check the files, load model and projector, and validate the chat template."""
        _install_native_logging()
        model_bytes, model_sha = _check_gguf(config.model_path, "model")
        _check_pin(config.model_path, model_sha, config.model_sha256, "sha256")
        mm_bytes = mm_sha = None
        if config.mmproj_path is not None:
            mm_bytes, mm_sha = _check_gguf(config.mmproj_path, "mmproj (vision projector)")
            _check_pin(config.mmproj_path, mm_sha, config.mmproj_sha256, "mmproj_sha256")
        threads = choose_threads(config.threads)
        supported = bool(llama_cpp.llama_supports_gpu_offload())
        active = supported and config.n_gpu_layers != 0
        model = _open_model(config)
        ctx = mctx = None
        try:
            ctx = _open_context(config, model, threads)
            template = _open_template(config, model)
            if config.mmproj_path is not None:
                mctx = _open_mtmd(config, model, threads, use_gpu=active)
            meta = functools.partial(_meta, model)
            info = ModelInfo(
                name=config.name or meta("general.name") or config.model_path.stem,
                architecture=meta("general.architecture") or "unknown",
                quantization=_quantization(meta("general.file_type"), model),
                model_path=config.model_path,
                model_bytes=model_bytes,
                model_sha256=model_sha,
                mmproj_path=config.mmproj_path,
                mmproj_bytes=mm_bytes,
                mmproj_sha256=mm_sha,
                supports_images=mctx is not None,
                gpu_offload_supported=supported,
                gpu_offload_active=active,
                n_gpu_layers=config.n_gpu_layers,
                n_ctx=int(llama_cpp.llama_n_ctx_seq(ctx)),
                threads=threads,
                system_info=_system_info(),
                description=meta("general.description") or "",
                parallel=int(llama_cpp.llama_n_seq_max(ctx)),
                max_token_bytes=_longest_token_bytes(model),
                image_max_pixels=_image_max_pixels(config, model, mctx),
            )
        except BaseException:
            if mctx is not None:
                mtmd_cpp.mtmd_free(mctx)
            if ctx is not None:
                llama_cpp.llama_free(ctx)
            llama_cpp.llama_model_free(model)
            raise
        return cls(model, ctx, mctx, template, info, prompt_cache=config.prompt_cache)

    # admit --------------------------------------------------------------------------------------

    def prepare(self, messages: Sequence[Message], params: SamplingParams) -> _Prompt:
        """Render and tokenize a request before it may take a slot; callable from any thread.

        It reads only the template, the vocabulary and the projector (as llama-server's HTTP threads do),
        so a long prompt is tokenized beside the engine thread instead of stalling every stream. A prompt
        whose text alone cannot fit is refused before any tokenizing. The caller owns the result.
        """
        with self._prepare_lock:
            if self._ctx is None or self._closing:
                raise RuntimeError("the engine is closed")
            self._preparing += 1
        try:
            return self._prepare(messages, params)
        finally:
            with self._prepare_lock:
                self._preparing -= 1
                self._prepare_lock.notify_all()

    def _prepare(self, messages: Sequence[Message], params: SamplingParams) -> _Prompt:
        if self._mctx is None and any(m.images for m in messages):
            raise BadRequest("this model has no vision projector (mmproj); send text only")
        segments = self._template.segments(messages)
        self._check_text_bound(segments, params.max_tokens)
        prompt = self._prompt(segments)
        try:
            if prompt.n_tokens == 0:
                raise BadRequest("the prompt is empty")
            self._check_room(prompt.n_tokens, params.max_tokens)
        except BaseException:
            prompt.close()
            raise
        return prompt

    def _check_text_bound(self, segments: list[_Segment], max_tokens: int) -> None:
        """Refuse, before tokenizing, text whose fewest possible tokens already overflow the context.

        No token covers more than `max_token_bytes` bytes of text, so bytes / that is a lower bound.
        """
        n_bytes = sum(len(seg.text.encode("utf-8", "surrogatepass")) for seg in segments)
        at_least = -(-n_bytes // self.info.max_token_bytes) if self.info.max_token_bytes else 0
        room = self._n_ctx - max_tokens
        if at_least > room:
            raise BadRequest(
                f"prompt is at least {at_least} tokens ({n_bytes} bytes of text); the context holds "
                f"{max(room, 0)} ({self._n_ctx} minus max_tokens {max_tokens})")

    def admit(self, messages: Sequence[Message], params: SamplingParams,
              cancelled: Callable[[], bool], on_piece: Callable[[str], None],
              owner: str = "", prepared: _Prompt | None = None) -> _Sequence:
        """Place a request in the free slot holding the longest reusable prefix.

        `prepared` is what `prepare` returned for these messages (the engine takes it over); without it
        the request is tokenized here. Raises BadRequest for what the client must change; the request
        then holds no slot.
        """
        if self._ctx is None:
            if prepared is not None:
                prepared.close()
            raise RuntimeError("the engine is closed")
        free = [s for s in self._slots if not s.busy]
        if not free:
            if prepared is not None:
                prepared.close()
            raise RuntimeError("no free slot: admit at most `parallel` requests at once")
        prompt = prepared if prepared is not None else self._prepare(messages, params)
        try:
            keys = [_key(i) for i in prompt.items]
            slot = max(free, key=lambda s: (self._reusable(s, keys, owner, prompt), -s.last_used))
            keep = self._trim(slot, self._reusable(slot, keys, owner, prompt))
        except BaseException:
            prompt.close()
            raise
        self._clock += 1
        slot.busy, slot.owner, slot.last_used = True, owner, self._clock
        slot.n_shared = prompt.n_shared
        seq = _Sequence(slot, prompt, params, cancelled, on_piece, keep)
        self._active.append(seq)
        return seq

    def _prompt(self, segments: list[_Segment]) -> _Prompt:
        """Tokenize with libmtmd when a projector is loaded, else with the model's vocabulary."""
        if self._mctx is not None:
            return _MtmdPrompt(self._vocab, self._mctx, segments)
        return _TextPrompt(self._vocab, segments)

    def _check_room(self, n_prompt: int, max_tokens: int) -> None:
        """Refuse before any work a prompt that, with max_tokens, would overflow its sequence."""
        room = self._n_ctx - max_tokens
        if n_prompt > room:
            raise BadRequest(
                f"prompt is {n_prompt} tokens; the context holds {max(room, 0)} "
                f"({self._n_ctx} minus max_tokens {max_tokens})"
            )

    def _reusable(self, slot: _Slot, keys: list[Key], owner: str, prompt: _Prompt) -> int:
        return slot.common(keys, owner, prompt.n_shared) if self._prompt_cache else 0

    def _trim(self, slot: _Slot, keep: int) -> int:
        """Drop the slot's KV memory after its first `keep` items; returns how many were kept."""
        pos = slot.ends[keep - 1] if keep else 0
        if not llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, pos, -1):
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)  # whole: never fails
            keep = 0
        del slot.keys[keep:], slot.ends[keep:]
        return keep

    # step ---------------------------------------------------------------------------------------

    def step(self) -> list[_Sequence]:
        """Advance every admitted request by one round; returns those that ended in it.

        A failure ends the requests it touched (their `error` is set) instead of escaping, so every
        slot is free again afterwards.
        """
        if self._ctx is None:
            raise RuntimeError("the engine is closed")
        try:
            self._advance()
        except Exception as exc:
            log.exception("engine step failed; ending %d requests", len(self._active))
            for seq in list(self._active):
                self._fail(seq, exc)
        done, self._finished = self._finished, []
        return done

    def _advance(self) -> None:
        for seq in list(self._active):
            if seq.cancelled():
                self._finish(seq, "cancelled")
        imaging = next((s for s in self._active if s.next_image() is not None), None)
        if imaging is not None:
            self._eval_image(imaging)
        spans = self._fill_batch()
        if spans:
            self._decode_spans(spans)

    def _eval_image(self, seq: _Sequence) -> None:
        """Encode one image and decode its embeddings into the sequence (others wait meanwhile)."""
        item = seq.next_image()
        assert item is not None and self._mctx is not None
        new_past = llama_cpp.llama_pos(0)
        rc = mtmd_cpp.mtmd_helper_eval_chunk_single(
            self._mctx, self._ctx, item.chunk, seq.n_past, seq.slot.seq_id, self._n_batch, False,
            ctypes.byref(new_past))
        if rc != 0:
            self._fail(seq, RuntimeError(f"evaluating an image failed (mtmd error {rc})"))
            return
        seq.slot.keys.append(item.key)
        seq.slot.ends.append(new_past.value)
        seq.n_past = new_past.value
        seq.cursor += 1

    def _fill_batch(self) -> list[_Span]:
        """One token per generating sequence, then prompt tokens, oldest request first."""
        spans: list[_Span] = []
        rows = 0
        for seq in self._active:
            if seq.next_token is not None:
                spans.append(_Span(seq, [seq.next_token], seq.n_past, rows, prompt=False))
                seq.next_token = None
                rows += 1
        for seq in self._active:
            run = seq.text_run(self._n_batch - rows) if rows < self._n_batch else []
            if not run:
                continue
            last = seq.cursor + len(run) == len(seq.prompt.items)
            rows += len(run)
            spans.append(_Span(seq, run, seq.n_past, rows - 1 if last else -1, prompt=True))
        return spans

    def _decode_spans(self, spans: list[_Span]) -> None:
        """Decode all spans in one llama_decode, then sample each sequence that asked for logits."""
        batch = self._batch
        assert batch is not None
        row = 0
        for span in spans:
            for i, token in enumerate(span.tokens):
                batch.token[row] = token
                batch.pos[row] = span.pos + i  # type: ignore[call-overload]  # stub: array of arrays
                batch.n_seq_id[row] = 1
                batch.seq_id[row][0] = span.seq.slot.seq_id
                batch.logits[row] = row == span.index
                row += 1
        batch.n_tokens = row
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc != 0:
            for span in spans:
                self._fail(span.seq, RuntimeError(f"llama_decode failed with status {rc}"))
            return
        for span in spans:
            span.seq.remember(span.tokens, span.pos)
            span.seq.n_past += len(span.tokens)
            if span.prompt:
                span.seq.cursor += len(span.tokens)
            if span.index >= 0 and not span.seq.finished:
                self._sample(span.seq, span.index)

    def _sample(self, seq: _Sequence, row: int) -> None:
        """Sample the next token from batch row `row`; stream it, or end the request."""
        token = llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, row)
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(seq, "stop")
            return
        seq.n_gen += 1
        if seq.out.feed(self._piece(token)):
            self._finish(seq, "stop", flush=False)  # the stop string itself is never emitted
        elif seq.n_gen >= seq.params.max_tokens:
            self._finish(seq, "length")
        else:
            seq.next_token = token

    def _finish(self, seq: _Sequence, reason: FinishReason, flush: bool = True) -> None:
        if flush:
            seq.out.finish()
        seq.usage.completion_tokens = seq.n_gen
        seq.completion = Completion("".join(seq.out.parts), reason, seq.usage)
        self._release(seq)

    def _fail(self, seq: _Sequence, error: BaseException) -> None:
        """End a request with an error; its slot's memory is wiped, since its state is unknown."""
        seq.error = error
        llama_cpp.llama_memory_seq_rm(self._mem, seq.slot.seq_id, -1, -1)
        seq.slot.forget()
        self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        if seq.sampler is not None:
            llama_cpp.llama_sampler_free(seq.sampler)
            seq.sampler = None
        seq.prompt.close()
        seq.slot.busy = False
        if seq in self._active:
            self._active.remove(seq)
            self._finished.append(seq)

    def _piece(self, token: int) -> bytes:
        """Bytes of one token; control tokens render as nothing so they never reach clients."""
        size = 64
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, False)
            if n >= 0:
                return buf.raw[:n]
            size = -n
        raise RuntimeError("llama_token_to_piece failed")

    # one request --------------------------------------------------------------------------------

    def generate(
        self,
        messages: Sequence[Message],
        params: SamplingParams,
        cancelled: Callable[[], bool],
        on_piece: Callable[[str], None],
        owner: str = "",
    ) -> Completion:
        """Run one request to its end (other admitted requests advance meanwhile)."""
        seq = self.admit(messages, params, cancelled, on_piece, owner)
        while not seq.finished:
            self.step()
        if seq.error is not None:
            raise seq.error
        assert seq.completion is not None
        return seq.completion

    # close --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free requests still admitted, the projector, the batch, context and model; idempotent.

        Waits (up to a minute) for prepare() calls on other threads, which read the vocabulary.
        """
        with self._prepare_lock:
            self._closing = True
            self._prepare_lock.wait_for(lambda: self._preparing == 0, timeout=60)
        for seq in list(self._active):
            self._fail(seq, RuntimeError("the engine was closed"))
        self._finished.clear()
        if self._mctx is not None:
            mtmd_cpp.mtmd_free(self._mctx)
            self._mctx = None
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None


def _make_sampler(params: SamplingParams) -> llama_cpp.llama_sampler_p:
    """Sampler chain: greedy at temperature 0, else top-k, top-p, temperature and seeded draw."""
    chain: llama_cpp.llama_sampler_p = llama_cpp.llama_sampler_chain_init(
        llama_cpp.llama_sampler_chain_default_params()
    )
    if params.temperature <= 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    seed = llama_cpp.LLAMA_DEFAULT_SEED if params.seed is None else params.seed % 0xFFFFFFFF
    add = llama_cpp.llama_sampler_chain_add
    add(chain, llama_cpp.llama_sampler_init_top_k(TOP_K))
    if params.top_p < 1.0:
        add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
    add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


# --- load helpers -------------------------------------------------------------------------------


_SPLIT_MODES = {"none": llama_cpp.LLAMA_SPLIT_MODE_NONE, "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
                "row": llama_cpp.LLAMA_SPLIT_MODE_ROW}
N_BATCH = 512  # prompt tokens per decode: also the most another client waits between its tokens
_BACKEND = {"ready": False}
_KEEP_ALIVE: list[object] = []  # ctypes arrays the model params point at (tensor_split)


def _backend_init() -> None:
    """llama_backend_init once per process (what Llama() does on first use)."""
    if not _BACKEND["ready"]:
        llama_cpp.llama_backend_init()
        _BACKEND["ready"] = True


def _load_error(config: EngineConfig, errors: list[str], fallback: str) -> ModelLoadError:
    reason = "; ".join(errors[-3:]) or fallback
    return ModelLoadError(
        f"llama.cpp could not load the model {config.model_path}: {reason}",
        hint="check that the file is complete (compare its SHA-256 with the publisher's) "
        "and that this build supports its architecture and quantization",
    )


def _open_model(config: EngineConfig) -> llama_cpp.llama_model_p:
    """Load the weights with the low-level API (Llama() cannot set n_seq_max), or ModelLoadError."""
    _backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0x7FFFFFFF if config.n_gpu_layers == -1 else config.n_gpu_layers
    params.split_mode = _SPLIT_MODES[config.split_mode]
    params.main_gpu = config.main_gpu
    if config.tensor_split:
        split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*config.tensor_split)
        _KEEP_ALIVE.append(split)
        params.tensor_split = split
    params.load_mode = (llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK if config.use_mlock
                        else llama_cpp.LLAMA_LOAD_MODE_MMAP)
    with _capture_native_errors() as errors:
        model: llama_cpp.llama_model_p | None = llama_cpp.llama_model_load_from_file(
            str(config.model_path).encode(), params)
    if model is None:
        raise _load_error(config, errors, "llama_model_load_from_file failed")
    return model


def _open_context(config: EngineConfig, model: llama_cpp.llama_model_p,
                  threads: int) -> llama_cpp.llama_context_p:
    """A context with `parallel` sequences of n_ctx tokens each, in separate KV streams.

    kv_unified = false gives every sequence its own n_ctx (llama.cpp splits the total evenly), so
    one long request can never crowd another out of the cache mid-generation.
    """
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = config.n_ctx * config.parallel
    params.n_batch = params.n_ubatch = min(N_BATCH, params.n_ctx)
    params.n_seq_max = config.parallel
    params.kv_unified = False
    params.n_threads = params.n_threads_batch = threads
    params.no_perf = True
    with _capture_native_errors() as errors:
        ctx: llama_cpp.llama_context_p | None = llama_cpp.llama_init_from_model(model, params)
    if ctx is None:
        raise ModelLoadError(
            f"llama.cpp could not create a context of {config.parallel} x {config.n_ctx} tokens: "
            + ("; ".join(errors[-3:]) or "llama_init_from_model failed"),
            hint="lower [model] n_ctx or parallel (the KV cache needs memory for their product)")
    return ctx


def _meta(model: llama_cpp.llama_model_p, key: str) -> str | None:
    """A scalar GGUF metadata value as text, or None when the model does not have the key."""
    size = 256
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", "replace")
        size = n + 1
    return None


def _open_template(config: EngineConfig, model: llama_cpp.llama_model_p) -> _ChatTemplate:
    """The configured or embedded chat template, compiled and test-rendered."""
    source = config.chat_template or _meta(model, "tokenizer.chat_template")
    if not source:
        raise ModelLoadError(
            f"the model {config.model_path} has no chat template (tokenizer.chat_template)",
            hint="set chat_template in [model] to the model's Jinja chat template",
        )
    where = "chat_template in [model]" if config.chat_template else "the model's chat template"
    vocab = llama_cpp.llama_model_get_vocab(model)
    try:
        template = _ChatTemplate(
            source,
            bos_token=_token_text(vocab, "bos"),
            eos_token=_token_text(vocab, "eos"),
            add_bos=bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        )
        template.probe(with_images=config.mmproj_path is not None)
    except (jinja2.TemplateError, ValueError, BadRequest) as e:
        raise ModelLoadError(
            f"{where} cannot be used: {e}",
            hint="fix or replace the template; it must render OpenAI-style messages",
        ) from None
    return template


def _longest_token_bytes(model: llama_cpp.llama_model_p) -> int:
    """Bytes of the vocabulary's longest token text (control tokens included), read once at load."""
    vocab = llama_cpp.llama_model_get_vocab(model)
    buf = ctypes.create_string_buffer(1024)
    longest = 1
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
        longest = max(longest, abs(n))  # negative: the piece needs -n bytes
    return longest


_PROBE_SIDE = 448  # a multiple of every Qwen-VL patch x merge size (28, 32): not resized by libmtmd


def _image_max_pixels(config: EngineConfig, model: llama_cpp.llama_model_p,
                      mctx: mtmd_cpp.mtmd_context_p | None) -> int:
    """Pixels that make image_max_tokens tokens in this projector (measured on a probe image), so
    intake can scale an image down to that before it ever reaches the encoder; 0 when unbounded."""
    if mctx is None or config.image_max_tokens <= 0:
        return 0
    side = _PROBE_SIDE
    probe = RGBImage(side, side, bytes(side * side * 3), 0, "PNG")
    vocab = llama_cpp.llama_model_get_vocab(model)
    prompt = _MtmdPrompt(vocab, mctx, [_Segment("image", image=probe), _Segment("template", "u")])
    try:
        per_token = side * side / max(prompt.n_image_tokens, 1)
    finally:
        prompt.close()
    return int(per_token * config.image_max_tokens)


def _token_text(vocab: llama_cpp.llama_vocab_p, which: Literal["bos", "eos"]) -> str:
    """Text of the BOS/EOS token for templates that write {{ bos_token }}; '' if none."""
    token = llama_cpp.llama_vocab_bos(vocab) if which == "bos" else llama_cpp.llama_vocab_eos(vocab)
    if token < 0:
        return ""
    text = llama_cpp.llama_vocab_get_text(vocab, token)
    return text.decode("utf-8", "replace") if text else ""


def _open_mtmd(
    config: EngineConfig, model: llama_cpp.llama_model_p, threads: int, use_gpu: bool
) -> mtmd_cpp.mtmd_context_p:
    """Create the mtmd context ourselves: no warm-up, bounded image tokens, secret marker."""
    assert config.mmproj_path is not None
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu = use_gpu
    params.n_threads = threads
    params.print_timings = False
    params.warmup = False  # the default warm-up encodes a 1472x1472 image (~570 MiB)
    params.media_marker = _MEDIA_MARKER_C
    if config.image_min_tokens > 0:
        params.image_min_tokens = config.image_min_tokens
    if config.image_max_tokens > 0:
        params.image_max_tokens = config.image_max_tokens
    with _capture_native_errors() as errors:
        path = str(config.mmproj_path).encode()
        mctx: mtmd_cpp.mtmd_context_p | None = mtmd_cpp.mtmd_init_from_file(path, model, params)
    if mctx is None:
        raise _mtmd_load_error(config, errors)
    if not mtmd_cpp.mtmd_support_vision(mctx):
        mtmd_cpp.mtmd_free(mctx)
        raise ModelLoadError(
            f"the projector {config.mmproj_path} has no vision encoder",
            hint="use the vision mmproj file published with this model",
        )
    return mctx


def _mtmd_load_error(config: EngineConfig, errors: list[str]) -> ModelLoadError:
    """Explain a failed projector load; a width mismatch means the wrong mmproj for this model."""
    text = " ".join(errors)
    dims = re.search(r"text model \(n_embd = (\d+)\) and mmproj \(n_embd = (\d+)\)", text)
    if dims:
        return ModelLoadError(
            f"the projector {config.mmproj_path} does not match the model {config.model_path} "
            f"(dimension mismatch: model n_embd {dims[1]}, projector n_embd {dims[2]})",
            hint="use the mmproj file published together with this exact model",
        )
    reason = "; ".join(e.removeprefix("mtmd_init_from_file: error: ") for e in errors[-3:])
    return ModelLoadError(
        f"llama.cpp could not load the projector {config.mmproj_path}: {reason or 'unknown error'}",
        hint="check that the mmproj file is complete (compare its SHA-256) and is this model's",
    )
