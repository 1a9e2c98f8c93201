"""The response cache (opt-in per client) and the prompt cache, as unit and through the real daemon."""

from __future__ import annotations

import json
from typing import Any

from conftest import Daemon, DaemonFactory, add_client, data_uri, png_bytes
from helpers import by_request, records

from appliance.engine.types import Completion, Message, RGBImage, SamplingParams, Usage
from appliance.web.cache import ResponseCache, deterministic, request_key

GREEDY = SamplingParams(max_tokens=8, temperature=0)
MESSAGES = (Message("user", ("What is the total?",)),)
DONE = Completion("42", "stop", Usage(prompt_tokens=10, completion_tokens=2))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- unit ---------------------------------------------------------------------------------------


def test_only_deterministic_requests_qualify() -> None:
    assert deterministic(GREEDY)
    assert deterministic(SamplingParams(temperature=0.8, seed=3))
    assert not deterministic(SamplingParams(temperature=0.8))


def test_key_covers_client_model_request_and_image_content() -> None:
    key = request_key("a", "m" * 64, MESSAGES, GREEDY)
    assert key == request_key("a", "m" * 64, MESSAGES, GREEDY)
    assert key != request_key("b", "m" * 64, MESSAGES, GREEDY)
    assert key != request_key("a", "n" * 64, MESSAGES, GREEDY)
    assert key != request_key("a", "m" * 64, MESSAGES, SamplingParams(max_tokens=9, temperature=0))
    # Greedy decoding ignores top_p and seed, so they do not split the cache.
    assert key == request_key(
        "a", "m" * 64, MESSAGES, SamplingParams(max_tokens=8, temperature=0, top_p=0.5, seed=4)
    )
    red = RGBImage(1, 1, b"\xff\0\0", 10, "PNG", source_sha256="1" * 64)
    blue = RGBImage(1, 1, b"\0\0\xff", 10, "PNG", source_sha256="2" * 64)
    with_red = (Message("user", (red, "what is it")),)
    with_blue = (Message("user", (blue, "what is it")),)
    assert request_key("a", "m", with_red, GREEDY) != request_key("a", "m", with_blue, GREEDY)


def test_hit_miss_ttl_and_size() -> None:
    clock = Clock()
    cache = ResponseCache(entries=2, ttl_s=60, clock=clock)
    assert cache.get("a", "k1") is None
    cache.put("a", "k1", DONE)
    hit = cache.get("a", "k1")
    assert hit is not None and hit.text == "42" and hit.usage.cached_tokens == 10
    assert cache.get("b", "k1") is None  # another client never sees it
    cache.put("a", "k2", DONE)
    cache.put("a", "k3", DONE)  # evicts the least recently used
    assert len(cache) == 2 and cache.get("a", "k1") is None
    clock.now += 61
    assert cache.get("a", "k3") is None  # expired
    assert (cache.hits, cache.misses) == (1, 4) and cache.hit_ratio == 0.2


def test_cancelled_answers_are_not_kept_and_reload_drops_clients() -> None:
    cache = ResponseCache(entries=8, ttl_s=60)
    cache.put("a", "k", Completion("", "cancelled"))
    assert len(cache) == 0
    cache.put("a", "k", DONE)
    cache.put("b", "k", DONE)
    cache.configure(8, 60, clients=["b"])
    assert cache.get("a", "k") is None and cache.get("b", "k") is not None
    cache.configure(0, 60, clients=["b"])
    assert len(cache) == 0


# --- through the daemon ---------------------------------------------------------------------------


CHAT = {"messages": [{"role": "user", "content": "What is the total?"}], "max_tokens": 16, "temperature": 0}
TOKENS: dict[str, str] = {}


def _prepare(setup: Any) -> None:
    TOKENS["cached"] = add_client(setup.policy, "cached", scopes=("chat", "metrics"), cache="true")
    TOKENS["other"] = add_client(setup.policy, "other-cached", cache="true")


def _ask(d: Daemon, token: str | None, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    with d.client(token=token) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.headers["x-request-id"], r.json()


def test_repeated_request_is_answered_from_cache(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(prepare=_prepare)
    first_id, first = _ask(d, TOKENS["cached"], CHAT)
    second_id, second = _ask(d, TOKENS["cached"], CHAT)
    other_id, _ = _ask(d, TOKENS["other"], CHAT)  # same request, another client: no hit
    plain_ids = [_ask(d, None, CHAT)[0] for _ in range(2)]  # a client without cache = true
    sampled_id, _ = _ask(d, TOKENS["cached"], dict(CHAT, temperature=0.7))  # not deterministic
    assert second["choices"] == first["choices"] and second["usage"] == first["usage"]
    image = {"type": "image_url", "image_url": {"url": data_uri(png_bytes((1, 2, 3)))}}
    with_image = dict(CHAT, messages=[{"role": "user", "content": [image, {"type": "text", "text": "x"}]}])
    img_ids = [_ask(d, TOKENS["cached"], with_image)[0] for _ in range(2)]
    with d.client(token=TOKENS["cached"]) as c:
        metrics = c.get("/metrics").text
        with c.stream("POST", "/v1/chat/completions", json=dict(CHAT, stream=True)) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: {")]
    streamed = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in lines)
    assert streamed == first["choices"][0]["message"]["content"]
    assert 'qwa_response_cache_total{result="hit"} 2.0' in metrics  # before the stream's hit
    assert "qwa_response_cache_hit_ratio 0.4" in metrics
    assert d.stop() == 0
    audit = {rid: recs[0] for rid, recs in by_request(records(d)).items()}
    assert audit[first_id]["cache"] == "miss" and audit[second_id]["cache"] == "hit"
    assert audit[other_id]["cache"] == "miss"
    assert [audit[i]["cache"] for i in img_ids] == ["miss", "hit"]
    for rid in (*plain_ids, sampled_id):
        assert "cache" not in audit[rid]
    assert audit[second_id]["completion_tokens"] == audit[first_id]["completion_tokens"]


def test_prompt_cache_tokens_in_metrics(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(prepare=_prepare)
    system = {"role": "system", "content": "You answer for the branch. " * 20}
    for q in ("first", "second", "third"):
        _ask(d, None, dict(CHAT, messages=[system, {"role": "user", "content": q}]))
    with d.client(token=TOKENS["cached"]) as c:
        metrics = c.get("/metrics").text
    line = next(x for x in metrics.splitlines() if x.startswith("qwa_prompt_cached_tokens_total"))
    assert float(line.split()[-1]) > 100  # the system prompt, reused twice
