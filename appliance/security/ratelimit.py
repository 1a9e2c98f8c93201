"""Per-client request rate, concurrency and token cost, so one branch tool cannot starve the others."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.config.policy import Client
from appliance.errors import PayloadTooLarge, TooManyRequests


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
        if client.max_concurrent is not None and self._active.get(client.name, 0) >= client.max_concurrent:
            raise TooManyRequests(
                f"client already has {client.max_concurrent} requests in flight", retry_after=1
            )
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
            raise TooManyRequests(
                f"rate limit of {client.rate} exceeded", retry_after=max(1, math.ceil(wait))
            )
        bucket.tokens -= 1

    def in_flight(self, name: str) -> int:
        return self._active.get(name, 0)


class TokenBudgets:
    """Per-client cost (`token_budget`): prompt, image and max_tokens tokens per period, refilled
    continuously, so a few costly requests weigh what many cheap ones do. Unused answer tokens return."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def _bucket(self, client: Client) -> _Bucket | None:
        rate = client.token_budget
        if rate is None:
            return None
        now = self._clock()
        bucket = self._buckets.setdefault(client.name, _Bucket(float(rate.count), now))
        bucket.tokens = min(rate.count, bucket.tokens + (now - bucket.stamp) * rate.count / rate.seconds)
        bucket.stamp = now
        return bucket

    def check(self, client: Client | None, at_least: int = 0, max_tokens: int = 0) -> None:
        """Refuse before the costly work: 429 while the budget cannot pay the request's fewest possible
        tokens (`at_least` prompt tokens, known before decoding, + max_tokens; at least one), 413 if the
        whole budget cannot."""
        bucket = self._bucket(client) if client is not None else None
        if bucket is None or client is None:
            return
        cost = max(1, at_least + max_tokens)
        if cost > 1:
            self._too_large(client, cost, f"at least {at_least}", max_tokens)
        if bucket.tokens < cost:
            why = "its budget is spent" if cost == 1 else f"this request costs at least {cost}"
            self._refuse(client, bucket, cost, why)

    def charge(self, client: Client | None, prompt_tokens: int, max_tokens: int) -> None:
        """Take a request's cost, or refuse: 413 if it exceeds the whole budget, else 429."""
        bucket = self._bucket(client) if client is not None else None
        if bucket is None or client is None:
            return
        cost = prompt_tokens + max_tokens
        self._too_large(client, cost, str(prompt_tokens), max_tokens)
        if bucket.tokens < cost:
            self._refuse(client, bucket, cost, f"this request costs {cost}")
        bucket.tokens -= cost

    def spend(self, client: Client | None, tokens: int) -> None:
        """Take the cost of work done for a request that was refused after it (decoding, tokenizing):
        never refused, the budget may go below zero, and the client waits until it refills."""
        bucket = self._bucket(client) if client is not None else None
        if bucket is not None and tokens > 0:
            bucket.tokens -= tokens

    def refund(self, client: Client | None, tokens: int) -> None:
        """Give back answer tokens a request reserved (max_tokens) but did not generate."""
        bucket = self._bucket(client) if client is not None else None
        if bucket is not None and client is not None and client.token_budget is not None and tokens > 0:
            bucket.tokens = min(client.token_budget.count, bucket.tokens + tokens)

    @staticmethod
    def _too_large(client: Client, cost: int, prompt: str, max_tokens: int) -> None:
        budget = client.token_budget
        if budget is not None and cost > budget.count:
            raise PayloadTooLarge(
                f"request costs {cost} tokens (prompt and images {prompt} + max_tokens "
                f"{max_tokens}); this client's token_budget is {budget}"
            )

    @staticmethod
    def _refuse(client: Client, bucket: _Bucket, cost: int, why: str) -> None:
        rate = client.token_budget
        assert rate is not None
        wait = (cost - bucket.tokens) * rate.seconds / rate.count
        raise TooManyRequests(
            f"token budget of {rate} tokens exceeded ({why}; {max(int(bucket.tokens), 0)} left)",
            retry_after=max(1, math.ceil(wait)),
        )
