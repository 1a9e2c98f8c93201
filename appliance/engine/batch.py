"""The batch engine: `parallel` slots of one llama.cpp context, advanced together one batch per step.

The engine package is the only code that imports llama_cpp. It talks to llama.cpp and libmtmd directly
instead of through `Llama.create_chat_completion` / `MTMDChatHandler`, because those fetch image URLs, let
user text become control tokens, and log prompts to stderr.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Sequence

from appliance.config.policy import ModelPolicy
from appliance.engine import loader
from appliance.engine.bindings import llama_cpp, mtmd_cpp
from appliance.engine.output import token_piece
from appliance.engine.prompt import Key, Prompt, PromptBuilder, item_key
from appliance.engine.slots import Generation, Slot, Span
from appliance.engine.template import ChatTemplate
from appliance.engine.types import Completion, FinishReason, Message, ModelInfo, SamplingParams

log = logging.getLogger("appliance.engine.batch")


class Engine:
    """One loaded model with `parallel` slots; not thread-safe: one worker thread calls everything.

    Requests are admitted into free slots (sequence ids) and advanced together by `step()`: each
    step evaluates at most one image, then decodes one llama_batch holding the next token of every
    generating sequence plus prompt tokens of admitted ones (oldest first, up to n_batch).
    """

    info: ModelInfo

    def __init__(
        self,
        model: llama_cpp.llama_model_p,
        ctx: llama_cpp.llama_context_p,
        mctx: mtmd_cpp.mtmd_context_p | None,
        template: ChatTemplate,
        info: ModelInfo,
        prompt_cache: bool = True,
    ) -> None:
        self._model: llama_cpp.llama_model_p | None = model
        self._ctx: llama_cpp.llama_context_p | None = ctx
        self._mctx = mctx
        self.info = info
        self._prompt_cache = prompt_cache
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._n_batch = int(llama_cpp.llama_n_batch(ctx))
        self._builder = PromptBuilder(template, self._vocab, mctx, info)
        self._slots = [Slot(i) for i in range(info.parallel)]
        self._active: list[Generation] = []  # in admission order: prompts are served oldest first
        self._finished: list[Generation] = []  # ended since the last step() returned
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
    def load(cls, config: ModelPolicy) -> Engine:
        """Check the files, load model and projector, and validate the chat template (see loader)."""
        parts = loader.load(config)
        return cls(
            parts.model, parts.ctx, parts.mctx, parts.template, parts.info, prompt_cache=config.prompt_cache
        )

    # admit --------------------------------------------------------------------------------------

    def prepare(self, messages: Sequence[Message], params: SamplingParams) -> Prompt:
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
            return self._builder.build(messages, params)
        finally:
            with self._prepare_lock:
                self._preparing -= 1
                self._prepare_lock.notify_all()

    def admit(
        self,
        messages: Sequence[Message],
        params: SamplingParams,
        cancelled: Callable[[], bool],
        on_piece: Callable[[str], None],
        owner: str = "",
        prepared: Prompt | None = None,
    ) -> Generation:
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
        prompt = prepared if prepared is not None else self._builder.build(messages, params)
        try:
            keys = [item_key(i) for i in prompt.items]
            slot = max(free, key=lambda s: (self._reusable(s, keys, owner, prompt), -s.last_used))
            keep = self._trim(slot, self._reusable(slot, keys, owner, prompt))
        except BaseException:
            prompt.close()
            raise
        self._clock += 1
        slot.busy, slot.owner, slot.last_used = True, owner, self._clock
        slot.n_shared = prompt.n_shared
        seq = Generation(slot, prompt, params, cancelled, on_piece, keep)
        self._active.append(seq)
        return seq

    def _reusable(self, slot: Slot, keys: list[Key], owner: str, prompt: Prompt) -> int:
        return slot.common(keys, owner, prompt.n_shared) if self._prompt_cache else 0

    def _trim(self, slot: Slot, keep: int) -> int:
        """Drop the slot's KV memory after its first `keep` items; returns how many were kept."""
        pos = slot.ends[keep - 1] if keep else 0
        if not llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, pos, -1):
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)  # whole: never fails
            keep = 0
        del slot.keys[keep:], slot.ends[keep:]
        return keep

    # step ---------------------------------------------------------------------------------------

    def step(self) -> list[Generation]:
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

    def _eval_image(self, seq: Generation) -> None:
        """Encode one image and decode its embeddings into the sequence (others wait meanwhile)."""
        item = seq.next_image()
        assert item is not None and self._mctx is not None
        new_past = llama_cpp.llama_pos(0)
        rc = mtmd_cpp.mtmd_helper_eval_chunk_single(
            self._mctx,
            self._ctx,
            item.chunk,
            seq.n_past,
            seq.slot.seq_id,
            self._n_batch,
            False,
            ctypes.byref(new_past),
        )
        if rc != 0:
            self._fail(seq, RuntimeError(f"evaluating an image failed (mtmd error {rc})"))
            return
        seq.slot.keys.append(item.key)
        seq.slot.ends.append(new_past.value)
        seq.n_past = new_past.value
        seq.cursor += 1

    def _fill_batch(self) -> list[Span]:
        """One token per generating sequence, then prompt tokens, oldest request first."""
        spans: list[Span] = []
        rows = 0
        for seq in self._active:
            if seq.next_token is not None:
                spans.append(Span(seq, [seq.next_token], seq.n_past, rows, prompt=False))
                seq.next_token = None
                rows += 1
        for seq in self._active:
            run = seq.text_run(self._n_batch - rows) if rows < self._n_batch else []
            if not run:
                continue
            last = seq.cursor + len(run) == len(seq.prompt.items)
            rows += len(run)
            spans.append(Span(seq, run, seq.n_past, rows - 1 if last else -1, prompt=True))
        return spans

    def _decode_spans(self, spans: list[Span]) -> None:
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

    def _sample(self, seq: Generation, row: int) -> None:
        """Sample the next token from batch row `row`; stream it, or end the request."""
        token = llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, row)
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(seq, "stop")
            return
        seq.n_gen += 1
        if seq.out.feed(token_piece(self._vocab, token)):
            self._finish(seq, "stop", flush=False)  # the stop string itself is never emitted
        elif seq.n_gen >= seq.params.max_tokens:
            self._finish(seq, "length")
        else:
            seq.next_token = token

    def _finish(self, seq: Generation, reason: FinishReason, flush: bool = True) -> None:
        if flush:
            seq.out.finish()
        seq.usage.completion_tokens = seq.n_gen
        seq.completion = Completion("".join(seq.out.parts), reason, seq.usage)
        self._release(seq)

    def _fail(self, seq: Generation, error: BaseException) -> None:
        """End a request with an error; its slot's memory is wiped, since its state is unknown."""
        seq.error = error
        llama_cpp.llama_memory_seq_rm(self._mem, seq.slot.seq_id, -1, -1)
        seq.slot.forget()
        self._release(seq)

    def _release(self, seq: Generation) -> None:
        if seq.sampler is not None:
            llama_cpp.llama_sampler_free(seq.sampler)
            seq.sampler = None
        seq.prompt.close()
        seq.slot.busy = False
        if seq in self._active:
            self._active.remove(seq)
            self._finished.append(seq)

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
