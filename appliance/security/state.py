"""What one request carries from the gate through the handlers to its audit record: one typed object.

The gate creates it under one key of the ASGI scope's "state"; handlers and the audit trail read it
there, so every field is checked by mypy instead of travelling as a string key.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from appliance.config.policy import Client, Policy
from appliance.security.identity import Caller

KEY = "qwen_appliance.request"  # the one key of scope["state"] this project uses


@dataclass
class RequestState:
    """The facts of one request that outlive a function call: set by the gate, the handlers, the trail."""

    request_id: str
    policy: Policy  # the snapshot admitted under: a reload never changes it midway
    t0: float = field(default_factory=time.monotonic)
    caller: Caller | None = None  # the address and certificate judged, then the identified client
    audit_reason: str | None = None  # why it was refused or failed, for the record and the metrics
    stream_open: bool = False  # a stream's completion record is still owed
    audit: dict[str, Any] = field(default_factory=dict)  # content-free facts the handler adds

    @property
    def client(self) -> Client | None:
        """The identified client, once the token was accepted (or named a disabled or expired one)."""
        return self.caller.client if self.caller is not None else None

    @property
    def client_name(self) -> str | None:
        client = self.client
        return client.name if client is not None else None


def begin(scope: MutableMapping[str, Any], request_id: str, policy: Policy) -> RequestState:
    """Attach a fresh state to a request's scope (the gate does, first thing)."""
    state = RequestState(request_id, policy)
    scope.setdefault("state", {})[KEY] = state
    return state


def find(scope: Mapping[str, Any]) -> RequestState | None:
    """The request's state, or None for a scope the gate never saw."""
    state = (scope.get("state") or {}).get(KEY)
    return state if isinstance(state, RequestState) else None


def of(scope: Mapping[str, Any]) -> RequestState:
    """The request's state, for code that only runs behind the gate."""
    state = find(scope)
    if state is None:
        raise RuntimeError("request state missing: this request did not pass the gate")
    return state
