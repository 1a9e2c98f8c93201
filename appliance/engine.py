"""The llama.cpp engine: loads a GGUF model (and optional vision projector) and generates.

This is the only module that imports llama_cpp. It talks to llama.cpp and libmtmd directly instead
of through `Llama.create_chat_completion` / `MTMDChatHandler`, because those fetch image URLs, let
user text become control tokens, and log prompts to stderr.
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import jinja2
import jinja2.ext
import llama_cpp
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp import mtmd_cpp

from appliance.errors import BadRequest, ModelLoadError
from appliance.inference import (
    Completion,
    EngineConfig,
    FinishReason,
    Message,
    ModelInfo,
    RGBImage,
    SamplingParams,
    Usage,
)

log = logging.getLogger("appliance.engine")
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

# llama_ftype values (llama.h) to the names people know quantizations by.
FTYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
    39: "NVFP4", 40: "Q1_0", 41: "Q2_0",
}  # fmt: skip
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


def _quantization(metadata: dict[str, str], model: llama_cpp.llama_model_p) -> str:
    """Quantization name from general.file_type, else from llama.cpp's own guess."""
    raw = metadata.get("general.file_type")
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
        texts: list[str] = []

        def hold(text: str) -> str:
            texts.append(text)
            return f"<@{tag}:{len(texts) - 1}@>"

        rendered = self._render([self._message(m, hold) for m in messages])
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


def _split(
    rendered: str, tag: str, texts: list[str], images: list[RGBImage]
) -> Iterator[_Segment]:
    """Cut the rendered prompt at placeholders and markers, substituting the real parts."""
    pattern = re.compile(re.escape(f"<@{tag}:") + r"(\d+)@>|" + re.escape(MEDIA_MARKER))
    pos, image_iter = 0, iter(images)
    for m in pattern.finditer(rendered):
        if m.start() > pos:
            yield _Segment("template", rendered[pos : m.start()])
        if m.group(1) is not None:
            if texts[int(m.group(1))]:
                yield _Segment("user", texts[int(m.group(1))])
        else:
            yield _Segment("image", image=next(image_iter))
        pos = m.end()
    if pos < len(rendered):
        yield _Segment("template", rendered[pos:])


# --- tokenized prompts --------------------------------------------------------------------------


class _Prompt(Protocol):
    """A tokenized prompt that can be fed into the llama context."""

    n_tokens: int
    n_image_tokens: int

    def evaluate(self, cancelled: Callable[[], bool]) -> int | None:
        """Decode into sequence 0 from position 0; next position, or None if cancelled."""
        ...

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


class _TextPrompt:
    """Text-only prompt for models without a projector: plain token ids."""

    n_image_tokens = 0

    def __init__(self, engine: Engine, segments: list[_Segment]) -> None:
        self._engine = engine
        self.tokens: list[int] = []
        for seg in segments:
            self.tokens += _tokenize(engine._vocab, seg.text, seg.kind == "template")
        self.n_tokens = len(self.tokens)

    def evaluate(self, cancelled: Callable[[], bool]) -> int | None:
        step = self._engine._n_batch
        for start in range(0, len(self.tokens), step):
            if cancelled():
                return None
            self._engine._decode(self.tokens[start : start + step], start)
        return len(self.tokens)

    def close(self) -> None:
        pass


class _MtmdPrompt:
    """Prompt tokenized by libmtmd from parts: text chunks and preprocessed image chunks."""

    def __init__(
        self, engine: Engine, mctx: mtmd_cpp.mtmd_context_p, segments: list[_Segment]
    ) -> None:
        self._engine = engine
        self._mctx = mctx
        self._bitmaps: list[mtmd_cpp.mtmd_bitmap_p] = []
        self._chunks = mtmd_cpp.mtmd_input_chunks_init()
        if self._chunks is None:
            raise MemoryError("mtmd_input_chunks_init failed")
        try:
            self._tokenize(segments)
            self._count()
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
        return bitmap

    def _chunk_list(self) -> list[mtmd_cpp.mtmd_input_chunk_p]:
        assert self._chunks is not None
        n = mtmd_cpp.mtmd_input_chunks_size(self._chunks)
        out = [mtmd_cpp.mtmd_input_chunks_get(self._chunks, i) for i in range(n)]
        return [c for c in out if c is not None]

    def _count(self) -> None:
        """Tokens fed, images included (llama.cpp's own count is of M-RoPE positions)."""
        self.n_tokens = self.n_image_tokens = 0
        is_text = False
        for chunk in self._chunk_list():
            n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
            self.n_tokens += n
            kind = mtmd_cpp.mtmd_input_chunk_get_type(chunk)
            is_text = kind == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT
            if not is_text:
                self.n_image_tokens += n
        if not is_text:  # sampling needs the logits of a final text token
            raise BadRequest("the chat template must end the prompt with text")

    def evaluate(self, cancelled: Callable[[], bool]) -> int | None:
        chunks = self._chunk_list()
        n_past = llama_cpp.llama_pos(0)
        for i, chunk in enumerate(chunks):
            if cancelled():
                return None
            rc = mtmd_cpp.mtmd_helper_eval_chunk_single(
                self._mctx, self._engine._ctx, chunk, n_past.value, 0,
                self._engine._n_batch, i == len(chunks) - 1, ctypes.byref(n_past),
            )  # fmt: skip
            if rc != 0:
                raise RuntimeError(f"evaluating prompt chunk {i} failed (mtmd error {rc})")
        return n_past.value

    def close(self) -> None:
        if self._chunks is not None:
            mtmd_cpp.mtmd_input_chunks_free(self._chunks)
            self._chunks = None
        while self._bitmaps:
            mtmd_cpp.mtmd_bitmap_free(self._bitmaps.pop())


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


# --- engine -------------------------------------------------------------------------------------


class Engine:
    """One loaded model; not thread-safe: the caller runs everything on one worker thread."""

    info: ModelInfo

    def __init__(
        self,
        llm: llama_cpp.Llama,
        mctx: mtmd_cpp.mtmd_context_p | None,
        template: _ChatTemplate,
        info: ModelInfo,
    ) -> None:
        self._llm: llama_cpp.Llama | None = llm
        self._mctx = mctx
        self._template = template
        self.info = info
        self._ctx = llm.ctx
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._n_batch = llm.n_batch
        self._n_ctx = llm.n_ctx()
        self._batch: llama_cpp.llama_batch | None = llama_cpp.llama_batch_init(llm.n_batch, 0, 1)

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
        llm = _open_llama(config, threads)
        mctx = None
        try:
            template = _open_template(config, llm)
            if config.mmproj_path is not None:
                mctx = _open_mtmd(config, llm, threads, use_gpu=active)
            info = ModelInfo(
                name=config.name or llm.metadata.get("general.name") or config.model_path.stem,
                architecture=llm.metadata.get("general.architecture", "unknown"),
                quantization=_quantization(llm.metadata, llm.model),
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
                n_ctx=llm.n_ctx(),
                threads=threads,
                system_info=_system_info(),
                description=llm.metadata.get("general.description", ""),
            )
        except BaseException:
            if mctx is not None:
                mtmd_cpp.mtmd_free(mctx)
            llm.close()
            raise
        return cls(llm, mctx, template, info)

    # generate -----------------------------------------------------------------------------------

    def generate(
        self,
        messages: Sequence[Message],
        params: SamplingParams,
        cancelled: Callable[[], bool],
        on_piece: Callable[[str], None],
    ) -> Completion:
        """Render, tokenize and evaluate the conversation, then sample until a stop condition."""
        if self._llm is None:
            raise RuntimeError("the engine is closed")
        if self._mctx is None and any(m.images for m in messages):
            raise BadRequest("this model has no vision projector (mmproj); send text only")
        prompt = self._prompt(self._template.segments(messages))
        try:
            if prompt.n_tokens == 0:
                raise BadRequest("the prompt is empty")
            usage = Usage(prompt_tokens=prompt.n_tokens, image_tokens=prompt.n_image_tokens)
            self._check_room(prompt.n_tokens, params.max_tokens)
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
            n_past = prompt.evaluate(cancelled)
        finally:
            prompt.close()
        if n_past is None or cancelled():
            return Completion("", "cancelled", usage)
        out = _TextOut(params.stop, on_piece)
        reason, usage.completion_tokens = self._sample(n_past, params, cancelled, out)
        return Completion("".join(out.parts), reason, usage)

    def _prompt(self, segments: list[_Segment]) -> _Prompt:
        """Tokenize with libmtmd when a projector is loaded, else with the model's vocabulary."""
        if self._mctx is not None:
            return _MtmdPrompt(self, self._mctx, segments)
        return _TextPrompt(self, segments)

    def _check_room(self, n_prompt: int, max_tokens: int) -> None:
        """Refuse before any work a prompt that, with max_tokens, would overflow the context."""
        room = self._n_ctx - max_tokens
        if n_prompt > room:
            raise BadRequest(
                f"prompt is {n_prompt} tokens; the context holds {max(room, 0)} "
                f"({self._n_ctx} minus max_tokens {max_tokens})"
            )

    def _sample(
        self, n_past: int, params: SamplingParams, cancelled: Callable[[], bool], out: _TextOut
    ) -> tuple[FinishReason, int]:
        """Token loop: sample, stream, and decode the token back in; returns (reason, count)."""
        sampler = _make_sampler(params)
        n_gen = 0
        reason: FinishReason = "length"
        try:
            while n_gen < params.max_tokens:
                token = llama_cpp.llama_sampler_sample(sampler, self._ctx, -1)
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    reason = "stop"
                    break
                n_gen += 1
                if out.feed(self._piece(token)):
                    return "stop", n_gen
                if n_gen >= params.max_tokens:
                    break
                if cancelled():
                    reason = "cancelled"
                    break
                self._decode([token], n_past)
                n_past += 1
        finally:
            llama_cpp.llama_sampler_free(sampler)
        out.finish()
        return reason, n_gen

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

    def _decode(self, tokens: list[int], pos: int) -> None:
        """Decode tokens at positions pos.. in sequence 0, keeping logits of the last one."""
        batch = self._batch
        assert batch is not None
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = pos + i  # type: ignore[call-overload]  # stub says array of arrays
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with status {rc}")

    # close --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the projector, the batch and the model; safe to call more than once."""
        if self._mctx is not None:
            mtmd_cpp.mtmd_free(self._mctx)
            self._mctx = None
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._llm is not None:
            self._llm.close()
            self._llm = None


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


def _open_llama(config: EngineConfig, threads: int) -> llama_cpp.Llama:
    """Create the Llama (model + context) or raise ModelLoadError with llama.cpp's reason."""
    with _capture_native_errors() as errors:
        try:
            return llama_cpp.Llama(
                model_path=str(config.model_path),
                n_gpu_layers=config.n_gpu_layers,
                n_ctx=config.n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                use_mlock=config.use_mlock,
                split_mode=_SPLIT_MODES[config.split_mode],
                main_gpu=config.main_gpu,
                tensor_split=list(config.tensor_split) or None,
                verbose=False,
            )
        except Exception as e:
            reason = "; ".join(errors[-3:]) or str(e)
            raise ModelLoadError(
                f"llama.cpp could not load the model {config.model_path}: {reason}",
                hint="check that the file is complete (compare its SHA-256 with the publisher's) "
                "and that this build supports its architecture and quantization",
            ) from None


def _open_template(config: EngineConfig, llm: llama_cpp.Llama) -> _ChatTemplate:
    """The configured or embedded chat template, compiled and test-rendered."""
    source = config.chat_template or llm.metadata.get("tokenizer.chat_template")
    if not source:
        raise ModelLoadError(
            f"the model {config.model_path} has no chat template (tokenizer.chat_template)",
            hint="set chat_template in [model] to the model's Jinja chat template",
        )
    where = "chat_template in [model]" if config.chat_template else "the model's chat template"
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
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


def _token_text(vocab: llama_cpp.llama_vocab_p, which: Literal["bos", "eos"]) -> str:
    """Text of the BOS/EOS token for templates that write {{ bos_token }}; '' if none."""
    token = llama_cpp.llama_vocab_bos(vocab) if which == "bos" else llama_cpp.llama_vocab_eos(vocab)
    if token < 0:
        return ""
    text = llama_cpp.llama_vocab_get_text(vocab, token)
    return text.decode("utf-8", "replace") if text else ""


def _open_mtmd(
    config: EngineConfig, llm: llama_cpp.Llama, threads: int, use_gpu: bool
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
        mctx: mtmd_cpp.mtmd_context_p | None = mtmd_cpp.mtmd_init_from_file(path, llm.model, params)
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
