"""The audit cost of refusals, bounded per source address: the first N a second are recorded one by one,
the rest are counted and summarised in one record per source and second, so nothing is dropped silently.

A tokenless client can be refused as fast as it can send; without a bound each refusal is an fsynced record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.audit.log import AuditUnavailable
from appliance.audit.record import Trail
from appliance.web.metrics import Metrics

log = logging.getLogger("appliance.audit.refusals")

WINDOW_S = 1.0
GLOBAL_FACTOR = 10  # all sources together: at most this many times the per-source budget a second
MAX_SOURCES = 256  # sources tracked per second; beyond, they share one bucket (summaries stay bounded)
OVERFLOW = "other sources"


@dataclass
class _Window:
    started: float
    written: int = 0
    suppressed: int = 0
    flush_pending: bool = False


class RefusalAudit:
    """Decides per refusal whether it gets its own record; schedules the summary of the rest."""

    def __init__(self, trail: Trail, per_second: Callable[[], int]) -> None:
        self.trail = trail
        self.per_second = per_second
        self._sources: dict[str, _Window] = {}
        self._global = _Window(0.0)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def metrics(self) -> Metrics | None:
        return self.trail.metrics

    def admit(self, ip: str) -> bool:
        """True: write this refusal's own record. False: it was counted for the summary instead."""
        now = time.monotonic()
        budget = max(1, self.per_second())
        key, window = self._window(ip, now)
        if now - self._global.started >= WINDOW_S:
            self._global = _Window(now)
        if window.written < budget and self._global.written < budget * GLOBAL_FACTOR:
            window.written += 1
            self._global.written += 1
            return True
        window.suppressed += 1
        if self.metrics is not None:
            self.metrics.refusal_records_suppressed.inc()
        if not window.flush_pending:
            window.flush_pending = True
            self._schedule(key, window, now)
        return False

    def _window(self, ip: str, now: float) -> tuple[str, _Window]:
        key = ip if ip in self._sources or len(self._sources) < MAX_SOURCES else self._prune(ip, now)
        window = self._sources.get(key)
        if window is None or (now - window.started >= WINDOW_S and not window.flush_pending):
            window = self._sources[key] = _Window(now)
        return key, window

    def _prune(self, ip: str, now: float) -> str:
        """Forget sources whose window has passed with nothing pending; if none can go, share a bucket."""
        for key in [
            k for k, w in self._sources.items() if now - w.started >= WINDOW_S and not w.flush_pending
        ]:
            del self._sources[key]
        return ip if len(self._sources) < MAX_SOURCES else OVERFLOW

    def _schedule(self, key: str, window: _Window, now: float) -> None:
        loop = asyncio.get_running_loop()
        delay = max(0.0, window.started + WINDOW_S - now)
        loop.call_later(delay, self._spawn, key, window)

    def _spawn(self, key: str, window: _Window) -> None:
        if not window.flush_pending:
            return  # already written by flush()
        task = asyncio.get_running_loop().create_task(self._summarise(key, window))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _summarise(self, key: str, window: _Window) -> None:
        """One record for every refusal of this window that had none of its own."""
        count, window.suppressed = window.suppressed, 0
        window.flush_pending = False
        if self._sources.get(key) is window:
            del self._sources[key]  # the next refusal opens a fresh window
        message = f"{count} refusals from {key} suppressed"
        log.warning("audit: %s (over %d records a second)", message, max(1, self.per_second()))
        try:
            await self.trail.write(
                "request.refusals_suppressed",
                source_ip=None if key == OVERFLOW else key,
                reason=message,
                suppressed=count,
                window_s=WINDOW_S,
            )
        except AuditUnavailable as exc:
            log.error(
                "audit: the summary of %d suppressed refusals from %s was not written: %s", count, key, exc
            )

    async def flush(self) -> None:
        """Write every pending summary now and wait for those under way (shutdown)."""
        for key, window in list(self._sources.items()):
            if window.flush_pending:
                await self._summarise(key, window)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
