"""Bearer tokens: generated with the OS CSPRNG, stored only as SHA-256, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from appliance.config.policy import Client

PREFIX = "qwa_"


def new_token() -> str:
    """A 256-bit random token; the prefix lets secret scanners and admins recognise it."""
    return PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def find_client(clients: tuple[Client, ...], presented: str) -> Client | None:
    """Match a presented token against every client without an early exit, so timing reveals nothing."""
    digest = token_digest(presented).encode("ascii")
    found: Client | None = None
    for client in clients:
        if hmac.compare_digest(digest, client.token_sha256.encode("ascii")):
            found = client
    return found
