"""Only HTTP passes the gate: any other ASGI scope (websocket, lifespan) never reaches the app."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from appliance.security.gate import Gate


@pytest.mark.parametrize("kind", ["websocket", "lifespan", "something-new"])
def test_non_http_scopes_never_reach_the_app(kind: str) -> None:
    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["type"])

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        return None

    gate = Gate(app, policy=lambda: None, trail=None)  # type: ignore[arg-type]
    asyncio.run(gate({"type": kind, "path": "/v1/models"}, receive, send))
    assert reached == []
