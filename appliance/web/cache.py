"""The response cache: a client's repeated deterministic request is answered from memory.

Opt-in per client (`[[clients]] cache = true`), exact match on (client, model SHA-256, canonical request with
image digests), only for requests that ask for a reproducible answer (temperature 0 or a fixed seed), in
memory only, bounded in entries and age, and keyed by client so one client never sees another's answer.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import replace

from appliance.engine.types import Completion, Message, RGBImage, SamplingParams, Usage


def deterministic(params: SamplingParams) -> bool:
    """Greedy decoding or a fixed seed: the client asked for a reproducible answer."""
    return params.temperature <= 0 or params.seed is not None


def _image_id(image: RGBImage) -> dict[str, object]:
    digest = image.source_sha256 or hashlib.sha256(image.rgb).hexdigest()
    return {"image": digest, "w": image.width, "h": image.height}


def request_key(client: str, model_sha256: str, messages: Iterable[Message], params: SamplingParams) -> str:
    """SHA-256 of the canonical request; sampling knobs that cannot matter (greedy) are left out."""
    sampling: dict[str, object] = {"max_tokens": params.max_tokens, "stop": list(params.stop)}
    if params.temperature > 0:
        sampling.update(temperature=params.temperature, top_p=params.top_p, seed=params.seed)
    canonical = {
        "client": client,
        "model": model_sha256,
        "sampling": sampling,
        "messages": [
            {"role": m.role, "parts": [p if isinstance(p, str) else _image_id(p) for p in m.parts]}
            for m in messages
        ],
    }
    raw = json.dumps(canonical, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()


class ResponseCache:
    """LRU of finished completions with a TTL; thread-safe, in memory only, never written anywhere."""

    def __init__(self, entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries = entries
        self._ttl = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, str], tuple[float, Completion]] = OrderedDict()
        self.hits = self.misses = 0

    def configure(self, entries: int, ttl_s: float, clients: Iterable[str]) -> None:
        """Apply a reloaded policy: new bounds, and drop entries of clients no longer opted in."""
        keep = set(clients)
        with self._lock:
            self._entries, self._ttl = entries, ttl_s
            for k in [k for k in self._items if k[0] not in keep]:
                del self._items[k]
            self._shrink()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def get(self, client: str, key: str) -> Completion | None:
        """A fresh copy of the cached completion (usage says no tokens were generated), or None."""
        now = self._clock()
        with self._lock:
            found = self._items.get((client, key))
            if found is not None and now - found[0] > self._ttl:
                del self._items[(client, key)]
                found = None
            if found is None:
                self.misses += 1
                return None
            self._items.move_to_end((client, key))
            self.hits += 1
        c = found[1]
        return replace(
            c,
            usage=Usage(
                prompt_tokens=c.usage.prompt_tokens,
                completion_tokens=c.usage.completion_tokens,
                image_tokens=c.usage.image_tokens,
                cached_tokens=c.usage.prompt_tokens,
            ),
        )

    def put(self, client: str, key: str, completion: Completion) -> None:
        """Keep a completion that ended normally; cancelled ones are not answers."""
        if completion.finish_reason not in ("stop", "length") or self._entries <= 0:
            return
        with self._lock:
            self._items[(client, key)] = (self._clock(), completion)
            self._items.move_to_end((client, key))
            self._shrink()

    def _shrink(self) -> None:
        while len(self._items) > max(self._entries, 0):
            self._items.popitem(last=False)
