"""What comes out of the model: the sampler chain, token bytes, and text streamed UTF-8-safe with stops.

A stop string is held back while it may still be forming and never emitted; control tokens render as nothing.
"""

from __future__ import annotations

import codecs
import ctypes
from collections.abc import Callable, Sequence

from appliance.engine.bindings import llama_cpp
from appliance.engine.types import SamplingParams

TOP_K = 40  # llama-server's default; bounds sampling cost on 150k-token vocabularies


class TextOut:
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


def make_sampler(params: SamplingParams) -> llama_cpp.llama_sampler_p:
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


def token_piece(vocab: llama_cpp.llama_vocab_p, token: int) -> bytes:
    """Bytes of one token; control tokens render as nothing so they never reach clients."""
    size = 64
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, False)
        if n >= 0:
            return buf.raw[:n]
        size = -n
    raise RuntimeError("llama_token_to_piece failed")
