"""Batching across clients: several sequences in one llama.cpp batch, on the real tiny model.

Engine-level tests drive admit()/step() directly; daemon-level tests go through HTTPS like clients do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import httpx
import pytest
from conftest import DaemonFactory, TinyModel, data_uri, png_bytes

from appliance.config.policy import ModelPolicy
from appliance.engine.batch import Engine
from appliance.engine.types import Completion, Message, RGBImage, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
SEEDED = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234)


def _image(rgb: tuple[int, int, int], size: int = 64) -> RGBImage:
    return RGBImage(size, size, bytes(rgb) * size * size, source_bytes=100, source_format="PNG")


def _user(*parts: str | RGBImage) -> list[Message]:
    return [Message("user", parts)]


@pytest.fixture(scope="module")
def engine(tiny_model: TinyModel) -> Iterator[Engine]:
    eng = Engine.load(
        ModelPolicy.with_defaults(
            path=tiny_model.model, mmproj=tiny_model.mmproj, threads=1, n_ctx=2048, parallel=4
        )
    )
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def serial(tiny_model: TinyModel) -> Iterator[Engine]:
    """One slot and no prompt cache: the reference every batched answer must match."""
    eng = Engine.load(
        ModelPolicy.with_defaults(
            path=tiny_model.model,
            mmproj=tiny_model.mmproj,
            threads=1,
            n_ctx=2048,
            parallel=1,
            prompt_cache=False,
        )
    )
    yield eng
    eng.close()


Request = tuple[list[Message], SamplingParams]


def _alone(eng: Engine, request: Request) -> Completion:
    return eng.generate(request[0], request[1], lambda: False, lambda _: None)


def _stopper(pieces: list[str], after: int | None) -> Callable[[], bool]:
    """A cancel check that fires once `after` pieces were streamed (never when None)."""
    return lambda: after is not None and len(pieces) >= after


def _together(
    eng: Engine, requests: list[Request], cancel_after: dict[int, int] | None = None
) -> tuple[list[Completion], list[list[str]]]:
    """Admit all requests at once and step until every one has ended."""
    pieces: list[list[str]] = [[] for _ in requests]
    limits = cancel_after or {}
    seqs = [
        eng.admit(messages, params, _stopper(pieces[i], limits.get(i)), pieces[i].append)
        for i, (messages, params) in enumerate(requests)
    ]
    while not all(s.finished for s in seqs):
        eng.step()
    out = []
    for s in seqs:
        assert s.error is None and s.completion is not None
        out.append(s.completion)
    return out, pieces


TEXTS: list[Request] = [
    (_user("The quick brown fox"), GREEDY),
    (_user("Summarise the balance sheet"), SEEDED),
    ([Message("system", ("You are terse.",)), *_user("Hello there")], GREEDY),
    (_user("x " * 300), replace(SEEDED, seed=7)),
]


# --- the engine ---------------------------------------------------------------------------------


def _same_or_valid(request: Request, done: Completion, alone: Completion, exact: bool) -> None:
    """Greedy answers must match a lone run exactly on the CPU (a mixed-up logits row would not).

    Otherwise the answer only has to be valid: llama.cpp splits a multi-sequence batch into micro-batches
    of other shapes, and matrix products of another shape round differently (measured: up to 0.006 in
    a logit of the tiny model), so a draw near a probability boundary can flip. llama-server's
    cache_prompt documentation states the same for different batch sizes.
    """
    assert done.usage.prompt_tokens == alone.usage.prompt_tokens
    assert done.usage.image_tokens == alone.usage.image_tokens
    if exact and request[1].temperature == 0:
        assert (done.text, done.finish_reason, done.usage) == (alone.text, alone.finish_reason, alone.usage)
    else:
        assert done.finish_reason in ("stop", "length") and isinstance(done.text, str)
        assert 0 < done.usage.completion_tokens <= request[1].max_tokens


def test_batched_text_equals_each_alone(engine: Engine, serial: Engine) -> None:
    """Same prompts, temperature 0 or a fixed seed: decoding them together gives valid, equal answers."""
    together, pieces = _together(engine, TEXTS)
    exact = not engine.info.gpu_offload_active
    for request, done, streamed in zip(TEXTS, together, pieces, strict=True):
        _same_or_valid(request, done, _alone(serial, request), exact)
        assert "".join(streamed) == done.text


def test_identical_requests_in_one_batch_get_identical_answers(engine: Engine) -> None:
    """Sequences never see each other's state: A and B twice each, interleaved, in one batch.

    Equal prompts sit in the same micro-batches with the same shapes, so this holds bit for bit on
    every backend; a wrong sequence id or logits row would give a copy of the neighbour's answer.
    """
    a = (_user("The quick brown fox"), SEEDED)
    b = (_user("Summarise the balance sheet"), replace(SEEDED, seed=99))
    together, _ = _together(engine, [a, b, a, b])
    assert together[0] == together[2] and together[1] == together[3]
    assert together[0].text != together[1].text


def test_images_batched_with_text(engine: Engine, serial: Engine) -> None:
    """Image requests share the batch with text ones (each image is evaluated into its own sequence)."""
    red, blue = _image((255, 0, 0)), _image((0, 0, 255), 96)
    requests: list[Request] = [
        (_user(red, "What colour?"), GREEDY),
        TEXTS[0],
        (_user("compare", blue, "and", red), SEEDED),
        TEXTS[1],
    ]
    together, _ = _together(engine, requests)
    for request, done in zip(requests, together, strict=True):
        _same_or_valid(request, done, _alone(serial, request), not engine.info.gpu_offload_active)
    assert together[0].usage.image_tokens > 0 and together[2].usage.image_tokens > 0


def test_cancelling_one_does_not_disturb_the_others(engine: Engine, serial: Engine) -> None:
    long = [(m, replace(p, max_tokens=40)) for m, p in TEXTS[:3]]
    together, pieces = _together(engine, long, cancel_after={1: 3})
    assert together[1].finish_reason == "cancelled" and len(pieces[1]) == 3
    for i in (0, 2):
        _same_or_valid(long[i], together[i], _alone(serial, long[i]), not engine.info.gpu_offload_active)


def test_more_requests_than_slots_is_refused(engine: Engine) -> None:
    seqs = [engine.admit(*TEXTS[0], lambda: True, lambda _: None) for _ in range(engine.parallel)]
    with pytest.raises(RuntimeError, match="no free slot"):
        engine.admit(*TEXTS[0], lambda: False, lambda _: None)
    engine.step()  # all were cancelled: the slots are free again
    assert all(s.completion is not None and s.completion.finish_reason == "cancelled" for s in seqs)
    assert engine.free_slots == engine.parallel


def test_generating_requests_keep_going_while_a_long_prompt_is_evaluated(engine: Engine) -> None:
    """Fairness: a long prompt is fed in n_batch chunks, each decoded with the others' next tokens."""
    running = engine.admit(
        _user("Write a long report"),
        SamplingParams(max_tokens=200, temperature=0),
        lambda: False,
        lambda _: None,
    )
    engine.step()  # its prompt is evaluated and its first token sampled
    long_prompt = (_user("lorem ipsum dolor " * 100), SamplingParams(max_tokens=4, temperature=0))
    late = engine.admit(*long_prompt, lambda: False, lambda _: None)
    assert late.usage.prompt_tokens > 1024  # several n_batch chunks
    steps_to_first = 0
    while late.n_gen == 0:
        before = running.n_gen
        engine.step()
        steps_to_first += 1
        assert running.n_gen == before + 1  # the running request got a token in every step
    assert steps_to_first <= -(-late.usage.prompt_tokens // 512)
    while not (running.finished and late.finished):
        engine.step()


def test_short_prompt_waits_at_most_one_other_prompt(engine: Engine) -> None:
    """A short prompt admitted after a long one gets its first token once the long prompt is in."""
    params = SamplingParams(max_tokens=4, temperature=0)
    long = engine.admit(_user("lorem ipsum dolor " * 100), params, lambda: False, lambda _: None)
    short = engine.admit(_user("hi"), params, lambda: False, lambda _: None)
    first: dict[str, int] = {}
    steps = 0
    while not (long.finished and short.finished):
        engine.step()
        steps += 1
        for name, seq in (("long", long), ("short", short)):
            if seq.n_gen and name not in first:
                first[name] = steps
    assert first["short"] <= first["long"]  # behind no more than the one long prompt


# --- prompt cache ---------------------------------------------------------------------------------


SYSTEM = Message("system", ("You are the branch assistant. Answer from the documents only. " * 8,))


def test_shared_system_prompt_is_evaluated_once(engine: Engine) -> None:
    """Other clients with the same system prompt reuse its KV (not their own questions)."""
    first = engine.generate(
        [SYSTEM, *_user("first question")], GREEDY, lambda: False, lambda _: None, owner="teller-1"
    )
    later = [
        engine.generate(
            [SYSTEM, *_user(f"question {i}")], GREEDY, lambda: False, lambda _: None, owner=f"teller-{i}"
        )
        for i in range(2, 6)
    ]
    assert first.usage.cached_tokens <= 3  # at most <|im_start|> and a role from another request
    system_tokens = first.usage.prompt_tokens - 16  # the question and the generation prompt
    assert all(c.usage.cached_tokens >= system_tokens for c in later)
    assert all(c.usage.cached_tokens < c.usage.prompt_tokens - 2 for c in later)


def test_other_clients_reuse_only_the_system_part(engine: Engine) -> None:
    """A user's document stays private: another client re-evaluates it, the same client does not."""
    messages = [SYSTEM, *_user("account 4711 balance " * 20)]

    def ask(owner: str) -> Completion:
        return engine.generate(messages, GREEDY, lambda: False, lambda _: None, owner=owner)

    first, same, other = ask("teller-a"), ask("teller-a"), ask("teller-b")
    assert same.usage.cached_tokens == same.usage.prompt_tokens - 1
    assert 0 < other.usage.cached_tokens < other.usage.prompt_tokens // 2
    assert first.text == same.text  # the same KV, reused whole
    assert other.finish_reason in ("stop", "length")


def test_prompt_cache_off(tiny_model: TinyModel) -> None:
    eng = Engine.load(
        ModelPolicy.with_defaults(path=tiny_model.model, threads=1, n_ctx=512, parallel=2, prompt_cache=False)
    )
    try:
        for _ in range(2):
            done = eng.generate([SYSTEM, *_user("q")], GREEDY, lambda: False, lambda _: None)
            assert done.usage.cached_tokens == 0
    finally:
        eng.close()


def test_n_ctx_is_per_sequence(engine: Engine) -> None:
    assert engine.info.n_ctx == 2048 and engine.info.parallel == 4


# --- through the daemon ---------------------------------------------------------------------------


BODY = {
    "messages": [{"role": "user", "content": "Tell me about the account"}],
    "max_tokens": 32,
    "temperature": 0,
}


def _post_all(d, bodies: list[dict]) -> list[httpx.Response]:  # type: ignore[no-untyped-def]
    out: list[httpx.Response | None] = [None] * len(bodies)

    def post(i: int) -> None:
        with d.client() as c:
            out[i] = c.post("/v1/chat/completions", json=bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in out)
    return [r for r in out if r is not None]


def test_concurrent_clients_get_their_own_answers(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    image = {"type": "image_url", "image_url": {"url": data_uri(png_bytes((10, 200, 30)))}}
    bodies = [dict(BODY, messages=[{"role": "user", "content": f"question number {i}"}]) for i in range(5)]
    bodies.append(
        dict(BODY, messages=[{"role": "user", "content": [image, {"type": "text", "text": "what is it"}]}])
    )
    with d.client() as c:
        alone = [c.post("/v1/chat/completions", json=b).json() for b in bodies]
    together = _post_all(d, bodies)
    for a, t in zip(alone, together, strict=True):
        assert t.status_code == 200, t.text
        assert t.json()["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
        assert t.json()["usage"] == a["usage"]


def test_queue_full_with_all_slots_busy(daemon_factory: DaemonFactory) -> None:
    """Two slots decode two long streams; a third request waits; a fourth gets 503."""
    d = daemon_factory(
        {
            "parallel = 4": "parallel = 2",
            "max_queue = 16": "max_queue = 1",
            "n_ctx = 4096": "n_ctx = 32768",
            "max_tokens = 2048": "max_tokens = 30000",
        }
    )
    long = dict(BODY, max_tokens=30000, stream=True)
    with (
        d.client() as a,
        d.client() as b,
        a.stream("POST", "/v1/chat/completions", json=long) as s1,
        b.stream("POST", "/v1/chat/completions", json=long) as s2,
    ):
        lines = (s1.iter_lines(), s2.iter_lines())
        next(lines[0]), next(lines[1])
        assert d.readyz()["queue"]["busy"]
        result: dict[str, int] = {}
        third = threading.Thread(
            target=lambda: result.update(c=d.client().post("/v1/chat/completions", json=BODY).status_code)
        )
        third.start()
        deadline = time.monotonic() + 30
        while d.readyz()["queue"]["waiting"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        with d.client() as c:
            full = c.post("/v1/chat/completions", json=BODY)
        assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
    third.join(60)  # leaving the streams cancelled both generations; the third one ran
    assert result == {"c": 200}
