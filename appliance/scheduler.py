"""The bounded queue in front of the engine: one generation at a time, FIFO, cancellable, off the loop.

llama.cpp contexts are not thread-safe, so all engine calls go through one worker thread; waiting requests
beyond `[limits] max_queue` are refused with 503 and a Retry-After estimate.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from .errors import ServiceUnavailable
from .inference import Completion, Message, SamplingParams

log = logging.getLogger("appliance.scheduler")


class Generator(Protocol):
    """What the scheduler needs of an engine (the real one, in tests too)."""

    def generate(self, messages: Sequence[Message], params: SamplingParams,
                 cancelled: Callable[[], bool], on_piece: Callable[[str], None]) -> Completion: ...


@dataclass
class Job:
    """One request's generation: stream pieces as they come, or await the whole completion."""

    messages: tuple[Message, ...]
    params: SamplingParams
    tag: str = "-"
    submitted_at: float = field(default_factory=time.monotonic)
    first_piece_at: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    queue_ms: float = 0.0
    _pieces: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    _done: asyncio.Future[Completion] | None = None

    def cancel(self) -> None:
        """Stop at the next token; safe from any task, idempotent."""
        self.cancel_event.set()

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces in order; ends when the generation ends (check `result()` afterwards)."""
        while (piece := await self._pieces.get()) is not None:
            yield piece

    async def result(self) -> Completion:
        assert self._done is not None
        return await asyncio.shield(self._done)


class Scheduler:
    """FIFO admission to a single worker thread that owns the engine."""

    def __init__(self, engine: Generator, max_queue: int,
                 on_done: Callable[[Job, Completion], None] | None = None) -> None:
        self._engine = engine
        self._on_done = on_done
        self.max_queue = max_queue
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._lock = asyncio.Lock()
        self.waiting = 0
        self.busy = False
        self.busy_since = 0.0
        self._avg_seconds = 1.0

    def submit(self, messages: tuple[Message, ...], params: SamplingParams, tag: str = "-") -> Job:
        """Admit a job or refuse with 503 when the queue is full; the job starts when its turn comes."""
        if self.waiting >= self.max_queue:
            retry = max(1, math.ceil(self._avg_seconds * (self.waiting + 1)))
            raise ServiceUnavailable(
                f"the appliance is busy ({self.waiting} requests waiting); try again later",
                retry_after=retry)
        job = Job(messages, params, tag)
        self.waiting += 1
        job._done = asyncio.get_running_loop().create_task(self._run(job))
        return job

    async def _run(self, job: Job) -> Completion:
        loop = asyncio.get_running_loop()
        queued_at = time.monotonic()
        admitted = False
        try:
            async with self._lock:
                self.waiting -= 1
                admitted = True
                job.queue_ms = (time.monotonic() - queued_at) * 1000
                if job.cancel_event.is_set():
                    return Completion(text="", finish_reason="cancelled")
                return await self._execute(loop, job)
        finally:
            if not admitted:
                self.waiting -= 1
            job._pieces.put_nowait(None)

    async def _execute(self, loop: asyncio.AbstractEventLoop, job: Job) -> Completion:
        def on_piece(text: str) -> None:
            if job.first_piece_at is None:
                job.first_piece_at = time.monotonic()
            loop.call_soon_threadsafe(job._pieces.put_nowait, text)

        started = self.busy_since = time.monotonic()
        self.busy = True
        future = loop.run_in_executor(self._pool, self._engine.generate, job.messages, job.params,
                                      job.cancel_event.is_set, on_piece)
        try:
            result = await asyncio.shield(future)
            u = result.usage
            log.info("request %s: %s after %d+%d tokens (%d image), queued %.0f ms, ran %.0f ms",
                     job.tag, result.finish_reason, u.prompt_tokens, u.completion_tokens,
                     u.image_tokens, job.queue_ms, (time.monotonic() - started) * 1000)
            if self._on_done is not None:
                self._on_done(job, result)
            return result
        except asyncio.CancelledError:
            job.cancel()  # the thread stops at its next token; keep the lock until it has
            await asyncio.wait([future])
            raise
        finally:
            self.busy = False
            self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * (time.monotonic() - started)

    def healthy(self, stall_s: float = 900.0) -> bool:
        """False when one generation has run implausibly long (a wedged GPU or driver): stop the watchdog."""
        return not self.busy or time.monotonic() - self.busy_since < stall_s

    async def drain(self) -> None:
        """Wait until the running generation (if any) has finished."""
        async with self._lock:
            pass

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
