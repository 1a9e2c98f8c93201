"""What every handler shares: the Runtime built once at start-up, and the one way to answer with JSON.

Its own module so that the handler modules (chat, health, openapi) and the app that lists them need no
import cycle.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from litestar import Request, Response

from appliance.audit.record import Trail
from appliance.config.policy import Policy
from appliance.engine.gpu import GpuMonitor
from appliance.engine.scheduler import Scheduler
from appliance.engine.types import ModelInfo
from appliance.security import state
from appliance.security.ratelimit import TokenBudgets
from appliance.security.state import RequestState
from appliance.web import images
from appliance.web.cache import ResponseCache
from appliance.web.intake import IntakeRules
from appliance.web.intake_pool import IntakePool, default_workers
from appliance.web.metrics import Metrics


@dataclass
class Runtime:
    """Everything a request handler needs, built once at start-up."""

    policy: Policy
    model: ModelInfo
    scheduler: Scheduler
    trail: Trail
    metrics: Metrics = field(default_factory=Metrics)
    gpu: GpuMonitor | None = None
    policy_loaded_at: float = field(default_factory=time.time)
    draining: bool = False
    cache: ResponseCache = field(default_factory=lambda: ResponseCache(0, 1))
    budgets: TokenBudgets = field(default_factory=TokenBudgets)  # per client; survives reloads
    intake: IntakePool = field(init=False)  # decoding and tokenizing: bounded, on its own threads

    def __post_init__(self) -> None:
        self._configure_cache(self.policy)
        self.intake = IntakePool(default_workers(self.model.parallel))

    def _configure_cache(self, policy: Policy) -> None:
        self.cache.configure(
            policy.limits.response_cache_entries,
            policy.limits.response_cache_ttl_s,
            [c.name for c in policy.clients if c.cache],
        )

    def gpu_snapshot(self) -> dict[str, Any]:
        return (
            self.gpu.snapshot()
            if self.gpu is not None
            else {"available": False, "reason": "GPU monitor not started"}
        )

    def apply_policy(self, policy: Policy) -> None:
        """Swap in a reloaded policy; requests already admitted keep their snapshot."""
        self.policy = policy
        self.policy_loaded_at = time.time()
        self.scheduler.max_queue = policy.limits.max_queue
        self._configure_cache(policy)

    def rules(self, policy: Policy) -> IntakeRules:
        """Intake limits from the policy snapshot the request was admitted under."""
        lim, mdl = policy.limits, policy.model
        return IntakeRules(
            model_name=self.model.name,
            max_tokens=lim.max_tokens,
            max_images=lim.max_images,
            images_allowed=self.model.supports_images,
            n_ctx=self.model.n_ctx,
            max_token_bytes=self.model.max_token_bytes,
            image_token_pixels=self.model.image_token_pixels,
            image_min_tokens=self.model.image_min_tokens,
            image_limits=images.ImageLimits(
                lim.max_image_bytes, lim.max_image_pixels, mdl.data_dir, self.model.image_max_pixels
            ),
        )


def runtime(request: Request[Any, Any, Any]) -> Runtime:
    """The daemon's Runtime, from the app that dispatched this request."""
    rt: Runtime = request.app.state.runtime
    return rt


def request_state(request: Request[Any, Any, Any]) -> RequestState:
    """What the gate recorded for this request (its id, policy snapshot, caller)."""
    return state.of(request.scope)


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(
        content=json.dumps(payload).encode(),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )
