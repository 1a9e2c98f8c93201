"""Per-client request rate and concurrency, so one branch tool cannot starve the others."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import TooManyRequests
from .policy import Client


@dataclass
class _Bucket:
    """Token bucket: `capacity` requests per `period` seconds, refilled continuously."""

    tokens: float
    stamp: float


class ClientLimits:
    """Admission by client name; state survives policy reloads for clients that keep their name."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._active: dict[str, int] = {}

    def acquire(self, client: Client) -> Callable[[], None]:
        """Admit one request or raise 429; the returned callable releases its concurrency slot."""
        if client.max_concurrent is not None and \
                self._active.get(client.name, 0) >= client.max_concurrent:
            raise TooManyRequests(f"client already has {client.max_concurrent} requests in flight",
                                  retry_after=1)
        self._take(client)
        self._active[client.name] = self._active.get(client.name, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._active[client.name] -= 1

        return release

    def _take(self, client: Client) -> None:
        if client.rate is None:
            return
        capacity, period = client.rate.count, client.rate.seconds
        now = self._clock()
        bucket = self._buckets.setdefault(client.name, _Bucket(float(capacity), now))
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.stamp) * capacity / period)
        bucket.stamp = now
        if bucket.tokens < 1:
            wait = (1 - bucket.tokens) * period / capacity
            raise TooManyRequests(f"rate limit of {client.rate} exceeded",
                                  retry_after=max(1, math.ceil(wait)))
        bucket.tokens -= 1

    def in_flight(self, name: str) -> int:
        return self._active.get(name, 0)
