"""What the audit trail says about one request: who, from where, what outcome; never the content.

The gate writes a record before a response's first byte (and a completion record before a stream's end);
with fail_closed, a record that cannot be written turns the response into a 503.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from appliance.audit.log import AuditLog, AuditUnavailable, Hmac
from appliance.engine.types import Message, RGBImage
from appliance.security.state import find
from appliance.web.metrics import Metrics

log = logging.getLogger("appliance.audit.record")
MAX_ROUTE = 200


class Trail:
    """Async front of the audit log for the request path: writes run off the event loop, on the trail's
    own thread (one: the log is append-only and fsynced under one lock anyway), so no other work queued
    on a shared pool (image decoding, tokenizing) ever delays a record, or the answer waiting for it."""

    def __init__(
        self, audit: AuditLog, hmac: Hmac, fail_closed: bool, metrics: Metrics | None = None
    ) -> None:
        self.audit = audit
        self.hmac = hmac
        self.fail_closed = fail_closed
        self.metrics = metrics
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="audit")

    @property
    def failing(self) -> str | None:
        return self.audit.failing

    async def write(self, event: str, **fields: Any) -> None:
        """Write one record; raises AuditUnavailable only when the policy says to fail closed."""
        try:
            write = functools.partial(self.audit.write, event, **fields)
            await asyncio.get_running_loop().run_in_executor(self._writer, write)
            if self.metrics is not None:
                self.metrics.audit_write.observe(self.audit.write_seconds)
        except AuditUnavailable:
            if self.metrics is not None:
                self.metrics.audit_failures.inc()
            if self.fail_closed:
                raise
            log.error(
                "audit record %s for request %s LOST (fail_closed = false)", event, fields.get("request_id")
            )

    def close(self) -> None:
        """Let the records already handed over finish; then the writer thread ends."""
        self._writer.shutdown(wait=True)

    async def complete(self, scope: MutableMapping[str, Any], reason: str | None = None) -> bool:
        """Write a stream's completion record once; False when it could not be (the stream must not end
        as a success). Never raises, so nothing reaches the ASGI server from here."""
        state = find(scope)
        if state is None or not state.stream_open:
            return True
        state.stream_open = False
        if reason is not None:
            state.audit_reason = reason
        try:
            await self.write("request.complete", **self.request_fields(scope, 200))
        except AuditUnavailable:
            log.error(
                "request %s: stream completion record NOT written; the stream ends with an error",
                state.request_id,
            )
            return False
        return True

    def request_fields(self, scope: MutableMapping[str, Any], status: int) -> dict[str, Any]:
        """The content-free facts of a request, from what the gate and the handler left in its state."""
        state = find(scope)
        caller = state.caller if state is not None else None
        peer = (scope.get("client") or ("", 0))[0]
        cert = caller.cert if caller is not None else None
        return {
            "request_id": state.request_id if state is not None else None,
            "client": caller.client.name if caller is not None and caller.client else None,
            # SHA-256 of the certificate's signed part (tls.PeerCert.sha256): one value for every encoding
            "cert_sha256": cert["cert_sha256"] if cert else None,
            "source_ip": caller.ip if caller is not None else peer,
            "method": scope.get("method"),
            "route": _route(scope)[:MAX_ROUTE],
            "status": status,
            "reason": state.audit_reason if state is not None else None,
            "duration_ms": round((time.monotonic() - state.t0) * 1000, 1) if state is not None else 0.0,
            **(state.audit if state is not None else {}),
        }

    def describe_input(self, messages: tuple[Message, ...], model_sha256: str) -> dict[str, Any]:
        """Digests and sizes of a request's prompt and images, for correlation without content."""
        text = "\n".join(p for m in messages for p in m.parts if isinstance(p, str))
        images = [img for m in messages for img in m.images]
        return {
            "model_sha256": model_sha256,
            "prompt_hmac": self.hmac.text(text),
            "images": [_image_facts(i) for i in images] or None,
            "image_hmac": [self.hmac.image(i.source_sha256) for i in images] or None,
        }


def _route(scope: MutableMapping[str, Any]) -> str:
    """The path as the client spelled it (raw bytes, not decoded), so a spelling trick shows."""
    raw = scope.get("raw_path")
    return bytes(raw).decode("ascii", "backslashreplace") if raw is not None else str(scope.get("path", ""))


def _image_facts(img: RGBImage) -> dict[str, Any]:
    return {"width": img.width, "height": img.height, "bytes": img.source_bytes, "format": img.source_format}


__all__ = ["AuditUnavailable", "Trail"]
