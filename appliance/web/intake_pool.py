"""The intake pool: image decoding and tokenizing for a bounded number of requests at once, fairly shared.

Intake (base64, Pillow decodes, libmtmd preprocessing, tokenizing) is a request's costly part before the
engine. It runs on this pool's own threads, never on asyncio's default pool, which it would otherwise
share with audit writes and health figures. A request holds a slot for its whole intake; one client holds
at most `workers - 1` slots (at least one), so one client never holds them all; a freed slot goes to the
waiting client holding the fewest. At most `max_waiting` requests wait: beyond it the newest waiter of the
client with the most waiting is refused (503 with Retry-After, like a full queue), never a lighter one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from appliance.errors import ServiceUnavailable

T = TypeVar("T")


def default_workers(parallel: int) -> int:
    """One intake thread per slot of the engine, but no more than the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(parallel, cpus))


@dataclass
class _Waiter:
    client: str
    granted: asyncio.Future[None]


class IntakePool:
    """Slots and threads for intake; every method runs on the event loop except the work itself."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self.per_client = max(1, self.workers - 1)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="intake")
        self._held: Counter[str] = Counter()
        self._waiters: list[_Waiter] = []
        self._avg_s = 1.0  # how long a slot is held, on average (for Retry-After)

    @property
    def busy(self) -> int:
        """Slots held now."""
        return sum(self._held.values())

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self, client: str, max_waiting: int) -> AsyncIterator[Lease]:
        """Hold a slot for the block (waiting for one if need be, or 503); run the work with lease.run."""
        await self._acquire(client, max_waiting)
        lease = Lease(self, client)
        try:
            yield lease
        finally:
            lease.end()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _free_for(self, client: str) -> bool:
        return self.busy < self.workers and self._held[client] < self.per_client

    async def _acquire(self, client: str, max_waiting: int) -> None:
        if self._free_for(client):
            self._held[client] += 1
            return
        if len(self._waiters) >= max_waiting:
            self._shed(client)
        waiter = _Waiter(client, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await waiter.granted
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.granted.done() and not waiter.granted.cancelled() and not waiter.granted.exception():
                self._release(client, 0.0)  # granted, then cancelled before it could start
            raise

    def _shed(self, client: str) -> None:
        """The wait is full: refuse the newcomer, or the newest waiter of a client with more waiting."""
        counts = Counter(w.client for w in self._waiters)
        heaviest, most = counts.most_common(1)[0] if counts else (client, 0)
        if counts[client] + 1 > most:
            raise self._busy()
        newest = next(w for w in reversed(self._waiters) if w.client == heaviest)
        self._waiters.remove(newest)
        newest.granted.set_exception(self._busy())

    def _busy(self) -> ServiceUnavailable:
        retry = max(1, math.ceil(self._avg_s * (self.waiting + 1) / self.workers))
        return ServiceUnavailable(
            f"the appliance is busy ({self.waiting} requests waiting to be read); try again later",
            retry_after=retry,
        )

    def _release(self, client: str, held_s: float) -> None:
        self._held[client] -= 1
        if held_s:
            self._avg_s = 0.8 * self._avg_s + 0.2 * held_s
        while self.busy < self.workers:
            ready = [w for w in self._waiters if self._held[w.client] < self.per_client]
            if not ready:
                return
            waiter = min(ready, key=lambda w: self._held[w.client])  # the first of the lightest client
            self._waiters.remove(waiter)
            self._held[waiter.client] += 1
            waiter.granted.set_result(None)


class Lease:
    """One request's slot: its work runs on the pool's threads; the slot is freed only once the block
    has ended and no work of it still runs (a cancelled caller does not free a busy thread's slot)."""

    def __init__(self, pool: IntakePool, client: str) -> None:
        self._pool = pool
        self._client = client
        self._started = time.monotonic()
        self._running = 0
        self._ended = self._released = False

    async def run(self, work: Callable[[], T], orphan: Callable[[T], None] | None = None) -> T:
        """`work()` on an intake thread; if the caller is cancelled meanwhile, `orphan` gets its result."""
        future = asyncio.get_running_loop().run_in_executor(self._pool._executor, work)
        self._running += 1
        future.add_done_callback(self._finished)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if orphan is not None:
                future.add_done_callback(
                    lambda f: orphan(f.result()) if not f.cancelled() and f.exception() is None else None
                )
            raise

    def end(self) -> None:
        self._ended = True
        self._maybe_release()

    def _finished(self, _: object) -> None:
        self._running -= 1
        self._maybe_release()

    def _maybe_release(self) -> None:
        if self._ended and not self._running and not self._released:
            self._released = True
            self._pool._release(self._client, time.monotonic() - self._started)
