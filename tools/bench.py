#!/usr/bin/env python3
"""Side-by-side benchmark: llama-cpp-python in-process, the appliance, llama_cpp.server and llama-server.

One invocation starts all four on the same GGUF with the same thread count, then runs the workloads in
interleaved rounds (system order rotates every round) so machine drift cancels out. Writes
docs/bench/results.md, results.json and results.png. Run it with .venv-bench/bin/python (`make bench`):
that environment holds llama_cpp.server's extra packages and matplotlib, apart from the appliance's.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import platform
import random
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
APPLIANCE_PY = ROOT / ".venv" / "bin" / "python"
SYSTEMS = ("inproc", "appliance", "llama_cpp.server", "llama-server")
PEERS = SYSTEMS[1:]
N_CTX = 4096  # per sequence, in every system
PARALLEL = 8  # slots of the appliance and llama-server
BAD_TOKEN = "qwa_" + "0" * 40

# --- workloads ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One kind of request, sent `requests` times by each of `concurrency` clients."""

    name: str
    body: dict[str, Any]
    concurrency: int = 1
    requests: int = 4
    stream: bool = False
    cached: bool = False  # appliance only: the response-cache client (the security path alone)


def _chat(content: Any, max_tokens: int, system: str | None = None) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    return {"messages": messages, "max_tokens": max_tokens, "temperature": 0}


def _png(size: int, seed: int = 1) -> str:
    """A noisy PNG data URI (noise keeps the encoded size honest)."""
    from PIL import Image

    rnd = random.Random(seed)
    img = Image.frombytes("RGB", (size, size), bytes(rnd.getrandbits(8) for _ in range(size * size * 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_chat(size: int, max_tokens: int = 32) -> dict[str, Any]:
    return _chat(
        [
            {"type": "image_url", "image_url": {"url": _png(size)}},
            {"type": "text", "text": "What is the total on this statement?"},
        ],
        max_tokens,
    )


def long_text(lines: int) -> str:
    """About 36 tokens a line with the tiny model's tokenizer, about 12 with a real Qwen vocabulary."""
    return " ".join(f"Line {i}: the account balance moved by {i * 37 % 1000} euros." for i in range(lines))


SYSTEM_TEXT = " ".join(
    f"Rule {i}: answer only from the documents, cite the page, never guess." for i in range(30)
)


def workloads(n: int, long_lines: int) -> list[Workload]:
    """The standard set; `n` requests per client at concurrency 1, about n/3 per client beyond."""
    short = _chat("Write a short report about the branch's quarterly figures.", 64)
    return [
        Workload("short c1", short, 1, n),
        Workload("stream ttft", short, 1, n, stream=True),
        Workload("long prompt", _chat(long_text(long_lines), 32), 1, max(2, n // 2)),
        Workload("image 256px", _image_chat(256), 1, max(2, n // 2)),
        Workload("short c4", short, 4, max(2, n // 3)),
        Workload("short c8", short, 8, max(2, n // 3)),
        Workload("shared system", _chat("Which rule applies?", 16, SYSTEM_TEXT), 1, n),
    ]


# --- one request ------------------------------------------------------------------------------------


@dataclass
class Record:
    """What one request cost: end-to-end latency, time to first content, tokens generated."""

    latency: float
    ttft: float | None
    tokens: int
    ok: bool
    status: int = 200


Call = Callable[[dict[str, Any], bool], Record]


class HttpTarget:
    """An OpenAI-compatible chat endpoint, one keep-alive connection per client thread."""

    def __init__(self, url: str, headers: dict[str, str], verify: ssl.SSLContext | bool = False) -> None:
        self.url, self.headers, self.verify = url, headers, verify
        self._local = threading.local()

    def client(self) -> Any:
        import httpx

        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = httpx.Client(
                base_url=self.url, headers=self.headers, verify=self.verify, timeout=600
            )
        return c

    def call(self, body: dict[str, Any], stream: bool) -> Record:
        t0 = time.perf_counter()
        if not stream:
            r = self.client().post("/v1/chat/completions", json=body)
            ok = r.status_code == 200
            tokens = r.json().get("usage", {}).get("completion_tokens", 0) if ok else 0
            return Record(time.perf_counter() - t0, None, tokens, ok, r.status_code)
        return self._stream(body, t0)

    def _stream(self, body: dict[str, Any], t0: float) -> Record:
        ttft, chunks = None, 0
        with self.client().stream("POST", "/v1/chat/completions", json=dict(body, stream=True)) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    chunks += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
            return Record(time.perf_counter() - t0, ttft, chunks, r.status_code == 200, r.status_code)

    def close(self) -> None:
        self._local = threading.local()


class InprocTarget:
    """llama-cpp-python in a worker subprocess (so its RSS is measured like a server's)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._lock = threading.Lock()

    def run(self, workload: Workload) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write(json.dumps(asdict(workload)) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the in-process worker died")
        result: dict[str, Any] = json.loads(line)
        return result


def run_load(call: Call, w: Workload) -> dict[str, Any]:
    """`w.concurrency` client threads, each sending `w.requests` requests back to back."""
    records: list[Record] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(w.requests):
            rec = call(w.body, w.stream)
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=client) for _ in range(w.concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"wall": wall, "records": [asdict(r) for r in records]}


# --- the in-process floor (runs in the worker subprocess) -----------------------------------------


def inproc_worker(model: str, mmproj: str | None, threads: int) -> None:
    """Serve workloads from stdin with llama-cpp-python's own API, one request at a time (its limit)."""
    import llama_cpp
    from llama_cpp.llama_chat_format import MTMDChatHandler

    def load(handler: Any = None) -> Any:
        return llama_cpp.Llama(
            model_path=model,
            n_ctx=N_CTX,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=-1,
            chat_handler=handler,
            verbose=False,
        )

    text_llm = load()
    mm_llm = load(MTMDChatHandler(clip_model_path=mmproj, verbose=False)) if mmproj else None
    lock = threading.Lock()

    def call(body: dict[str, Any], stream: bool) -> Record:
        has_image = not isinstance(body["messages"][-1]["content"], str)
        llm = mm_llm if has_image else text_llm
        with lock:
            return _inproc_call(llm, body, stream)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        w = Workload(**json.loads(line))
        print(json.dumps(run_load(call, w)), flush=True)


def _inproc_call(llm: Any, body: dict[str, Any], stream: bool) -> Record:
    t0 = time.perf_counter()
    kw = {"messages": body["messages"], "max_tokens": body["max_tokens"], "temperature": 0.0}
    if not stream:
        out = llm.create_chat_completion(**kw)
        return Record(time.perf_counter() - t0, None, out["usage"]["completion_tokens"], True)
    ttft, chunks = None, 0
    for chunk in llm.create_chat_completion(stream=True, **kw):
        if chunk["choices"][0]["delta"].get("content"):
            chunks += 1
            ttft = ttft if ttft is not None else time.perf_counter() - t0
    return Record(time.perf_counter() - t0, ttft, chunks, True)


# --- starting the systems -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str,
    proc: subprocess.Popen[Any],
    verify: Any = False,
    headers: Any = None,
    path: str = "/v1/models",
    timeout: float = 120,
) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, verify=verify, headers=headers, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not become ready in {timeout} s")


@dataclass
class Running:
    """A started system: its process (for RSS) and how to send it requests."""

    name: str
    proc: subprocess.Popen[Any]
    target: HttpTarget | InprocTarget
    extra: dict[str, Any] = field(default_factory=dict)


def start_inproc(args: argparse.Namespace, logs: Path) -> Running:
    cmd = [
        sys.executable,
        __file__,
        "--inproc-worker",
        "--model",
        str(args.model),
        "--threads",
        str(args.threads),
    ] + (["--mmproj", str(args.mmproj)] if args.mmproj else [])
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        stderr=(logs / "inproc.log").open("w"),
        env=_env(),
    )
    assert proc.stdout is not None
    if "ready" not in proc.stdout.readline():
        raise RuntimeError(f"in-process worker failed; see {logs / 'inproc.log'}")
    return Running("inproc", proc, InprocTarget(proc))


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")


def start_appliance(args: argparse.Namespace, work: Path, logs: Path) -> Running:
    """`init` a fresh set-up (mTLS, token, audit with fsync), then serve it."""
    port = free_port()
    cmd = [
        str(APPLIANCE_PY),
        "-m",
        "appliance",
        "init",
        str(work / "appliance"),
        "--json",
        "--listen",
        f"127.0.0.1:{port}",
        "--model",
        str(args.model),
        "--client",
        "bench",
    ]
    cmd += ["--mmproj", str(args.mmproj)] if args.mmproj else []
    setup = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
    policy = Path(setup["policy"])
    text = policy.read_text()
    for old, new in {
        "threads = 0 ": f"threads = {args.threads} ",
        "parallel = 4 ": f"parallel = {PARALLEL} ",
        f"n_ctx = {N_CTX}": f"n_ctx = {N_CTX}",
        "max_queue = 16": "max_queue = 256",
    }.items():
        text = text.replace(old, new)
    cache_token = _add_cache_client(policy, text)
    proc = subprocess.Popen(
        [str(APPLIANCE_PY), "-m", "appliance", "serve", "--policy", str(policy)],
        stdout=(logs / "appliance.log").open("w"),
        stderr=subprocess.STDOUT,
        env=_env(),
        cwd=ROOT,
    )
    ctx = ssl.create_default_context(cafile=setup["ca_cert"])
    ctx.load_cert_chain(setup["client_cert"], setup["client_key"])
    url = f"https://127.0.0.1:{port}"
    wait_http(url, proc, ctx, {"authorization": f"Bearer {setup['token']}"})
    return Running(
        "appliance",
        proc,
        HttpTarget(url, {"authorization": f"Bearer {setup['token']}"}, ctx),
        {
            "cache": HttpTarget(url, {"authorization": f"Bearer {cache_token}"}, ctx),
            "bad": HttpTarget(url, {"authorization": f"Bearer {BAD_TOKEN}"}, ctx),
            "ctx": ctx,
            "url": url,
        },
    )


def _add_cache_client(policy: Path, text: str) -> str:
    """A second client with the response cache on (and metrics), for the security-path measurement."""
    token = "qwa_" + hashlib.sha256(os.urandom(32)).hexdigest()[:40]
    digest = hashlib.sha256(token.encode()).hexdigest()
    policy.write_text(
        text + f'\n[[clients]]\nname = "bench-cached"\ntoken_sha256 = "{digest}"\n'
        'scopes = ["chat", "metrics"]\ncache = true\n'
    )
    return token


def start_llama_cpp_server(args: argparse.Namespace, logs: Path) -> Running:
    port, key = free_port(), "bench-key"
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(args.model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(N_CTX),
        "--n_threads",
        str(args.threads),
        "--n_threads_batch",
        str(args.threads),
        "--n_gpu_layers",
        "-1",
        "--api_key",
        key,
    ]
    if args.mmproj:
        cmd += ["--chat_format", "mtmd", "--clip_model_path", str(args.mmproj)]
    proc = subprocess.Popen(
        cmd, stdout=(logs / "llama_cpp_server.log").open("w"), stderr=subprocess.STDOUT, env=_env()
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url, proc, headers={"authorization": f"Bearer {key}"})
    return Running(
        "llama_cpp.server",
        proc,
        HttpTarget(url, {"authorization": f"Bearer {key}"}),
        {"bad": HttpTarget(url, {"authorization": f"Bearer {BAD_TOKEN}"})},
    )


def start_llama_server(args: argparse.Namespace, logs: Path) -> Running:
    port, key = free_port(), "bench-key"
    binary = Path(args.llama_server)
    cmd = [
        str(binary),
        "-m",
        str(args.model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        str(N_CTX * PARALLEL),
        "-np",
        str(PARALLEL),
        "-t",
        str(args.threads),
        "-tb",
        str(args.threads),
        "-ngl",
        "999",
        "--jinja",
        "--no-webui",
        "--api-key",
        key,
    ]
    cmd += ["--mmproj", str(args.mmproj)] if args.mmproj else []
    env = dict(_env(), LD_LIBRARY_PATH=str(binary.parent))
    proc = subprocess.Popen(
        cmd, stdout=(logs / "llama_server.log").open("w"), stderr=subprocess.STDOUT, env=env
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url, proc, headers={"authorization": f"Bearer {key}"})
    return Running(
        "llama-server",
        proc,
        HttpTarget(url, {"authorization": f"Bearer {key}"}),
        {"bad": HttpTarget(url, {"authorization": f"Bearer {BAD_TOKEN}"})},
    )


# --- measuring --------------------------------------------------------------------------------------


class RssWatch:
    """Peak resident memory of each system's process tree, sampled every 100 ms."""

    def __init__(self, systems: dict[str, Running]) -> None:
        import psutil

        self._procs = {name: psutil.Process(r.proc.pid) for name, r in systems.items()}
        self.peak: dict[str, int] = dict.fromkeys(systems, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.1):
            for name, p in self._procs.items():
                with contextlib.suppress(psutil.Error):
                    rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(True))
                    self.peak[name] = max(self.peak[name], rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_workload(r: Running, w: Workload) -> dict[str, Any]:
    if isinstance(r.target, InprocTarget):
        return r.target.run(w)
    target = r.extra["cache"] if w.cached else r.target
    return run_load(target.call, w)


def summarize(raw: dict[str, Any]) -> dict[str, float | None]:
    """Medians and p10/p90 over every round's records, plus aggregate throughput."""
    recs = [r for run in raw["runs"] for r in run["records"]]
    ok = [r for r in recs if r["ok"]]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    walls = [run["wall"] for run in raw["runs"]]
    toks = [sum(r["tokens"] for r in run["records"] if r["ok"]) / run["wall"] for run in raw["runs"]]
    reqs = [len(run["records"]) / run["wall"] for run in raw["runs"]]
    out: dict[str, float | None] = {
        "n": len(recs),
        "errors": len(recs) - len(ok),
        "wall_s": sum(walls),
        "tok_s": statistics.median(toks),
        "tok_s_p10": _pct(toks, 10),
        "tok_s_p90": _pct(toks, 90),
        "req_s": statistics.median(reqs),
    }
    for name, values in (("lat", lat), ("ttft", ttft)):
        out[name] = statistics.median(values) if values else None
        out[f"{name}_p10"] = _pct(values, 10)
        out[f"{name}_p90"] = _pct(values, 90)
    if "flood_rate" in raw["runs"][0]:
        out["flood_rate"] = statistics.median(run["flood_rate"] for run in raw["runs"])
    return out


def _pct(values: list[float], p: int) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


# --- the flood of bad tokens ----------------------------------------------------------------------


class RawClient:
    """A keep-alive HTTP/1.1 connection with pre-encoded requests: cheap enough to flood from Python."""

    def __init__(self, url: str, ctx: ssl.SSLContext | None, token: str) -> None:
        host, port = url.split("//")[1].split(":")
        self.addr, self.ctx = (host, int(port)), ctx
        body = b'{"messages":[{"role":"user","content":"x"}],"max_tokens":1}'
        self.request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer "
            f"{token}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.sock: socket.socket | None = None

    def send(self) -> None:
        """One request and its whole response; reconnects when the server closed the connection."""
        for _ in range(2):
            try:
                sock = self.sock or self._connect()
                sock.sendall(self.request)
                if self._read_response(sock):
                    return
            except OSError:
                pass
            self.close()

    def _connect(self) -> socket.socket:
        raw = socket.create_connection(self.addr, timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self.ctx.wrap_socket(raw, server_hostname=self.addr[0]) if self.ctx else raw
        return self.sock

    @staticmethod
    def _read_response(sock: socket.socket) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            rest += chunk
        return b"connection: close" not in head.lower()

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


def flood_run(r: Running, w: Workload, rate: float) -> dict[str, Any]:
    """Run `w` while 4 paced threads send bad-token requests at `rate` per second in total."""
    ctx = r.extra.get("ctx")
    url = r.extra.get("url") or r.target.url  # type: ignore[union-attr]
    stop = threading.Event()
    counts: list[int] = []

    def flooder(offset: float) -> None:
        client, n, start = RawClient(url, ctx, BAD_TOKEN), 0, time.perf_counter() + offset
        while not stop.is_set():
            if (delay := start + n * 4 / rate - time.perf_counter()) > 0:
                time.sleep(delay)
            client.send()
            n += 1
        client.close()
        counts.append(n)

    threads = [threading.Thread(target=flooder, args=(i / rate,)) for i in range(4)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    out = run_workload(r, w)
    stop.set()
    for t in threads:
        t.join()
    out["flood_rate"] = sum(counts) / (time.perf_counter() - t0)
    return out


# --- the security path ----------------------------------------------------------------------------


def security_path(app: Running, n: int) -> dict[str, Any]:
    """Cached answers (TLS, identity, limits, audit fsync, no model) against bare TLS GETs of /healthz."""
    import httpx

    short = _chat("What is the total?", 8)
    cached: HttpTarget = app.extra["cache"]
    cached.call(short, False)  # the miss that fills the cache
    hits = [cached.call(short, False).latency for _ in range(n)]
    with httpx.Client(base_url=app.extra["url"], verify=app.extra["ctx"]) as c:
        c.get("/healthz")
        bare = []
        for _ in range(n):
            t0 = time.perf_counter()
            c.get("/healthz")
            bare.append(time.perf_counter() - t0)
        metrics = cached.client().get("/metrics").text
    audit_sum = _metric(metrics, "qwa_audit_write_seconds_sum")
    audit_n = _metric(metrics, "qwa_audit_write_seconds_count")
    return {
        "cached_ms": _ms_stats(hits),
        "healthz_ms": _ms_stats(bare),
        "audit_write_mean_ms": 1000 * audit_sum / audit_n if audit_n else None,
        "hit_ratio": _metric(metrics, "qwa_response_cache_hit_ratio"),
    }


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _ms_stats(values: list[float]) -> dict[str, float | None]:
    ms = [v * 1000 for v in values]
    return {"median": statistics.median(ms), "p10": _pct(ms, 10), "p90": _pct(ms, 90)}


def image_sweep(systems: dict[str, Running], sizes: list[int]) -> dict[str, dict[int, Any]]:
    """Latency of one image + question against image size (in-process floor and the appliance)."""
    out: dict[str, dict[int, Any]] = {}
    for name in ("inproc", "appliance"):
        if name not in systems:
            continue
        out[name] = {}
        for size in sizes:
            w = Workload(f"image {size}px", _image_chat(size, 8), 1, 2)
            recs = run_workload(systems[name], w)["records"]
            out[name][size] = _ms_stats([r["latency"] for r in recs if r["ok"]])
    return out


# --- orchestration --------------------------------------------------------------------------------


def start_all(args: argparse.Namespace, work: Path) -> dict[str, Running]:
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    starters: dict[str, Callable[[], Running]] = {
        "inproc": lambda: start_inproc(args, logs),
        "appliance": lambda: start_appliance(args, work, logs),
        "llama_cpp.server": lambda: start_llama_cpp_server(args, logs),
        "llama-server": lambda: start_llama_server(args, logs),
    }
    out: dict[str, Running] = {}
    for name in args.systems:
        print(f"starting {name} ...", flush=True)
        out[name] = starters[name]()
    return out


def stop_all(systems: dict[str, Running]) -> None:
    for r in systems.values():
        if r.proc.poll() is None:
            r.proc.terminate()
    for r in systems.values():
        try:
            r.proc.wait(30)
        except subprocess.TimeoutExpired:
            r.proc.kill()


def run_rounds(
    systems: dict[str, Running], loads: list[Workload], rounds: int, flood_rate: float, gen_requests: int
) -> dict[str, dict[str, Any]]:
    """Every workload on every system, `rounds` times; the system order rotates each round."""
    names = list(systems)
    gen = Workload("flood", _chat("Write a long report about the branch.", 128), 1, gen_requests)
    raw: dict[str, dict[str, Any]] = {n: {} for n in names}
    for rnd in range(rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for w in [*loads, gen]:
            for name in order:
                if w is gen and name == "inproc":
                    continue
                _log(f"round {rnd + 1}/{rounds}: {w.name} on {name}")
                runs = raw[name].setdefault(w.name, {"runs": []})["runs"]
                runs.append(run_workload(systems[name], w))
                if w is gen:
                    flooded = raw[name].setdefault("flood (bad tokens)", {"runs": []})["runs"]
                    flooded.append(flood_run(systems[name], w, flood_rate))
    return raw


def _log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def warm_up(systems: dict[str, Running]) -> None:
    w = Workload("warm-up", _chat("hello", 4), 1, 1)
    for r in systems.values():
        run_workload(r, w)


def machine_facts(args: argparse.Namespace, load_before: str) -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    import llama_cpp

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": args.threads,
        "os": platform.platform(),
        "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__,
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "model": f"{Path(args.model).name} ({Path(args.model).stat().st_size / 1e6:.1f} MB, sha256 "
        f"{_sha256(Path(args.model))[:16]})",
        "mmproj": Path(args.mmproj).name if args.mmproj else None,
        "load_before": load_before,
        "load_after": _loadavg(),
        "parallel": PARALLEL,
        "n_ctx": N_CTX,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _loadavg() -> str:
    """The 1, 5 and 15-minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def wait_quiet(limit_s: float, threshold: float = 0.3, hold_s: float = 30) -> bool:
    """Wait (up to limit_s) until the 1-minute load average stays below threshold for hold_s."""
    deadline, quiet_since = time.monotonic() + limit_s, None
    while time.monotonic() < deadline:
        load = float(Path("/proc/loadavg").read_text().split()[0])
        quiet_since = (quiet_since or time.monotonic()) if load < threshold else None
        if quiet_since is not None and time.monotonic() - quiet_since >= hold_s:
            return True
        time.sleep(2)
    return False


# --- report -----------------------------------------------------------------------------------------


def _fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _cell(
    s: dict[str, Any] | None, key: str, scale: float = 1, digits: int = 0, base: dict[str, Any] | None = None
) -> str:
    if not s or not s.get(key):  # nothing measured (e.g. no text streamed), not a measured zero
        return "-"
    text = (
        f"{_fmt(s[key] * scale, digits)} [{_fmt((s.get(key + '_p10') or 0) * scale, digits)}-"
        f"{_fmt((s.get(key + '_p90') or 0) * scale, digits)}]"
        if s.get(key + "_p10") is not None
        else _fmt(s[key] * scale, digits)
    )
    if base and base.get(key):
        text += f" ({s[key] / base[key]:.2f}x)"
    return text


def _table(
    title: str,
    rows: list[str],
    systems: list[str],
    stats: dict[str, dict[str, Any]],
    key: str,
    scale: float = 1,
    digits: int = 0,
) -> list[str]:
    out = [
        f"\n### {title}\n",
        "| workload | " + " | ".join(systems) + " |",
        "| --- |" + " --- |" * len(systems),
    ]
    for w in rows:
        base = stats.get("inproc", {}).get(w)
        cells = [_cell(stats[s].get(w), key, scale, digits, base if s != "inproc" else None) for s in systems]
        if any(c != "-" for c in cells):
            out.append(f"| {w} | " + " | ".join(cells) + " |")
    return out


def goals(stats: dict[str, dict[str, Any]], sec: dict[str, Any] | None) -> list[str]:
    """Each goal of issue 6 as measured in this run."""

    def get(system: str, w: str, key: str) -> float | None:
        v = stats.get(system, {}).get(w, {}).get(key)
        return float(v) if v is not None else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    app_c1 = ratio(get("appliance", "short c1", "tok_s"), get("inproc", "short c1", "tok_s"))
    srv_c1 = ratio(get("llama-server", "short c1", "tok_s"), get("inproc", "short c1", "tok_s"))
    flood = ratio(get("appliance", "flood (bad tokens)", "tok_s"), get("appliance", "flood", "tok_s"))
    c8 = ratio(get("appliance", "short c8", "tok_s"), get("appliance", "short c1", "tok_s"))
    srv_c8 = ratio(get("llama-server", "short c8", "tok_s"), get("llama-server", "short c1", "tok_s"))
    rate = get("appliance", "flood (bad tokens)", "flood_rate")
    sec_ms = sec["cached_ms"]["median"] if sec else None
    rows = [
        (
            "Throughput at concurrency 1, ratio to in-process: appliance ≥ llama-server and ≥ 0.97",
            f"appliance {_fmt(app_c1, 2)}, llama-server {_fmt(srv_c1, 2)}",
            app_c1 is not None and app_c1 >= 0.97 and (srv_c1 is None or app_c1 >= srv_c1),
        ),
        (
            "Security path < 2 ms median (cached answer: TLS, identity, limits, audit fsync)",
            f"{_fmt(sec_ms, 2)} ms",
            sec_ms is not None and sec_ms < 2,
        ),
        (
            "Bad-token flood slows a generation by < 10%",
            f"{_fmt(None if flood is None else (1 - flood) * 100, 1)}% at {_fmt(rate)} req/s achieved",
            flood is not None and flood > 0.9,
        ),
        (
            "Concurrency 8 aggregate ≥ 3x concurrency 1",
            f"appliance {_fmt(c8, 2)}x, llama-server {_fmt(srv_c8, 2)}x",
            c8 is not None and c8 >= 3,
        ),
    ]
    out = ["\n## Goals\n", "| goal | measured | met |", "| --- | --- | --- |"]
    out += [f"| {g} | {m} | {'yes' if ok else 'no'} |" for g, m, ok in rows]
    return out


def write_markdown(
    path: Path,
    facts: dict[str, Any],
    stats: dict[str, dict[str, Any]],
    extra: dict[str, Any],
    loaded_note: str | None,
) -> None:
    systems = list(stats)
    rows = list(dict.fromkeys(w for s in stats.values() for w in s))
    lines = [
        "# Benchmark results",
        "",
        "Generated by `tools/bench.py` (`make bench`); every number below comes from one run.",
        "",
    ]
    if loaded_note:
        lines += [f"> **{loaded_note}**", ""]
    lines += ["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in facts.items()]
    lines += [
        "",
        "Medians with [p10-p90]; a ratio in parentheses is the system's value divided by "
        "in-process llama-cpp-python's (the floor) in the same run. in-process runs one request at a "
        "time (llama-cpp-python has no batching); the appliance and llama-server decode up to "
        f"{PARALLEL} sequences in one batch. Flood rows are HTTP systems only.",
    ]
    lines += _table("Tokens per second (aggregate over all clients)", rows, systems, stats, "tok_s")
    lines += _table("Latency per request (ms)", rows, systems, stats, "lat", 1000, 1)
    lines += _table("Time to first token (ms, streaming)", rows, systems, stats, "ttft", 1000, 1)
    lines += _table("Requests per second", rows, systems, stats, "req_s", 1, 2)
    lines += [
        "\n### Peak resident memory (MB, process tree)\n",
        "| " + " | ".join(systems) + " |",
        "|" + " --- |" * len(systems),
        "| " + " | ".join(_fmt(extra["rss"].get(s, 0) / 1e6) for s in systems) + " |",
    ]
    lines += _security_lines(extra.get("security")) + _image_lines(extra.get("images", {}))
    lines += _prompt_cache_lines(extra.get("prompt_cache", {}))
    lines += goals(stats, extra.get("security")) + NOTES
    path.write_text("\n".join(lines) + "\n")


NOTES = [
    "\n## How to read this\n",
    "- in-process llama-cpp-python serves one request at a time (its API has no batching), so its "
    "concurrency rows show its own limit, not a floor for batching servers.",
    "- Tokens per second count completion tokens, also those that render as no text. Time to first token "
    "needs a streamed piece with text: a random-weight model whose vocabulary is mostly unused tokens "
    "(the synthetic one) streams none, so its TTFT row is empty.",
    "- llama-server also keeps evicted prompts in a RAM cache (`--cache-ram`), so a long prompt repeated "
    "after other work is still warm there; the appliance reuses prompts only while they sit in a slot.",
    "- Load generator, flood and servers share the same cores: on a 2-core machine every request a "
    "client sends takes CPU from the system under test.",
]


def _security_lines(sec: dict[str, Any] | None) -> list[str]:
    if not sec:
        return []
    c, h = sec["cached_ms"], sec["healthz_ms"]
    return [
        "\n### Security path (appliance)\n",
        "| request | median ms | p10 | p90 |",
        "| --- | --- | --- | --- |",
        "| cached answer (TLS + token + policy + limits + audit fsync + cache) | "
        f"{_fmt(c['median'], 2)} | "
        f"{_fmt(c['p10'], 2)} | {_fmt(c['p90'], 2)} |",
        f"| GET /healthz (TLS + HTTP only, no identity, no audit) | {_fmt(h['median'], 2)} | "
        f"{_fmt(h['p10'], 2)} | {_fmt(h['p90'], 2)} |",
        f"\nAudit record write + fsync, mean over the run: {_fmt(sec['audit_write_mean_ms'], 2)} ms; "
        f"response-cache hit ratio {_fmt(sec['hit_ratio'], 2)}.",
    ]


def prompt_cache_effect(raw: dict[str, dict[str, Any]], workload: str = "shared system") -> dict[str, Any]:
    """First request with a new system prompt (cold) against the later ones (the prefix is cached)."""
    out: dict[str, Any] = {}
    for system, loads in raw.items():
        runs = loads.get(workload, {}).get("runs", [])
        recs = [r["latency"] for run in runs for r in run["records"] if r["ok"]]
        if len(recs) > 1:
            out[system] = {"cold_ms": recs[0] * 1000, "warm_ms": statistics.median(recs[1:]) * 1000}
    return out


def _prompt_cache_lines(effect: dict[str, Any]) -> list[str]:
    if not effect:
        return []
    out = [
        "\n### Prompt cache: the same long system prompt, a new question each time (ms)\n",
        "| system | first request (cold) | later requests (median) | saved |",
        "| --- | --- | --- | --- |",
    ]
    for name, e in effect.items():
        out.append(
            f"| {name} | {_fmt(e['cold_ms'], 1)} | {_fmt(e['warm_ms'], 1)} | "
            f"{_fmt(e['cold_ms'] - e['warm_ms'], 1)} |"
        )
    return out


def _image_lines(images: dict[str, dict[int, Any]]) -> list[str]:
    if not images:
        return []
    images = {name: {int(k): v for k, v in by_size.items()} for name, by_size in images.items()}  # JSON keys
    sizes = sorted({s for v in images.values() for s in v})
    out = [
        "\n### Image latency against image size (ms, 8 answer tokens)\n",
        "| system | " + " | ".join(f"{s}x{s}" for s in sizes) + " |",
        "| --- |" + " --- |" * len(sizes),
    ]
    for name, by_size in images.items():
        out.append(f"| {name} | " + " | ".join(_fmt(by_size[s]["median"], 1) for s in sizes) + " |")
    return out


def write_chart(path: Path, stats: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(stats)
    rows = [w for w in dict.fromkeys(w for s in stats.values() for w in s)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(systems)
    for i, s in enumerate(systems):
        xs = [j + i * width for j in range(len(rows))]
        ax1.bar(xs, [stats[s].get(w, {}).get("tok_s") or 0 for w in rows], width, label=s)
        ax2.bar(xs, [(stats[s].get(w, {}).get("lat") or 0) * 1000 for w in rows], width, label=s)
    for ax, title in ((ax1, "tokens/s (aggregate, median)"), (ax2, "latency per request, ms (median)")):
        ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(rows))])
        ax.set_xticklabels(rows, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- main ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    build = hashlib.sha256(
        b"0.3.36 -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
    ).hexdigest()[:12]
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path, default=ROOT / "models/tiny/tiny-qwen3vl-q8_0.gguf")
    p.add_argument("--mmproj", type=Path, default=ROOT / "models/tiny/tiny-qwen3vl-mmproj.gguf")
    p.add_argument("--no-mmproj", action="store_true", help="text-only model")
    p.add_argument("--threads", type=int, default=1, help="inference threads, the same for every system")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--long-lines",
        type=int,
        default=40,
        help="lines of the long prompt: 40 are about 1.4k tokens for the tiny model, ~120 for a "
        "real Qwen vocabulary",
    )
    p.add_argument(
        "--requests",
        type=int,
        default=12,
        help="requests per workload and round at concurrency 1 (fewer for a slow real model)",
    )
    p.add_argument("--quick", action="store_true", help="2 requests, 1 round (for debugging the harness)")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--flood-rate", type=float, default=1000.0, help="bad-token requests per second")
    p.add_argument(
        "--llama-server",
        default=os.environ.get("LLAMA_SERVER")
        or str(Path.home() / ".cache/qwen-appliance/llama-server" / build / "llama-server"),
    )
    p.add_argument("--out", type=Path, default=ROOT / "docs/bench")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="S",
        help="first wait up to S seconds for a 1-minute load average < 0.3 held for 30 s",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="use (and make once) a 250M-parameter random Qwen3-VL (152k vocabulary, Q4_0): "
        "compute per token like a real small model, unlike the 1.4 MB tiny one",
    )
    p.add_argument(
        "--report-only", action="store_true", help="re-render OUT/results.md and .png from OUT/results.json"
    )
    p.add_argument("--inproc-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.rounds = 2, 1
    if args.no_mmproj:
        args.mmproj = None
    if args.synthetic and not args.inproc_worker:
        args.model, args.mmproj = synthetic_model(ROOT / "models/tiny/bench")
    return args


SYNTHETIC = """
import sys; from pathlib import Path
sys.path.insert(0, "tools")
import make_tiny_model as m
m.N_EMBD, m.N_LAYER, m.N_HEAD, m.N_HEAD_KV, m.N_FF, m.N_VOCAB = 1024, 8, 16, 8, 3072, 151936
m.NAME = "synthetic-250m-qwen3vl"
m.write_atomic(m.text_writer(0, "q4_0"), Path(sys.argv[1]))
m.write_atomic(m.mmproj_writer(0), Path(sys.argv[2]))
"""


def synthetic_model(out: Path) -> tuple[Path, Path]:
    """tools/make_tiny_model.py with a real small model's shape (the appliance venv has gguf + numpy)."""
    model, mmproj = out / "synth250m-q4_0.gguf", out / "synth250m-mmproj.gguf"
    if not (model.is_file() and mmproj.is_file()):
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(APPLIANCE_PY), "-c", SYNTHETIC, str(model), str(mmproj)], check=True, cwd=ROOT)
    return model, mmproj


def report_only(out: Path) -> None:
    data = json.loads((out / "results.json").read_text())
    write_markdown(out / "results.md", data["facts"], data["stats"], data["extra"], data.get("note"))
    write_chart(out / "results.png", data["stats"])


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.inproc_worker:
        inproc_worker(str(args.model), str(args.mmproj) if args.mmproj else None, args.threads)
        return 0
    if args.report_only:
        report_only(args.out)
        return 0
    if "llama-server" in args.systems and not Path(args.llama_server).is_file():
        sys.exit(f"no llama-server at {args.llama_server}: `make bench` builds it, or pass --llama-server")
    quiet = wait_quiet(args.wait_quiet) if args.wait_quiet else None
    load_before = _loadavg()
    work = Path(tempfile.mkdtemp(prefix="qwa-bench-"))
    started = time.monotonic()
    systems = start_all(args, work)
    try:
        rss = RssWatch(systems)
        warm_up(systems)
        raw = run_rounds(
            systems,
            workloads(args.requests, args.long_lines),
            args.rounds,
            args.flood_rate,
            max(2, args.requests // 3),
        )
        extra: dict[str, Any] = {"images": image_sweep(systems, [64, 256, 512, 1024])}
        if "appliance" in systems:
            extra["security"] = security_path(systems["appliance"], 200)
        rss.stop()
        extra["rss"] = rss.peak
        extra["prompt_cache"] = prompt_cache_effect(raw)
    finally:
        stop_all(systems)
    stats = {s: {w: summarize(v) for w, v in raw[s].items()} for s in raw}
    facts = machine_facts(args, load_before)
    facts["run_seconds"] = round(time.monotonic() - started)
    note = None
    if quiet is False or float(load_before.split()[0]) >= 0.3:
        note = (
            f"The machine was not quiet (load average before the run {load_before}): other work ran "
            "meanwhile, so absolute numbers are pessimistic and ratios noisier than usual."
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps(
            {"facts": facts, "stats": stats, "extra": extra, "note": note, "raw": raw}, indent=1, default=str
        )
    )
    write_markdown(args.out / "results.md", facts, stats, extra, note)
    write_chart(args.out / "results.png", stats)
    shutil.rmtree(work, ignore_errors=True)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
