"""Prompt assembly: rendered segments become tokens (text) or libmtmd chunks (images), checked for room.

Template text is tokenized with special tokens parsed and user text without, so a user can never type a
control token or a media marker; images reach libmtmd as raw RGB rows, never as the client's file.
"""

from __future__ import annotations

import ctypes
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from appliance.engine.bindings import llama_cpp, mtmd_cpp
from appliance.engine.template import ChatTemplate, Segment
from appliance.engine.types import Message, ModelInfo, RGBImage, SamplingParams
from appliance.errors import BadRequest, ContextOverflow


@dataclass(frozen=True)
class ImageItem:
    """One image chunk of a prompt: libmtmd evaluates it on its own, then it is KV like text."""

    chunk: Any  # mtmd_input_chunk_p, owned by the prompt's chunk list
    key: str  # "img:<digest>": the prompt cache matches images by content
    n_tokens: int  # KV cells it fills
    n_pos: int  # positions it advances (M-RoPE: fewer than tokens)


Item = int | ImageItem  # a text token id, or an image
Key = int | str


def item_key(item: Item) -> Key:
    """What the prompt cache compares: the token id, or the image's content key."""
    return item if isinstance(item, int) else item.key


class Prompt(Protocol):
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


def _shared_tokens(vocab: llama_cpp.llama_vocab_p, segments: list[Segment]) -> list[int]:
    """Tokens of the leading template and system segments, the part any client may reuse."""
    tokens: list[int] = []
    for seg in segments:
        if not seg.shared or seg.kind == "image":
            break
        tokens += _tokenize(vocab, seg.text, seg.kind == "template")
    return tokens


class TextPrompt:
    """Text-only prompt for models without a projector: plain token ids."""

    n_image_tokens = 0

    def __init__(self, vocab: llama_cpp.llama_vocab_p, segments: list[Segment]) -> None:
        self.items: list[Item] = []
        for seg in segments:
            self.items += _tokenize(vocab, seg.text, seg.kind == "template")
        self.n_tokens = len(self.items)
        self.n_shared = len(_shared_tokens(vocab, segments))

    def close(self) -> None:
        pass


class MtmdPrompt:
    """Prompt tokenized by libmtmd from parts: text chunks and preprocessed image chunks."""

    def __init__(
        self, vocab: llama_cpp.llama_vocab_p, mctx: mtmd_cpp.mtmd_context_p, segments: list[Segment]
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

    def _tokenize(self, segments: list[Segment]) -> None:
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
            self.items.append(
                ImageItem(
                    chunk,
                    "img:" + (chunk_id or secrets.token_hex(16)),
                    n,
                    mtmd_cpp.mtmd_input_chunk_get_n_pos(chunk),
                )
            )
        if not self.items or not isinstance(self.items[-1], int):  # sampling needs final text logits
            raise BadRequest("the chat template must end the prompt with text")

    def close(self) -> None:
        if self._chunks is not None:
            mtmd_cpp.mtmd_input_chunks_free(self._chunks)
            self._chunks = None
        while self._bitmaps:
            mtmd_cpp.mtmd_bitmap_free(self._bitmaps.pop())


def image_tokens(
    vocab: llama_cpp.llama_vocab_p, mctx: mtmd_cpp.mtmd_context_p, width: int, height: int
) -> int:
    """Tokens libmtmd makes of a blank image of this size (a probe at load time)."""
    probe = RGBImage(width, height, bytes(width * height * 3), 0, "PNG")
    prompt = MtmdPrompt(vocab, mctx, [Segment("image", image=probe), Segment("template", "u")])
    try:
        return prompt.n_image_tokens
    finally:
        prompt.close()


def _image_digest(image: RGBImage) -> str:
    """Identity of an image's content: the encoded file's digest, else one over the pixels."""
    if image.source_sha256:
        return f"{image.source_sha256}:{image.width}x{image.height}"
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.rgb)
    return digest.hexdigest()


@dataclass(frozen=True)
class PromptBuilder:
    """Renders and tokenizes requests before they take a slot: it reads only the template, the vocabulary
    and the projector (as llama-server's HTTP threads do), so any thread may call it while the engine runs."""

    template: ChatTemplate
    vocab: llama_cpp.llama_vocab_p
    mctx: mtmd_cpp.mtmd_context_p | None
    info: ModelInfo

    def build(self, messages: Sequence[Message], params: SamplingParams) -> Prompt:
        """The tokenized prompt, or BadRequest for what the client must change; the caller owns it."""
        if self.mctx is None and any(m.images for m in messages):
            raise BadRequest("this model has no vision projector (mmproj); send text only")
        segments = self.template.segments(messages)
        self._check_text_bound(segments, params.max_tokens)
        prompt = self._tokenize(segments)
        try:
            if prompt.n_tokens == 0:
                raise BadRequest("the prompt is empty")
            self._check_room(prompt.n_tokens, params.max_tokens)
        except BaseException:
            prompt.close()
            raise
        return prompt

    def _check_text_bound(self, segments: list[Segment], max_tokens: int) -> None:
        """Refuse, before tokenizing, text whose fewest possible tokens already overflow the context.

        No token covers more than `max_token_bytes` bytes of text, so bytes / that is a lower bound.
        """
        n_ctx = self.info.n_ctx
        n_bytes = sum(len(seg.text.encode("utf-8", "surrogatepass")) for seg in segments)
        at_least = -(-n_bytes // self.info.max_token_bytes) if self.info.max_token_bytes else 0
        room = n_ctx - max_tokens
        if at_least > room:
            raise BadRequest(
                f"prompt is at least {at_least} tokens ({n_bytes} bytes of text); the context holds "
                f"{max(room, 0)} ({n_ctx} minus max_tokens {max_tokens})"
            )

    def _tokenize(self, segments: list[Segment]) -> Prompt:
        """Tokenize with libmtmd when a projector is loaded, else with the model's vocabulary."""
        if self.mctx is not None:
            return MtmdPrompt(self.vocab, self.mctx, segments)
        return TextPrompt(self.vocab, segments)

    def _check_room(self, n_prompt: int, max_tokens: int) -> None:
        """Refuse before any work a prompt that, with max_tokens, would overflow its sequence."""
        n_ctx = self.info.n_ctx
        room = n_ctx - max_tokens
        if n_prompt > room:
            raise ContextOverflow(
                f"prompt is {n_prompt} tokens; the context holds {max(room, 0)} "
                f"({n_ctx} minus max_tokens {max_tokens})",
                tokens=n_prompt,
            )
