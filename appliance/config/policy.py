"""The typed policy: one frozen dataclass per policy.toml section, built only by appliance.config.load.

Field names are the settings table's keys (appliance.config.settings), so a value travels from the file to
the code that uses it without a hand copy; `with_defaults` builds a section from the table's defaults.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from appliance.config.settings import REQUIRED, Setting, settings_in

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_S = TypeVar("_S", bound="Section")


class Section:
    """A section's dataclass: its table name, and construction from the settings table's defaults."""

    SECTION: ClassVar[str]

    @classmethod
    def with_defaults(cls: type[_S], **values: Any) -> _S:
        """This section with every key not given at its table default (for tests and tools; no validation)."""
        defaults = {
            s.key: tuple(s.default) if isinstance(s.default, list) else s.default
            for s in settings_in(cls.SECTION)
            if s.default is not REQUIRED
        }
        return cls(**{**defaults, **values})


@dataclass(frozen=True)
class Rate:
    """A request budget: `count` requests per `seconds`."""

    count: int
    seconds: int

    def __str__(self) -> str:
        unit = {v: k for k, v in UNIT_SECONDS.items()}[self.seconds]
        return f"{self.count}/{unit}"


@dataclass(frozen=True)
class ServerPolicy(Section):
    SECTION = "server"

    host: str
    port: int
    tls_cert: Path
    tls_key: Path
    client_ca: Path | None
    client_cert: str
    allow: tuple[Network, ...]
    trusted_proxies: tuple[Network, ...]
    revoked: frozenset[str]
    max_connections: int
    max_connections_per_source: int
    handshake_timeout_s: int
    refusal_records_per_second: int


@dataclass(frozen=True)
class ModelPolicy(Section):
    SECTION = "model"

    path: Path
    mmproj: Path | None
    name: str | None
    n_gpu_layers: int
    n_ctx: int
    threads: int
    parallel: int
    prompt_cache: bool
    chat_template: str | None
    data_dir: Path | None
    image_min_tokens: int
    image_max_tokens: int
    require_gpu: bool
    use_mlock: bool
    split_mode: str
    main_gpu: int
    tensor_split: tuple[float, ...]
    sha256: str | None
    mmproj_sha256: str | None


@dataclass(frozen=True)
class LimitsPolicy(Section):
    SECTION = "limits"

    max_body_bytes: int
    max_image_bytes: int
    max_image_pixels: int
    max_images: int
    max_tokens: int
    max_queue: int
    response_cache_entries: int
    response_cache_ttl_s: int


@dataclass(frozen=True)
class AuditPolicy(Section):
    SECTION = "audit"

    dir: Path
    hmac_key_file: Path
    fsync: str
    fsync_interval_ms: int
    rotate_bytes: int
    retention_days: int
    forward: str
    forward_socket: Path | None
    fail_closed: bool


@dataclass(frozen=True)
class HealthPolicy(Section):
    SECTION = "health"

    max_gpu_temp_c: int
    min_audit_free_mb: int
    fail_on_ecc_uncorrected: bool
    gpu_poll_seconds: int


@dataclass(frozen=True)
class Client:
    """One identity: a token, optionally bound to addresses and a certificate."""

    name: str
    token_sha256: str
    scopes: frozenset[str]
    allow: tuple[Network, ...] | None = None
    cert_cn: str | None = None
    cert_sha256: str | None = None
    expires: dt.date | None = None
    rate: Rate | None = None
    token_budget: Rate | None = None
    max_concurrent: int | None = None
    cache: bool = False
    disabled: bool = False


@dataclass(frozen=True)
class Policy:
    """A complete, validated policy; `digest` identifies exactly what was loaded."""

    file: Path
    digest: str
    server: ServerPolicy
    model: ModelPolicy
    limits: LimitsPolicy
    audit: AuditPolicy
    health: HealthPolicy
    clients: tuple[Client, ...]


def setting_value(policy: Policy, setting: Setting) -> Any:
    """The value in force for one table key (`[server] listen` is held as host and port)."""
    section = getattr(policy, setting.section)
    if setting.dotted == "server.listen":
        return (section.host, section.port)
    return getattr(section, setting.key)
