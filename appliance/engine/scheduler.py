"""The bounded queue in front of the engine: up to `parallel` generations decoded together, FIFO beyond.

llama.cpp contexts are not thread-safe, so one worker thread owns the engine: it admits waiting jobs into
free slots and advances all admitted ones with one batched decode per step. Jobs waiting for a slot beyond
`[limits] max_queue` are refused with 503 and a Retry-After estimate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from appliance.engine.job import Job, Prepared
from appliance.engine.types import Completion, Message, SamplingParams
from appliance.errors import ServiceUnavailable

# The engine's front door for the web layer (tests/test_imports.py): the queue and the jobs it hands out.

log = logging.getLogger("appliance.engine.scheduler")

# After each llama_decode the engine thread needs the GIL back for microseconds of bookkeeping. While the
# event loop is busy (many streams, a flood of refused requests) CPython makes it wait up to a switch interval
# for it: 5 ms by default, measured to cut decoding to 28% of its speed beside one busy Python thread; 0.5 ms
# keeps 78%. The cost is more frequent GIL hand-offs on the event loop side, which does short tasks anyway.
GIL_SWITCH_INTERVAL_S = 0.0005


class Running(Protocol):
    """An admitted generation as the engine reports it: ended once either field is set."""

    @property
    def completion(self) -> Completion | None: ...

    @property
    def error(self) -> BaseException | None: ...


class BatchEngine(Protocol):
    """What the scheduler needs of an engine (the real one, in tests too)."""

    @property
    def parallel(self) -> int: ...

    @property
    def free_slots(self) -> int: ...

    def prepare(self, messages: Sequence[Message], params: SamplingParams) -> Any: ...

    def admit(
        self,
        messages: Sequence[Message],
        params: SamplingParams,
        cancelled: Callable[[], bool],
        on_piece: Callable[[str], None],
        owner: str = "",
        prepared: Any = None,
    ) -> Running: ...

    def step(self) -> Sequence[Running]: ...


class _Outbox:
    """What one engine step produced for the event loops, handed over in one wake-up per loop."""

    def __init__(self) -> None:
        self.items: list[tuple[Job, Callable[[], None]]] = []

    def add(self, job: Job, action: Callable[[], None]) -> None:
        self.items.append((job, action))

    def flush(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}
        for job, action in self.items:
            assert job._loop is not None
            by_loop.setdefault(job._loop, []).append(action)
        self.items = []
        for loop, actions in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop already closed: nobody is listening
                loop.call_soon_threadsafe(_run_all, actions)


def _run_all(actions: list[Callable[[], None]]) -> None:
    for action in actions:
        action()


class Scheduler:
    """FIFO admission into the engine's slots; one worker thread runs every engine call."""

    def __init__(
        self, engine: BatchEngine, max_queue: int, on_done: Callable[[Job, Completion], None] | None = None
    ) -> None:
        self._engine = engine
        self._on_done = on_done
        self.max_queue = max_queue
        self.parallel = engine.parallel
        self._cond = threading.Condition()
        self._inbox: deque[Job] = deque()
        self._running: dict[int, tuple[Running, Job]] = {}
        self._closing = False
        self._thread: threading.Thread | None = None
        self._outbox = _Outbox()
        self._step_started = 0.0
        self._avg_seconds = 1.0
        self.admitted = 0  # jobs handed to the engine
        self.withdrawn = 0  # jobs cancelled while queued: they never reached the engine
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)

    # the request side (event loop) -------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Jobs submitted but not yet in a slot (a cancelled one no longer counts)."""
        with self._cond:
            return sum(not job.cancel_event.is_set() for job in self._inbox)

    def prepare(self, messages: tuple[Message, ...], params: SamplingParams) -> Prepared:
        """Tokenize a request in the calling thread (never the engine's); pass the result to submit."""
        prepared: Prepared = self._engine.prepare(messages, params)
        return prepared

    @property
    def running(self) -> int:
        """Jobs in a slot, being decoded."""
        return len(self._running)

    @property
    def busy(self) -> bool:
        return bool(self._running)

    @property
    def busy_since(self) -> float:
        """When the current engine step began (progress stamp for the watchdog)."""
        return self._step_started

    def submit(
        self,
        messages: tuple[Message, ...],
        params: SamplingParams,
        tag: str = "-",
        owner: str = "",
        stream: bool = True,
        prepared: Prepared | None = None,
    ) -> Job:
        """Admit a job or refuse with 503 when the queue is full; the job starts when a slot is free.

        With stream=False the pieces are not passed to the event loop one by one (only the completion),
        which spares it a wake-up per token of every non-streaming request.
        """
        if self.waiting >= self.max_queue:
            retry = max(1, math.ceil(self._avg_seconds * (self.waiting + 1) / self.parallel))
            raise ServiceUnavailable(
                f"the appliance is busy ({self.waiting} requests waiting); try again later", retry_after=retry
            )
        loop = asyncio.get_running_loop()
        job = Job(
            messages, params, tag, owner=owner, stream=stream, prepared=prepared, _wake=self._wake, _loop=loop
        )
        job._done = loop.create_future()
        with self._cond:
            if self._closing:
                raise ServiceUnavailable("the appliance is shutting down", retry_after=5)
            self._inbox.append(job)
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="engine", daemon=True)
                self._thread.start()
        return job

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def healthy(self, stall_s: float = 900.0) -> bool:
        """False when one engine step has run implausibly long (a wedged GPU or driver): stop the watchdog."""
        return not self.busy or time.monotonic() - self._step_started < stall_s

    async def drain(self) -> None:
        """Wait until no job is waiting or running."""
        while self._inbox or self._running:
            await asyncio.sleep(0.05)

    def close(self) -> None:
        """Cancel what is left and stop the worker thread (before the engine is closed)."""
        with self._cond:
            self._closing = True
            for job in self._inbox:
                job.cancel()
            for _, job in self._running.values():
                job.cancel()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    # the worker thread -------------------------------------------------------------------------

    def _work(self) -> None:
        while (new := self._take()) is not None:
            for job in new:
                self._admit(job)
            if self._running:
                self._step()
            self._outbox.flush()

    def _take(self) -> list[Job] | None:
        """Block while idle; then the waiting jobs that fit into free slots (None: shut down)."""
        with self._cond:
            while not self._inbox and not self._running and not self._closing:
                self._cond.wait()
            if self._closing and not self._running:
                new = list(self._inbox)  # each finishes as cancelled at admission
                self._inbox.clear()
                for job in new:
                    self._admit(job)
                self._outbox.flush()
                return None
            self._withdraw_cancelled()
            free = self._engine.free_slots
            return [self._inbox.popleft() for _ in range(min(free, len(self._inbox)))]

    def _withdraw_cancelled(self) -> None:
        """Jobs whose client left while they waited leave the queue now, unrun (caller holds _cond)."""
        if not any(job.cancel_event.is_set() for job in self._inbox):
            return
        keep: deque[Job] = deque()
        for job in self._inbox:
            if job.cancel_event.is_set():
                self.withdrawn += 1
                job.queue_ms = (time.monotonic() - job.submitted_at) * 1000
                self._close_prepared(job)
                self._settle(job, Completion(text="", finish_reason="cancelled"), None, timed=False)
            else:
                keep.append(job)
        self._inbox = keep

    @staticmethod
    def _close_prepared(job: Job) -> None:
        if job.prepared is not None:
            job.prepared.close()
            job.prepared = None

    def _admit(self, job: Job) -> None:
        """Put a job into a slot, or end it at once (cancelled while waiting, or refused input)."""
        job.started_at = time.monotonic()
        job.queue_ms = (job.started_at - job.submitted_at) * 1000
        if job.cancel_event.is_set():
            self.withdrawn += 1
            self._close_prepared(job)
            self._settle(job, Completion(text="", finish_reason="cancelled"), None, timed=False)
            return
        prepared, job.prepared = job.prepared, None  # the engine owns it from here, even on failure
        job.admitted = True
        self.admitted += 1
        try:
            seq = self._engine.admit(
                job.messages, job.params, job.cancel_event.is_set, self._piece_sink(job), job.owner, prepared
            )
        except Exception as exc:  # BadRequest and the like: the client sees its JSON error
            self._settle(job, None, exc)
            return
        self._running[id(seq)] = (seq, job)

    def _piece_sink(self, job: Job) -> Callable[[str], None]:
        def on_piece(text: str) -> None:
            if job.first_piece_at is None:
                job.first_piece_at = time.monotonic()
            if job.stream:
                self._outbox.add(job, lambda: job._pieces.put_nowait(text))

        return on_piece

    def _step(self) -> None:
        """One engine step; a failure of the step itself ends every running job with it."""
        self._step_started = time.monotonic()
        try:
            ended = self._engine.step()
        except Exception as exc:
            log.exception("engine step failed; ending %d running requests", len(self._running))
            for _, job in self._running.values():
                self._settle(job, None, exc)
            self._running.clear()
            return
        for seq in ended:
            entry = self._running.pop(id(seq), None)
            if entry is not None:
                self._settle(entry[1], seq.completion, seq.error)

    def _settle(
        self, job: Job, completion: Completion | None, error: BaseException | None, timed: bool = True
    ) -> None:
        """Queue the job's end for its event loop, after every piece it streamed."""
        ran = time.monotonic() - (job.started_at or job.submitted_at)
        if timed:  # a job that never ran says nothing about how long jobs take (Retry-After)
            self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * ran
        self._outbox.add(job, lambda: self._finish(job, completion, error, ran))

    def _finish(self, job: Job, c: Completion | None, error: BaseException | None, ran: float) -> None:
        """On the event loop: log, report, and resolve the job's future."""
        assert job._done is not None
        job._pieces.put_nowait(None)
        if job._done.done():
            return
        if c is None:
            job._done.set_exception(error or RuntimeError("generation ended without a result"))
            return
        u = c.usage
        log.info(
            "request %s: %s after %d+%d tokens (%d image, %d cached), queued %.0f ms, ran %.0f ms",
            job.tag,
            c.finish_reason,
            u.prompt_tokens,
            u.completion_tokens,
            u.image_tokens,
            u.cached_tokens,
            job.queue_ms,
            ran * 1000,
        )
        if self._on_done is not None:
            self._on_done(job, c)
        job._done.set_result(c)
