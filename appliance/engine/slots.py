"""Slots and the requests in them: which KV prefix each llama.cpp sequence holds, and one request's progress.

A slot remembers its items so a later prompt can reuse the prefix; another client may reuse only the shared
part (template and system text), never a user's own text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from appliance.engine.bindings import llama_cpp
from appliance.engine.output import TextOut, make_sampler
from appliance.engine.prompt import ImageItem, Key, Prompt
from appliance.engine.types import Completion, SamplingParams, Usage


@dataclass
class Slot:
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


class Generation:
    """One request in a slot: prompt items still to evaluate, its sampler, and the output so far."""

    def __init__(
        self,
        slot: Slot,
        prompt: Prompt,
        params: SamplingParams,
        cancelled: Callable[[], bool],
        on_piece: Callable[[str], None],
        start: int,
    ) -> None:
        self.slot, self.prompt, self.params, self.cancelled = slot, prompt, params, cancelled
        self.cursor = start  # next prompt item to evaluate
        self.n_past = slot.ends[start - 1] if start else 0
        self.out = TextOut(params.stop, on_piece)
        self.sampler: llama_cpp.llama_sampler_p | None = make_sampler(params)
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

    def next_image(self) -> ImageItem | None:
        item = self.prompt.items[self.cursor] if self.prompting else None
        return item if isinstance(item, ImageItem) else None

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
class Span:
    """Tokens of one sequence inside a batch; `index` is the batch row whose logits it samples."""

    seq: Generation
    tokens: list[int]
    pos: int
    index: int  # -1: no logits wanted (a prompt chunk that is not the last)
    prompt: bool
