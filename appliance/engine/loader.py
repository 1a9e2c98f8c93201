"""Loading: checks the GGUF files and their pins, opens model, context and projector, and reports build facts.

A file that is missing, not GGUF, or not the pinned digest is refused before llama.cpp parses it; llama.cpp's
own reason for a failed load is captured from its log into the ModelLoadError.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jinja2

from appliance.config.policy import ModelPolicy
from appliance.engine.bindings import llama_cpp, mtmd_cpp
from appliance.engine.native_log import capture_native_errors, install_native_logging
from appliance.engine.prompt import image_tokens
from appliance.engine.template import MEDIA_MARKER, ChatTemplate
from appliance.engine.types import FTYPE_NAMES, ModelInfo
from appliance.errors import BadRequest, ModelLoadError
from appliance.files import sha256_file

MAX_AUTO_THREADS = 4  # more threads rarely help decode speed, and they starve the HTTP side
N_BATCH = 512  # prompt tokens per decode: also the most another client waits between its tokens
_FTYPE_GUESSED = 1024
_MEDIA_MARKER_C = MEDIA_MARKER.encode()  # mtmd keeps the pointer; keep the bytes alive
_SPLIT_MODES = {
    "none": llama_cpp.LLAMA_SPLIT_MODE_NONE,
    "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
    "row": llama_cpp.LLAMA_SPLIT_MODE_ROW,
}
_BACKEND = {"ready": False}
_KEEP_ALIVE: list[object] = []  # ctypes arrays the model params point at (tensor_split)
_PROBE_SIDE = 448  # a multiple of every Qwen-VL patch x merge size (28, 32): not resized by libmtmd


@dataclass(frozen=True)
class Loaded:
    """Everything one load produced; the engine takes ownership of the native handles."""

    model: llama_cpp.llama_model_p
    ctx: llama_cpp.llama_context_p
    mctx: mtmd_cpp.mtmd_context_p | None
    template: ChatTemplate
    info: ModelInfo


def load(config: ModelPolicy) -> Loaded:
    """Check the files, load model and projector, and validate the chat template."""
    install_native_logging()
    model_bytes, model_sha = _check_gguf(config.path, "model")
    _check_pin(config.path, model_sha, config.sha256, "sha256")
    mm_bytes = mm_sha = None
    if config.mmproj is not None:
        mm_bytes, mm_sha = _check_gguf(config.mmproj, "mmproj (vision projector)")
        _check_pin(config.mmproj, mm_sha, config.mmproj_sha256, "mmproj_sha256")
    threads = choose_threads(config.threads)
    supported = bool(llama_cpp.llama_supports_gpu_offload())
    active = supported and config.n_gpu_layers != 0
    model = _open_model(config)
    ctx = mctx = None
    try:
        ctx = _open_context(config, model, threads)
        template = _open_template(config, model)
        if config.mmproj is not None:
            mctx = _open_mtmd(config, model, threads, use_gpu=active)
        meta = functools.partial(_meta, model)
        max_pixels, token_pixels = _image_pixels(config, model, mctx)
        info = ModelInfo(
            name=config.name or meta("general.name") or config.path.stem,
            architecture=meta("general.architecture") or "unknown",
            quantization=_quantization(meta("general.file_type"), model),
            model_path=config.path,
            model_bytes=model_bytes,
            model_sha256=model_sha,
            mmproj_path=config.mmproj,
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
            image_max_pixels=max_pixels,
            image_token_pixels=token_pixels,
            image_min_tokens=config.image_min_tokens,
        )
    except BaseException:
        if mctx is not None:
            mtmd_cpp.mtmd_free(mctx)
        if ctx is not None:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
        raise
    return Loaded(model, ctx, mctx, template, info)


# --- files and build ----------------------------------------------------------------------------


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
            hint="copy the exact file the policy was written for, or update the pin",
        )


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


# --- load helpers -------------------------------------------------------------------------------


def _backend_init() -> None:
    """llama_backend_init once per process (what Llama() does on first use)."""
    if not _BACKEND["ready"]:
        llama_cpp.llama_backend_init()
        _BACKEND["ready"] = True


def _load_error(config: ModelPolicy, errors: list[str], fallback: str) -> ModelLoadError:
    reason = "; ".join(errors[-3:]) or fallback
    return ModelLoadError(
        f"llama.cpp could not load the model {config.path}: {reason}",
        hint="check that the file is complete (compare its SHA-256 with the publisher's) "
        "and that this build supports its architecture and quantization",
    )


def _open_model(config: ModelPolicy) -> llama_cpp.llama_model_p:
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
    params.load_mode = (
        llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK if config.use_mlock else llama_cpp.LLAMA_LOAD_MODE_MMAP
    )
    with capture_native_errors() as errors:
        model: llama_cpp.llama_model_p | None = llama_cpp.llama_model_load_from_file(
            str(config.path).encode(), params
        )
    if model is None:
        raise _load_error(config, errors, "llama_model_load_from_file failed")
    return model


def _open_context(
    config: ModelPolicy, model: llama_cpp.llama_model_p, threads: int
) -> llama_cpp.llama_context_p:
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
    with capture_native_errors() as errors:
        ctx: llama_cpp.llama_context_p | None = llama_cpp.llama_init_from_model(model, params)
    if ctx is None:
        raise ModelLoadError(
            f"llama.cpp could not create a context of {config.parallel} x {config.n_ctx} tokens: "
            + ("; ".join(errors[-3:]) or "llama_init_from_model failed"),
            hint="lower [model] n_ctx or parallel (the KV cache needs memory for their product)",
        )
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


def _open_template(config: ModelPolicy, model: llama_cpp.llama_model_p) -> ChatTemplate:
    """The configured or embedded chat template, compiled and test-rendered."""
    source = config.chat_template or _meta(model, "tokenizer.chat_template")
    if not source:
        raise ModelLoadError(
            f"the model {config.path} has no chat template (tokenizer.chat_template)",
            hint="set chat_template in [model] to the model's Jinja chat template",
        )
    where = "chat_template in [model]" if config.chat_template else "the model's chat template"
    vocab = llama_cpp.llama_model_get_vocab(model)
    try:
        template = ChatTemplate(
            source,
            bos_token=_token_text(vocab, "bos"),
            eos_token=_token_text(vocab, "eos"),
            add_bos=bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        )
        template.probe(with_images=config.mmproj is not None)
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


def _image_pixels(
    config: ModelPolicy, model: llama_cpp.llama_model_p, mctx: mtmd_cpp.mtmd_context_p | None
) -> tuple[int, int]:
    """(image_max_pixels, image_token_pixels), measured on probe images; 0 where not known.

    image_max_pixels make image_max_tokens tokens, so intake scales an image down to that before the
    encoder sees it. image_token_pixels is one token's pixels, proven when a probe of half the area
    makes half the tokens (neither raised to image_min_tokens nor cut to image_max_tokens), so intake
    may bound an image's tokens from its header before decoding it.
    """
    if mctx is None or config.image_max_tokens <= 0:
        return 0, 0
    vocab = llama_cpp.llama_model_get_vocab(model)
    per_token = 0.0
    for side in (_PROBE_SIDE, 2 * _PROBE_SIDE, 3 * _PROBE_SIDE):
        n = max(image_tokens(vocab, mctx, side, side), 1)
        per_token = per_token or side * side / n  # the first probe's, unless a later one is proven
        half = image_tokens(vocab, mctx, side, side // 2)
        if half > config.image_min_tokens and n < config.image_max_tokens and 2 * half == n:
            return int(side * side / n * config.image_max_tokens), side * side // n
    return int(per_token * config.image_max_tokens), 0


def _token_text(vocab: llama_cpp.llama_vocab_p, which: Literal["bos", "eos"]) -> str:
    """Text of the BOS/EOS token for templates that write {{ bos_token }}; '' if none."""
    token = llama_cpp.llama_vocab_bos(vocab) if which == "bos" else llama_cpp.llama_vocab_eos(vocab)
    if token < 0:
        return ""
    text = llama_cpp.llama_vocab_get_text(vocab, token)
    return text.decode("utf-8", "replace") if text else ""


def _open_mtmd(
    config: ModelPolicy, model: llama_cpp.llama_model_p, threads: int, use_gpu: bool
) -> mtmd_cpp.mtmd_context_p:
    """Create the mtmd context ourselves: no warm-up, bounded image tokens, secret marker."""
    assert config.mmproj is not None
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
    with capture_native_errors() as errors:
        path = str(config.mmproj).encode()
        mctx: mtmd_cpp.mtmd_context_p | None = mtmd_cpp.mtmd_init_from_file(path, model, params)
    if mctx is None:
        raise _mtmd_load_error(config, errors)
    if not mtmd_cpp.mtmd_support_vision(mctx):
        mtmd_cpp.mtmd_free(mctx)
        raise ModelLoadError(
            f"the projector {config.mmproj} has no vision encoder",
            hint="use the vision mmproj file published with this model",
        )
    return mctx


def _mtmd_load_error(config: ModelPolicy, errors: list[str]) -> ModelLoadError:
    """Explain a failed projector load; a width mismatch means the wrong mmproj for this model."""
    text = " ".join(errors)
    dims = re.search(r"text model \(n_embd = (\d+)\) and mmproj \(n_embd = (\d+)\)", text)
    if dims:
        return ModelLoadError(
            f"the projector {config.mmproj} does not match the model {config.path} "
            f"(dimension mismatch: model n_embd {dims[1]}, projector n_embd {dims[2]})",
            hint="use the mmproj file published together with this exact model",
        )
    reason = "; ".join(e.removeprefix("mtmd_init_from_file: error: ") for e in errors[-3:])
    return ModelLoadError(
        f"llama.cpp could not load the projector {config.mmproj}: {reason or 'unknown error'}",
        hint="check that the mmproj file is complete (compare its SHA-256) and is this model's",
    )
