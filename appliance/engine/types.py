"""Plain data passed between the request path and the engine.

Kept free of llama_cpp so protocol parsing and tests can use it without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Role = Literal["system", "user", "assistant"]

# llama_ftype values (llama.h) to the names people know quantizations by; shared by the engine and
# `model info` (which must not import llama_cpp).
FTYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
    39: "NVFP4", 40: "Q1_0", 41: "Q2_0",
}  # fmt: skip


@dataclass(frozen=True)
class RGBImage:
    """An image already decoded and bounded by Pillow: raw RGB888 rows, never the user's bytes."""

    width: int
    height: int
    rgb: bytes
    source_bytes: int  # size of the encoded input, for audit and metrics
    source_format: str  # "PNG" | "JPEG" | "WEBP"
    source_sha256: str = ""  # of the encoded input: audit keeps only HMAC(key, this), never the bytes


Part = str | RGBImage


@dataclass(frozen=True)
class Message:
    """One chat turn; parts keep text and images in the order the client sent them."""

    role: Role
    parts: tuple[Part, ...]

    @property
    def images(self) -> tuple[RGBImage, ...]:
        return tuple(p for p in self.parts if isinstance(p, RGBImage))


@dataclass(frozen=True)
class SamplingParams:
    """Generation settings after validation against policy limits."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, as logged at start-up and shown in /readyz and /v1/models."""

    name: str
    architecture: str
    quantization: str
    model_path: Path
    model_bytes: int
    model_sha256: str
    mmproj_path: Path | None
    mmproj_bytes: int | None
    mmproj_sha256: str | None
    supports_images: bool
    gpu_offload_supported: bool
    gpu_offload_active: bool
    n_gpu_layers: int
    n_ctx: int
    threads: int
    system_info: str
    description: str = ""  # general.description from the GGUF
    parallel: int = 1  # sequences decoded together (slots)
    max_token_bytes: int = 0  # longest token's text: bytes / this bounds a text's tokens from below
    image_max_pixels: int = 0  # pixels an image is scaled down to before encoding (0: no bound known)
    image_token_pixels: int = 0  # pixels of one image token, when tokens grow with area (0: not known)
    image_min_tokens: int = 0  # [model] image_min_tokens: the fewest tokens any image becomes


FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class Usage:
    """Token counts; prompt_tokens counts every token fed to the model, image tokens included."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tokens: int = 0
    cached_tokens: int = field(default=0, compare=False)  # prompt tokens whose KV was reused

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Completion:
    """Result of a finished generation (the streamed pieces joined)."""

    text: str
    finish_reason: FinishReason
    usage: Usage = field(default_factory=Usage)
