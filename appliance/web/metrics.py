"""Prometheus metrics (GET /metrics, scope `metrics`): traffic, refusals, queue, speed, audit, reloads, GPU.

A private registry, so nothing from other libraries leaks in; label values are bounded (known routes and
client names from the policy only), never request content.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from appliance.web.routes import ROUTES, routes_for

KNOWN_ROUTES = frozenset(r.path for r in ROUTES)  # the route table's paths; anything else is "other"
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def route_label(path: str) -> str:
    """The table row a path belongs to (a console file counts as its row), else "other": bounded."""
    rows = routes_for(path)
    return rows[0].path if rows else "other"


class Metrics:
    """All instruments of one daemon; the request path calls the `observe_*` methods."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._traffic(r)
        self._generation(r)
        self._cache(r)
        self._upkeep(r)
        self._connections(r)
        self._host(r)

    def _traffic(self, r: CollectorRegistry) -> None:
        """Responses by route and status, refusals by reason."""
        self.requests = Counter(
            "qwa_requests_total",
            "Responses by route, status and client",
            ["route", "status", "client"],
            registry=r,
        )
        self.refusals = Counter("qwa_refusals_total", "Refused requests by reason", ["reason"], registry=r)

    def _generation(self, r: CollectorRegistry) -> None:
        """The engine's queue, speed and token counts."""
        self.queue_depth = Gauge("qwa_queue_depth", "Requests waiting for the engine", registry=r)
        self.queue_wait = Histogram(
            "qwa_queue_wait_seconds", "Time waiting for the engine", buckets=_LATENCY, registry=r
        )
        self.ttft = Histogram(
            "qwa_time_to_first_token_seconds", "From admission to first token", buckets=_LATENCY, registry=r
        )
        self.tps = Histogram(
            "qwa_tokens_per_second",
            "Decode speed of finished generations",
            buckets=(1, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 5000),
            registry=r,
        )
        self.prompt_tokens = Counter("qwa_prompt_tokens_total", "Prompt tokens (images included)", registry=r)
        self.completion_tokens = Counter("qwa_completion_tokens_total", "Completion tokens", registry=r)
        self.images = Counter("qwa_images_total", "Images accepted", registry=r)
        self.cancelled = Counter(
            "qwa_cancelled_total",
            "Requests whose client left before their first token, by stage: "
            "queued (never reached the engine) or running (prefill)",
            ["stage"],
            registry=r,
        )
        self.prompt_cached = Counter(
            "qwa_prompt_cached_tokens_total",
            "Prompt tokens whose KV was reused instead of evaluated",
            registry=r,
        )

    def _cache(self, r: CollectorRegistry) -> None:
        """The response cache."""
        self.response_cache = Counter(
            "qwa_response_cache_total", "Response cache lookups by result", ["result"], registry=r
        )
        self.response_cache_ratio = Gauge(
            "qwa_response_cache_hit_ratio", "Response cache hits / lookups since start", registry=r
        )
        self.response_cache_entries = Gauge(
            "qwa_response_cache_entries", "Answers held in memory", registry=r
        )
        self.intake = Histogram(
            "qwa_intake_seconds", "Request parsing and image decoding time", buckets=_LATENCY, registry=r
        )

    def _upkeep(self, r: CollectorRegistry) -> None:
        """The audit trail's writes and the policy reloads."""
        self.audit_write = Histogram(
            "qwa_audit_write_seconds",
            "Audit record write + fsync",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 1),
            registry=r,
        )
        self.audit_failures = Counter("qwa_audit_failures_total", "Audit records not written", registry=r)
        self.reloads = Counter("qwa_policy_reloads_total", "Policy reloads", ["outcome"], registry=r)

    def _connections(self, r: CollectorRegistry) -> None:
        """What is shed or refused below the gate, and the refusals not audited one by one."""
        self.connections_open = Gauge(
            "qwa_connections_open", "TCP connections held (TLS handshake included)", registry=r
        )
        self.connections_shed = Counter(
            "qwa_connections_shed_total",
            "Connections closed below HTTP, by reason (total_cap, source_cap, handshake_timeout)",
            ["reason"],
            registry=r,
        )
        self.server_refusals = Counter(
            "qwa_server_refusals_total",
            "Requests refused by the HTTP layer before the gate (malformed, upgrade, headers, stale TLS)",
            ["reason"],
            registry=r,
        )
        self.refusal_records_suppressed = Counter(
            "qwa_refusal_records_suppressed_total",
            "Refusals over the per-source audit budget: "
            "counted here and summarised in the trail instead of one record each",
            registry=r,
        )

    def _host(self, r: CollectorRegistry) -> None:
        """Certificate expiry and the GPU."""
        self.cert_days = Gauge(
            "qwa_certificate_expiry_days", "Days until a certificate expires", ["certificate"], registry=r
        )
        self.gpu = Gauge("qwa_gpu", "GPU figures from NVML", ["index", "figure"], registry=r)
        self.gpu_available = Gauge("qwa_gpu_available", "1 when NVML reports a GPU", registry=r)

    def observe_response(self, route: str, status: int, client: str | None, reason: str | None) -> None:
        self.requests.labels(route_label(route), str(status), client or "-").inc()
        if status >= 400 and reason:
            self.refusals.labels(reason.split(":", 1)[0]).inc()

    def observe_generation(
        self,
        queue_s: float,
        ttft_s: float | None,
        decode_s: float,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
    ) -> None:
        self.queue_wait.observe(queue_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if completion_tokens > 1 and decode_s > 0:
            self.tps.observe((completion_tokens - 1) / decode_s)
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        self.prompt_cached.inc(cached_tokens)

    def observe_cache(self, hit: bool, hit_ratio: float, entries: int) -> None:
        """One response-cache lookup (only for clients with cache = true and deterministic requests)."""
        self.response_cache.labels("hit" if hit else "miss").inc()
        self.response_cache_ratio.set(hit_ratio)
        self.response_cache_entries.set(entries)

    def observe_gpu(self, snapshot: dict[str, Any]) -> None:
        self.gpu_available.set(1 if snapshot.get("available") else 0)
        for dev in snapshot.get("devices", []) or []:
            for figure in (
                "memory_used_mb",
                "memory_total_mb",
                "utilization_gpu_pct",
                "temperature_c",
                "power_w",
                "ecc_uncorrected_volatile",
            ):
                value = dev.get(figure)
                if isinstance(value, int | float):
                    self.gpu.labels(str(dev.get("index")), figure).set(value)

    def render(self, refresh: Callable[[], None] | None = None) -> bytes:
        if refresh is not None:
            refresh()
        return generate_latest(self.registry)
