"""A variant of issue 11 defect 8: requests of many large images must not stall other clients, and the
work of a refused request is charged.

Six concurrent requests of 4000x4000 PNGs (about 57 KB each on the wire) used to stall /healthz and
another client's chat for seconds: decoding, tokenizing and every audit write shared asyncio's default
thread pool, nothing bounded intake, and a request refused after decoding cost its client nothing.
"""

from __future__ import annotations

import asyncio
import functools
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon, DaemonFactory, TinyModel, add_client, data_uri, free_port, make_setup
from helpers import SHORT, by_request, records
from PIL import Image

from appliance.audit.log import AuditLog, Hmac, new_hmac_key
from appliance.audit.record import Trail
from appliance.config.load import load_policy
from appliance.config.policy import AuditPolicy, Client, Rate
from appliance.engine.batch import Engine
from appliance.engine.prompt import image_tokens
from appliance.errors import PayloadTooLarge, ServiceUnavailable, TooManyRequests
from appliance.security.ratelimit import TokenBudgets
from appliance.web import images
from appliance.web.intake import IntakeRules
from appliance.web.intake_pool import IntakePool

ATTACKERS = 6
FAST_S = 1.0


@functools.cache
def _big_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4000, 4000), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _images(n: int) -> dict[str, Any]:
    """n copies of the large PNG: each becomes 1024 tokens, so n >= 4 cannot fit n_ctx 4096."""
    part = {"type": "image_url", "image_url": {"url": data_uri(_big_png())}}
    return {
        "messages": [{"role": "user", "content": [part] * n + [{"type": "text", "text": "x"}]}],
        "max_tokens": 1,
    }


def _flood(
    d: Daemon, token: str, body: dict[str, Any]
) -> tuple[list[httpx.Response], list[float], list[float]]:
    """ATTACKERS concurrent requests of `body`; meanwhile /healthz and another client's short chat are
    timed over and over: (the attack's responses, healthz seconds, chat seconds)."""
    out: list[httpx.Response] = []
    health: list[float] = []
    chat: list[float] = []

    def attack() -> None:
        with d.client(token=token, timeout=300) as c:
            out.append(c.post("/v1/chat/completions", json=body))

    def probe(path: str, times: list[float]) -> None:
        with d.client(timeout=60) as c:
            while any(t.is_alive() for t in attackers) or len(times) < 3:
                started = time.monotonic()
                r = c.get(path) if path == "/healthz" else c.post(path, json=SHORT)
                assert r.status_code == 200, r.text
                times.append(time.monotonic() - started)
                time.sleep(0.05)

    attackers = [threading.Thread(target=attack) for _ in range(ATTACKERS)]
    for t in attackers:
        t.start()
    probes = [
        threading.Thread(target=probe, args=("/healthz", health)),
        threading.Thread(target=probe, args=("/v1/chat/completions", chat)),
    ]
    for t in probes:
        t.start()
    for t in attackers + probes:
        t.join()
    return out, health, chat


def test_large_image_floods_stall_neither_health_nor_other_clients(daemon_factory: DaemonFactory) -> None:
    """Before: 6 x 4 images stalled /healthz 3.4 s and the other chat 3.5 s here (6 x 8: 6.6 s)."""
    tokens: dict[str, str] = {}
    d = daemon_factory(prepare=lambda s: tokens.update(a=add_client(s.policy, "flood")))
    started = time.monotonic()
    with d.client(token=tokens["a"], timeout=60) as c:
        early = c.post("/v1/chat/completions", json=_images(8))
    assert early.status_code == 400, early.text  # 8 images cannot fit: refused from their headers
    assert "at least" in early.json()["error"]["message"]
    assert time.monotonic() - started < FAST_S
    responses, health, chat = _flood(d, tokens["a"], _images(4))  # fit the bound; refused once tokenized
    print(f"4 images x {ATTACKERS}: healthz max {max(health):.3f} s, other chat max {max(chat):.3f} s")
    assert [r.status_code for r in responses] == [400] * ATTACKERS, [r.text for r in responses]
    assert all("prompt is 41" in r.json()["error"]["message"] for r in responses)
    assert max(health) < FAST_S, health
    assert max(chat) < FAST_S, chat


def test_work_refused_after_decoding_is_charged(daemon_factory: DaemonFactory) -> None:
    """Refused once tokenized: the prompt's tokens are taken from token_budget (and audited); refused
    from the headers alone (no decoding): free; a spent budget: refused before any decoding."""
    tokens: dict[str, str] = {}

    def prepare(setup: Any) -> None:
        tokens["a"] = add_client(setup.policy, "flood", token_budget='"10000/hour"')

    d = daemon_factory(prepare=prepare)
    with d.client(token=tokens["a"], timeout=120) as c:
        assert c.post("/v1/chat/completions", json=_images(8)).status_code == 400  # free
        codes = [c.post("/v1/chat/completions", json=_images(4)) for _ in range(3)]
        started = time.monotonic()
        spent = c.post("/v1/chat/completions", json=_images(4))
        assert time.monotonic() - started < FAST_S
    assert [r.status_code for r in codes] == [400, 400, 429], [r.text for r in codes]
    assert spent.status_code == 429 and int(spent.headers["retry-after"]) >= 1
    charged = [
        rec[0].get("charged_tokens")
        for rec in by_request(records(d)).values()
        if rec[0].get("event") == "request"
    ]
    n_prompt = int(codes[0].json()["error"]["message"].split()[2])
    assert sorted(c for c in charged if c) == [n_prompt, n_prompt], charged
    responses, health, _ = _flood(d, tokens["a"], _images(4))
    assert {r.status_code for r in responses} == {429}  # nothing decoded while the budget is spent
    assert max(health) < FAST_S


def test_header_bound_never_exceeds_what_the_projector_makes(tmp_path: Path, tiny_model: TinyModel) -> None:
    """The bound that refuses before decoding is a true lower bound: header size, scaled as decode
    scales, in whole token cells per side, against libmtmd's own count (JPEGs decoded at 1/2 scale too)."""
    setup = make_setup(tmp_path, tiny_model, free_port())
    engine = Engine.load(load_policy(setup.policy).model)
    try:
        info = engine.info
        assert info.image_token_pixels == 1024 and info.image_max_pixels == 1024 * 1024
        limits = images.ImageLimits(50_000_000, 50_000_000, None, info.image_max_pixels)
        rules = IntakeRules("m", 1, 8, limits, image_token_pixels=info.image_token_pixels)
        vocab, mctx = engine._vocab, engine._mctx
        assert mctx is not None
        sizes = [(1, 1), (31, 33), (47, 4000), (4000, 47), (1000, 1000), (1023, 1025), (3000, 1000)]
        sizes += [(17 + 97 * i, 4001 - 131 * i) for i in range(30)]
        for w, h in sizes:
            encoded = images.Encoded(b"", w, h, "PNG")
            assert rules.image_tokens_at_least(encoded) <= image_tokens(
                vocab, mctx, *encoded.scaled_size(limits)
            )
        for w, h in [(3001, 1999), (4000, 4000), (2100, 700)]:
            buf = io.BytesIO()
            Image.new("RGB", (w, h), (1, 2, 3)).save(buf, format="JPEG")
            decoded = images.decode(buf.getvalue(), limits)
            bound = rules.image_tokens_at_least(images.read_header(buf.getvalue(), limits))
            assert bound <= image_tokens(vocab, mctx, decoded.width, decoded.height)
    finally:
        engine.close()


class _Requests:
    """Requests on an intake pool, each running until its own event is set."""

    def __init__(self, pool: IntakePool, max_waiting: int = 8) -> None:
        self.pool, self.max_waiting = pool, max_waiting
        self.order: list[str] = []
        self.done: dict[str, threading.Event] = {}

    def start(self, name: str) -> asyncio.Task[None]:
        self.done[name] = threading.Event()
        return asyncio.create_task(self.run(name))

    async def run(self, name: str) -> None:
        async with self.pool.slot(name[0], self.max_waiting) as lease:  # the client: the first letter
            self.order.append(name)
            await lease.run(self.done[name].wait)

    async def finish(self, name: str) -> None:
        self.done[name].set()
        await asyncio.sleep(0.05)


def test_intake_slots_are_bounded_fair_and_shed_the_heaviest_client() -> None:
    async def scenario() -> None:
        r = _Requests(IntakePool(2), max_waiting=2)  # one client holds at most one slot of two
        tasks = [r.start("a1"), r.start("a2")]
        await asyncio.sleep(0.05)
        assert (r.pool.busy, r.pool.waiting) == (1, 1)  # a2 waits although a slot is free
        tasks += [r.start("b1")]
        await asyncio.sleep(0.05)
        assert (r.pool.busy, r.pool.waiting) == (2, 1) and r.order == ["a1", "b1"]
        a3 = r.start("a3")
        await asyncio.sleep(0.05)
        tasks += [r.start("c1")]  # the wait is full: a's newest waiter is refused, not c
        await asyncio.sleep(0.05)
        with pytest.raises(ServiceUnavailable) as busy:
            await a3
        assert busy.value.retry_after is not None and busy.value.retry_after >= 1
        r.done["a4"] = threading.Event()
        with pytest.raises(ServiceUnavailable):
            await r.run("a4")  # a waits as much as any client: the newcomer itself is refused
        await r.finish("b1")
        assert r.order == ["a1", "b1", "c1"]  # a2 came first, but a already holds its one slot
        await r.finish("a1")
        assert r.order[-1] == "a2"
        for name in ("a2", "c1"):
            await r.finish(name)
        await asyncio.gather(*tasks)
        assert (r.pool.busy, r.pool.waiting) == (0, 0)
        r.pool.close()

    asyncio.run(scenario())


def test_a_freed_intake_slot_goes_to_the_client_holding_fewest() -> None:
    async def scenario() -> None:
        r = _Requests(IntakePool(4))
        tasks = [r.start(n) for n in ("a1", "a2", "b1", "b2")]
        await asyncio.sleep(0.05)
        tasks += [r.start("a3")]
        await asyncio.sleep(0.05)
        tasks += [r.start("c1")]
        await asyncio.sleep(0.05)
        await r.finish("b1")
        assert r.order[-1] == "c1"  # a3 waited longer, but a holds two slots and c none
        for name in ("a1", "a2", "b2", "a3", "c1"):
            await r.finish(name)
        await asyncio.gather(*tasks)
        r.pool.close()

    asyncio.run(scenario())


def test_a_cancelled_caller_keeps_its_slot_until_its_thread_is_done() -> None:
    async def scenario() -> None:
        pool = IntakePool(1)
        release = threading.Event()
        orphaned: list[str] = []

        async def request() -> None:
            async with pool.slot("a", max_waiting=4) as lease:
                await lease.run(lambda: release.wait() and "made", orphan=orphaned.append)

        task = asyncio.create_task(request())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        assert task.cancelled() and pool.busy == 1  # the thread still works for it
        release.set()
        await asyncio.sleep(0.1)
        assert pool.busy == 0 and orphaned == ["made"]
        pool.close()

    asyncio.run(scenario())


def test_audit_writes_never_wait_behind_the_default_pool(tmp_path: Path) -> None:
    (tmp_path / "k").write_text(new_hmac_key())
    (tmp_path / "k").chmod(0o600)
    log = AuditLog(AuditPolicy.with_defaults(dir=tmp_path / "audit", hmac_key_file=tmp_path / "k"))
    log.open()
    trail = Trail(log, Hmac(b"k" * 32), fail_closed=True)
    release = threading.Event()

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(2))
        blockers = [loop.run_in_executor(None, release.wait) for _ in range(4)]
        started = time.monotonic()
        await trail.write("request", request_id="r1", status=200)
        seconds = time.monotonic() - started
        release.set()
        await asyncio.gather(*blockers)
        return seconds

    try:
        assert asyncio.run(scenario()) < FAST_S
    finally:
        release.set()
        trail.close()
        log.close()


def test_budget_refuses_the_fewest_possible_tokens_and_charges_refused_work() -> None:
    now = [0.0]
    budgets = TokenBudgets(clock=lambda: now[0])
    client = Client("t", "0" * 64, frozenset({"chat"}), token_budget=Rate(1000, 60))
    budgets.check(client, at_least=900, max_tokens=100)
    with pytest.raises(PayloadTooLarge):
        budgets.check(client, at_least=901, max_tokens=100)  # can never be paid: 413 before decoding
    budgets.spend(client, 1800)  # refused after tokenizing: charged, even below zero
    with pytest.raises(TooManyRequests) as refused:
        budgets.check(client)
    assert refused.value.retry_after == 49  # 801 tokens short at 1000 per 60 s
    now[0] += 60
    budgets.check(client, at_least=150, max_tokens=50)
    with pytest.raises(TooManyRequests, match="costs at least 250"):
        budgets.check(client, at_least=200, max_tokens=50)
