#!/usr/bin/env python3
"""Write a tiny random-weight Qwen3-VL GGUF pair (text model + vision projector) for tests.

The files load in llama.cpp like a real Qwen3-VL-Instruct conversion (arch ``qwen3vl``, projector
``qwen3vl_merger`` with one deepstack layer) but are a few MB and generate in well under a second,
so the appliance can be exercised end to end without downloading a model. Output is
byte-identical for a given seed and quant.

Usage: python tools/make_tiny_model.py OUTDIR [--seed N] [--quant q8_0|q4_0|f16|f32] [--json]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize

# The daemon looks for "random weights" here and warns loudly that this is a smoke-test model.
DESCRIPTION = "Smoke-test model with random weights: answers are gibberish; not for production use."

# Text model shape. n_layer must exceed N_DEEPSTACK: llama.cpp adds deepstack slice i after
# layer i, and with too few layers it aborts in ggml_can_repeat.
N_EMBD = 256
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2
HEAD_DIM = 64
N_FF = 512
N_CTX = 4096
ROPE_SECTIONS = [12, 10, 10, 0]  # interleaved M-RoPE (t, h, w, -); sums to HEAD_DIM / 2
ROPE_THETA = 5_000_000.0
RMS_EPS = 1e-6
CONTROL_ROW_SCALE = 0.1  # see init_tensor
N_VOCAB = 512  # multiple of 32 so token_embd rows quantize to Q8_0/Q4_0

# Vision tower shape (Qwen3-VL ViT: fused qkv, LayerNorm, GELU MLP, 2x2 spatial merge).
V_EMBD = 128
V_LAYER = 2
V_HEAD = 2
V_FF = 256
V_PATCH = 16
V_POS_SIDE = 16  # learned position grid is V_POS_SIDE^2 (must be square)
V_MERGE = 2
V_DEEPSTACK = (0,)  # vision layers feeding deepstack; len() == text n_deepstack_layers
N_DEEPSTACK = len(V_DEEPSTACK)

NAME = "tiny-qwen3vl"
QUANTS = {
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
}

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

# Text the BPE merges are learned from; fixed, so the vocabulary never changes between runs.
CORPUS = """
The quick brown fox jumps over the lazy dog. This is a small test model for the appliance, and
it has no knowledge at all: every weight is random. The image shows a red square on a white
background. What is in this picture? Describe the image in one sentence. There is a cat sitting
on the table next to the window, and the sun is shining through the glass. Please answer the
question with a short reply. Hello, how are you today? I am fine, thank you for asking. The
system prompt tells the assistant what to do and the user asks questions about images and text.
Numbers like 1, 2, 3, 10, 42 and 2024 appear in documents, tables, receipts and invoices. Read
the text in the document and return the total amount, the date and the name of the company.
"""

CHAT_TEMPLATE = """\
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content -%}
        {%- for part in content -%}
            {%- if part.type in ('image', 'image_url') or 'image' in part or 'image_url' in part -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif part.type == 'video' or 'video' in part -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in part -%}
                {{- part.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- for message in messages -%}
    {{- '<|im_start|>' + message.role + '\\n' -}}
    {{- render_content(message.content) -}}
    {{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""

Spec = tuple[str, tuple[int, ...], str]  # (tensor name, numpy shape, init kind)


def byte_symbols() -> list[str]:
    """GPT-2 byte-to-unicode table: byte value -> printable symbol used in the vocab."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def corpus_words(sym: list[str]) -> Counter[tuple[str, ...]]:
    """Pre-split CORPUS roughly like the qwen2 pre-tokenizer (leading space stays on words)."""
    pieces = re.findall(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+", CORPUS)
    return Counter(tuple(sym[b] for b in p.encode()) for p in pieces)


def merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Apply one merge to a word given as symbols."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(sym: list[str], n_new: int) -> tuple[list[str], list[str]]:
    """Greedy BPE on CORPUS until n_new new tokens exist; ties break lexically (deterministic)."""
    words = corpus_words(sym)
    merges: list[str] = []
    new_tokens: list[str] = []
    seen = set(sym)
    while len(new_tokens) < n_new:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, n in words.items():
            for a, b in itertools.pairwise(w):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(f"{best[0]} {best[1]}")
        if best[0] + best[1] not in seen:
            seen.add(best[0] + best[1])
            new_tokens.append(best[0] + best[1])
        words = Counter({merge_word(w, best): n for w, n in words.items()})
    return new_tokens, merges


@functools.cache
def build_vocab() -> tuple[list[str], list[int], list[str]]:
    """Byte tokens, learned merges, Qwen special tokens, then unused padding up to N_VOCAB."""
    sym = byte_symbols()
    learned, merges = learn_merges(sym, N_VOCAB - 256 - len(SPECIAL_TOKENS))
    tokens = [*sym, *learned, *SPECIAL_TOKENS]
    types = [TokenType.NORMAL] * (256 + len(learned)) + [TokenType.CONTROL] * len(SPECIAL_TOKENS)
    for i in range(N_VOCAB - len(tokens)):
        tokens.append(f"<|unused_{i}|>")
        types.append(TokenType.UNUSED)
    return tokens, [int(t) for t in types], merges


def text_specs() -> Iterator[Spec]:
    """Tensors llama.cpp's qwen3vl loader creates (output tied to token_embd)."""
    yield "token_embd.weight", (N_VOCAB, N_EMBD), "embd"
    yield "output_norm.weight", (N_EMBD,), "one"
    for i in range(N_LAYER):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (N_EMBD,), "one"
        yield p + "attn_q.weight", (N_HEAD * HEAD_DIM, N_EMBD), "w"
        yield p + "attn_k.weight", (N_HEAD_KV * HEAD_DIM, N_EMBD), "w"
        yield p + "attn_v.weight", (N_HEAD_KV * HEAD_DIM, N_EMBD), "w"
        yield p + "attn_output.weight", (N_EMBD, N_HEAD * HEAD_DIM), "w"
        yield p + "attn_q_norm.weight", (HEAD_DIM,), "one"
        yield p + "attn_k_norm.weight", (HEAD_DIM,), "one"
        yield p + "ffn_norm.weight", (N_EMBD,), "one"
        yield p + "ffn_gate.weight", (N_FF, N_EMBD), "w"
        yield p + "ffn_up.weight", (N_FF, N_EMBD), "w"
        yield p + "ffn_down.weight", (N_EMBD, N_FF), "w"


def linear(name: str, n_out: int, n_in: int) -> Iterator[Spec]:
    """A weight + bias pair in numpy (out, in) order."""
    yield f"{name}.weight", (n_out, n_in), "w"
    yield f"{name}.bias", (n_out,), "zero"


def norm(name: str, n: int) -> Iterator[Spec]:
    """A LayerNorm weight (ones) + bias (zeros)."""
    yield f"{name}.weight", (n,), "one"
    yield f"{name}.bias", (n,), "zero"


def vision_specs() -> Iterator[Spec]:
    """Tensors clip.cpp's qwen3vl_merger graph uses; merged width is V_EMBD * V_MERGE^2."""
    merged = V_EMBD * V_MERGE * V_MERGE
    yield "v.patch_embd.weight", (V_EMBD, 3, V_PATCH, V_PATCH), "w"  # temporal frame 0
    yield "v.patch_embd.weight.1", (V_EMBD, 3, V_PATCH, V_PATCH), "w"  # temporal frame 1
    yield "v.patch_embd.bias", (V_EMBD,), "zero"
    yield "v.position_embd.weight", (V_POS_SIDE * V_POS_SIDE, V_EMBD), "w"
    for i in range(V_LAYER):
        p = f"v.blk.{i}."
        yield from norm(p + "ln1", V_EMBD)
        yield from linear(p + "attn_qkv", 3 * V_EMBD, V_EMBD)
        yield from linear(p + "attn_out", V_EMBD, V_EMBD)
        yield from norm(p + "ln2", V_EMBD)
        yield from linear(p + "ffn_up", V_FF, V_EMBD)
        yield from linear(p + "ffn_down", V_EMBD, V_FF)
        if i in V_DEEPSTACK:
            yield from norm(f"v.deepstack.{i}.norm", merged)
            yield from linear(f"v.deepstack.{i}.fc1", merged, merged)
            yield from linear(f"v.deepstack.{i}.fc2", N_EMBD, merged)
    yield from norm("v.post_ln", V_EMBD)
    yield from linear("mm.0", merged, merged)
    yield from linear("mm.2", N_EMBD, merged)


def init_tensor(seed: int, name: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """Small normal weights seeded per (seed, name), so tensors don't depend on write order."""
    if kind == "one":
        return np.ones(shape, dtype=np.float32)
    if kind == "zero":
        return np.zeros(shape, dtype=np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    data = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(np.float32)
    if kind == "embd":
        # The output head is tied to these rows: damped control-token rows (end of turn, image pads)
        # make a random answer rarely end on token one, so smoke answers have a predictable length.
        _, types, _ = build_vocab()
        data[np.asarray(types) == int(TokenType.CONTROL)] *= np.float32(CONTROL_ROW_SCALE)
    return data


def encode(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Convert f32 data to the on-disk representation of qtype."""
    if qtype == GGMLQuantizationType.F32:
        return data
    if qtype == GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return quantize(data, qtype)


def add_tensors(
    w: GGUFWriter,
    specs: Iterator[Spec],
    seed: int,
    qtype: GGMLQuantizationType,
    keep_f32: tuple[str, ...] = (),
) -> None:
    """Add tensors; 1-D tensors (norms, biases) and names in keep_f32 stay f32 like convert does."""
    for name, shape, kind in specs:
        data = init_tensor(seed, name, shape, kind)
        t = GGMLQuantizationType.F32 if len(shape) == 1 or name in keep_f32 else qtype
        raw = t if t not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) else None
        w.add_tensor(name, encode(data, t), raw_dtype=raw)


def add_tokenizer(w: GGUFWriter) -> None:
    """Qwen-style byte-level BPE tokenizer plus the chat template."""
    tokens, types, merges = build_vocab()
    ids = {t: i for i, t in enumerate(tokens)}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(ids["<|endoftext|>"])
    w.add_eos_token_id(ids["<|im_end|>"])
    w.add_pad_token_id(ids["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def text_writer(seed: int, quant: str) -> GGUFWriter:
    """Metadata and tensors of the qwen3vl text model."""
    qtype, ftype = QUANTS[quant]
    w = GGUFWriter(None, "qwen3vl")
    w.add_name(NAME)
    w.add_description(DESCRIPTION)
    w.add_file_type(int(ftype))
    w.add_quantization_version(2)
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_rope_dimension_sections(ROPE_SECTIONS)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_num_deepstack_layers(N_DEEPSTACK)
    add_tokenizer(w)
    add_tensors(w, text_specs(), seed, qtype)
    return w


def mmproj_writer(seed: int) -> GGUFWriter:
    """Metadata and tensors of the clip / qwen3vl_merger vision projector (f16 matrices)."""
    w = GGUFWriter(None, "clip")
    w.add_name(f"{NAME}-mmproj")
    w.add_file_type(int(LlamaFileType.MOSTLY_F16))
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type("qwen3vl_merger")
    w.add_vision_use_gelu(True)
    w.add_vision_projection_dim(N_EMBD)
    w.add_vision_embedding_length(V_EMBD)
    w.add_vision_feed_forward_length(V_FF)
    w.add_vision_block_count(V_LAYER)
    w.add_vision_head_count(V_HEAD)
    w.add_vision_attention_layernorm_eps(RMS_EPS)
    w.add_vision_image_size(V_POS_SIDE * V_PATCH)
    w.add_vision_patch_size(V_PATCH)
    w.add_vision_image_mean([0.5, 0.5, 0.5])
    w.add_vision_image_std([0.5, 0.5, 0.5])
    w.add_vision_spatial_merge_size(V_MERGE)
    w.add_vision_is_deepstack_layers([i in V_DEEPSTACK for i in range(V_LAYER)])
    add_tensors(w, vision_specs(), seed, GGMLQuantizationType.F16, ("v.position_embd.weight",))
    return w


def write_atomic(w: GGUFWriter, path: Path) -> None:
    """Write to a temp file in the same directory, then rename over path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)


def make(outdir: Path, seed: int = 0, quant: str = "q8_0") -> tuple[Path, Path]:
    """Generate both files into outdir and return (model, mmproj) paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    model = outdir / f"{NAME}-{quant}.gguf"
    mmproj = outdir / f"{NAME}-mmproj.gguf"
    write_atomic(text_writer(seed, quant), model)
    write_atomic(mmproj_writer(seed), mmproj)
    return model.resolve(), mmproj.resolve()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: prints the two paths (or JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quant", choices=sorted(QUANTS), default="q8_0")
    ap.add_argument("--json", action="store_true", help='print {"model": ..., "mmproj": ...}')
    args = ap.parse_args(argv)
    model, mmproj = make(args.outdir, args.seed, args.quant)
    if args.json:
        print(json.dumps({"model": str(model), "mmproj": str(mmproj)}))
    else:
        print(model)
        print(mmproj)
    return 0


if __name__ == "__main__":
    sys.exit(main())
