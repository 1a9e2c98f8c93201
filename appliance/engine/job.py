"""One request's generation as the scheduler hands it out (Job), and the prepared prompt it carries;
apart from scheduler.py so the queue's worker-thread code and the event-loop side of a job read separately."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from appliance.engine.types import Completion, Message, SamplingParams


class Prepared(Protocol):
    """A tokenized prompt made before admission (off the engine thread); freed with close()."""

    @property
    def n_tokens(self) -> int: ...

    @property
    def n_image_tokens(self) -> int: ...

    def close(self) -> None: ...


@dataclass
class Job:
    """One request's generation: stream pieces as they come, or await the whole completion."""

    messages: tuple[Message, ...]
    params: SamplingParams
    tag: str = "-"
    owner: str = ""  # the client: a slot's cached prompt beyond the system part is reused only by it
    stream: bool = True  # False: nobody reads pieces(), so they are not handed to the event loop
    submitted_at: float = field(default_factory=time.monotonic)
    first_piece_at: float | None = None
    started_at: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    queue_ms: float = 0.0
    prepared: Prepared | None = None  # tokenized before submit; the engine takes it over at admission
    admitted: bool = False  # reached the engine (a job withdrawn from the queue never does)
    _wake: Callable[[], None] | None = None  # tells the scheduler to drop a cancelled job from its queue
    _pieces: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    _done: asyncio.Future[Completion] | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def cancel(self) -> None:
        """Stop at the next token, or leave the queue unrun; safe from any task or thread, idempotent."""
        self.cancel_event.set()
        if self._wake is not None:
            self._wake()

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces in order; ends when the generation ends (check `result()` afterwards)."""
        while (piece := await self._pieces.get()) is not None:
            yield piece

    @classmethod
    def answered(
        cls, messages: tuple[Message, ...], params: SamplingParams, completion: Completion, tag: str = "-"
    ) -> Job:
        """A job that never reaches the engine (a response-cache hit): its text is one piece."""
        loop = asyncio.get_running_loop()
        job = cls(messages, params, tag, _loop=loop)
        job.first_piece_at = job.started_at = job.submitted_at
        job._done = loop.create_future()
        job._done.set_result(completion)
        if completion.text:
            job._pieces.put_nowait(completion.text)
        job._pieces.put_nowait(None)
        return job

    def on_result(self, callback: Callable[[Completion], None]) -> None:
        """Call `callback` on the event loop with the completion, if the job ends with one."""
        assert self._done is not None

        def done(future: asyncio.Future[Completion]) -> None:
            if not future.cancelled() and future.exception() is None:
                callback(future.result())

        self._done.add_done_callback(done)

    async def result(self) -> Completion:
        """The completion; a caller that is cancelled while waiting cancels the generation too."""
        assert self._done is not None
        try:
            return await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self.cancel()
            raise
