"""The one table of policy keys: it drives parsing, validation, `qwen-appliance settings` and docs.

Every key the daemon reads from policy.toml is declared here once, with its type, default and why it exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

REQUIRED = object()  # marker: the key has no default and must be present


@dataclass(frozen=True)
class Setting:
    """One policy key: where it lives, what it accepts, and what it protects against."""

    section: str
    key: str
    kind: str  # "str" | "int" | "bool" | "path" | "list[str]" | "choice" | "listen"
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}"


def _s(section: str, key: str, kind: str, default: Any, help: str, **kw: Any) -> Setting:
    return Setting(section, key, kind, default, help, **kw)


SETTINGS: tuple[Setting, ...] = (
    # [server]
    _s("server", "listen", "listen", "127.0.0.1:8443",
       "HOST:PORT the HTTPS listener binds; plain HTTP is never offered."),
    _s("server", "tls_cert", "path", REQUIRED, "Server certificate chain (PEM)."),
    _s("server", "tls_key", "path", REQUIRED,
       "Server private key (PEM); must not be readable by group or others."),
    _s("server", "client_ca", "path", None,
       "CA bundle that signs client certificates; required unless client_cert = \"off\"."),
    _s("server", "client_cert", "choice", "required",
       "Mutual TLS: a handshake without a certificate from client_ca fails when \"required\".",
       choices=("required", "optional", "off")),
    _s("server", "allow", "cidrs", ["127.0.0.0/8", "::1/128"],
       "Network gate: peers outside these address ranges are refused (403) before any token is read."),
    _s("server", "trusted_proxies", "cidrs", [],
       "Peers whose X-Forwarded-For header is believed: all its lines, as one list, read from the right "
       "past these proxies (the client's own lines are never trusted); a Forwarded header from them is "
       "refused (403). From anyone else both headers are ignored."),
    _s("server", "revoked", "hexlist", [],
       "Client certificates refused even though the CA signed them: the SHA-256 of each as issued (`openssl "
       "x509 -fingerprint -sha256`, `cert list` sha256) or of its signed part (`cert list` tbs sha256, the "
       "trail's cert_sha256); either matches every re-encoding of that certificate."),
    _s("server", "max_connections", "int", 1000,
       "TCP connections held at once (TLS handshakes included); more are closed at once, counted and "
       "logged, so idle sockets cannot use up the process's file descriptors (LimitNOFILE must be higher).",
       minimum=1, maximum=100_000),
    _s("server", "max_connections_per_source", "int", 64,
       "TCP connections one source address may hold at once, so one host cannot take them all; behind a "
       "proxy (trusted_proxies) every client shares the proxy's address: raise it to max_connections.",
       minimum=1, maximum=100_000),
    _s("server", "handshake_timeout_s", "int", 10,
       "Seconds a new connection has to complete its TLS handshake; silent sockets are closed after it.",
       minimum=1, maximum=60),
    _s("server", "refusal_records_per_second", "int", 20,
       "Refusal audit records per source address and second; the rest are counted "
       "(qwa_refusal_records_suppressed_total) and summarised in one record per source and second.",
       minimum=1, maximum=10_000),
    # [model]
    _s("model", "path", "path", REQUIRED, "The Qwen3-VL text model GGUF file."),
    _s("model", "mmproj", "path", None,
       "Its vision projector GGUF; without it the model serves text only and refuses images."),
    _s("model", "name", "str", None, "Model name shown in /v1/models; default: the GGUF file stem."),
    _s("model", "n_gpu_layers", "int", -1,
       "Layers offloaded to the GPU: -1 all (when the build has CUDA), 0 none.", minimum=-1),
    _s("model", "n_ctx", "int", 4096,
       "Context window in tokens: prompt, image tokens and answer together.",
       minimum=256, maximum=262144),
    _s("model", "threads", "int", 0, "CPU threads for inference; 0 picks a value for this host.",
       minimum=0, maximum=256),
    _s("model", "parallel", "int", 4,
       "Requests decoded together in one batch (slots); each has its own n_ctx, so the KV cache holds "
       "parallel x n_ctx tokens. More waiting requests queue (max_queue).", minimum=1, maximum=16),
    _s("model", "prompt_cache", "bool", True,
       "Reuse a slot's already evaluated prompt prefix: across clients only template and system text "
       "(a timing side channel could otherwise reveal another client's document), in full for the same "
       "client."),
    _s("model", "chat_template", "str", None,
       "Jinja chat template overriding the one embedded in the GGUF."),
    _s("model", "data_dir", "path", None,
       "Directory whose files /api/v1/chat may name as \"image\" (the guide's /secure_data); "
       "paths outside it are refused."),
    _s("model", "image_min_tokens", "int", 0,
       "Lower bound of tokens one image becomes (0 = llama.cpp default).", minimum=0),
    _s("model", "image_max_tokens", "int", 1024,
       "Upper bound of tokens one image becomes: larger images are scaled down to it before encoding, "
       "which bounds how long every other request waits while one image is encoded (0 = llama.cpp's "
       "default, 4096 for Qwen-VL: over ten times the encoder time).", minimum=0),
    _s("model", "require_gpu", "bool", False,
       "Refuse to start unless layers are really offloaded to a GPU, instead of running on the CPU."),
    _s("model", "use_mlock", "bool", False,
       "Lock weights and KV cache in RAM so customer context never reaches swap (needs LimitMEMLOCK)."),
    _s("model", "split_mode", "choice", "layer",
       "How llama.cpp spreads the model over several GPUs.", choices=("none", "layer", "row")),
    _s("model", "main_gpu", "int", 0, "GPU used for the model (split_mode none) or scratch.",
       minimum=0, maximum=63),
    _s("model", "tensor_split", "floats", [],
       "Share of the model per GPU, e.g. [3, 1]; empty lets llama.cpp decide."),
    _s("model", "sha256", "str", None,
       "Expected SHA-256 of the model file; start-up refuses a file that differs."),
    _s("model", "mmproj_sha256", "str", None,
       "Expected SHA-256 of the mmproj file; start-up refuses a file that differs."),
    # [limits]
    _s("limits", "max_body_bytes", "int", 20_000_000,
       "Largest request body; bigger bodies get 413 before they are parsed.", minimum=1024),
    _s("limits", "max_image_bytes", "int", 10_000_000,
       "Largest encoded image; bigger images get 413.", minimum=1),
    _s("limits", "max_image_pixels", "int", 16_000_000,
       "Largest decoded image (width x height); guards against decompression bombs.", minimum=1),
    _s("limits", "max_images", "int", 8, "Most images in one request.", minimum=0),
    _s("limits", "max_tokens", "int", 2048,
       "Most completion tokens one request may ask for.", minimum=1),
    _s("limits", "max_queue", "int", 16,
       "Requests waiting for the engine; beyond this clients get 503 with Retry-After.",
       minimum=1),
    _s("limits", "response_cache_entries", "int", 256,
       "Answers kept in memory for clients with cache = true (0 turns the cache off).", minimum=0,
       maximum=100_000),
    _s("limits", "response_cache_ttl_s", "int", 300,
       "Seconds a cached answer may be served again.", minimum=1, maximum=86400),
    # [audit]
    _s("audit", "dir", "path", "audit",
       "Directory of the JSON Lines audit trail (0700; files 0600)."),
    _s("audit", "hmac_key_file", "path", "audit.key",
       "Key for the HMAC digests of prompts and images (0600); without it nothing can be correlated."),
    _s("audit", "fsync", "choice", "always",
       "\"always\": every record is on disk before the response; \"interval\" is faster but a power "
       "cut can lose the last fsync_interval_ms of records.", choices=("always", "interval")),
    _s("audit", "fsync_interval_ms", "int", 1000,
       "Longest time between fsyncs when fsync = \"interval\".", minimum=1, maximum=60000),
    _s("audit", "rotate_bytes", "int", 100_000_000,
       "Size at which a file is sealed and a new one started (also at UTC midnight).",
       minimum=4096),
    _s("audit", "retention_days", "int", 30,
       "Files older than this are deleted (each deletion is itself recorded).", minimum=1),
    _s("audit", "forward", "choice", "none",
       "Also send each record to the local journald or syslog socket, so the host's existing forwarding "
       "(journal-upload, rsyslog) carries it to the bank's SIEM; the daemon opens no network connection.",
       choices=("none", "journald", "syslog")),
    _s("audit", "forward_socket", "path", None,
       "Socket for forward; default /run/systemd/journal/socket (journald) or /dev/log (syslog)."),
    _s("audit", "fail_closed", "bool", True,
       "Refuse requests with 503 while records cannot be written; false serves without an audit trail."),
    # [health]
    _s("health", "max_gpu_temp_c", "int", 90,
       "/readyz answers 503 while a GPU is hotter than this.", minimum=40, maximum=120),
    _s("health", "min_audit_free_mb", "int", 512,
       "/readyz answers 503 while the audit directory's disk has less free space than this.",
       minimum=0),
    _s("health", "fail_on_ecc_uncorrected", "bool", True,
       "/readyz answers 503 while a GPU reports uncorrected ECC errors (answers may be corrupt)."),
    _s("health", "gpu_poll_seconds", "int", 10, "How often NVML is read.", minimum=1, maximum=3600),
    # [[clients]]
    _s("clients", "name", "str", REQUIRED, "Client identity, shown in logs and the audit trail."),
    _s("clients", "token_sha256", "str", REQUIRED,
       "SHA-256 (hex) of the client's bearer token; the token itself is never stored."),
    _s("clients", "scopes", "list[str]", ["chat"],
       "What the client may do: chat, models, metrics, admin.",
       choices=("chat", "models", "metrics", "admin")),
    _s("clients", "allow", "cidrs", None,
       "Address ranges this client may connect from; each must lie inside [server] allow."),
    _s("clients", "cert_cn", "str", None,
       "Subject CN the client's TLS certificate must carry; a stolen token alone is not enough."),
    _s("clients", "cert_sha256", "hex", None,
       "The one TLS certificate this client must present (stricter than cert_cn): its SHA-256 as issued "
       "(`cert list` sha256) or of its signed part (tbs sha256); re-encodings of it count as the same."),
    _s("clients", "expires", "date", None,
       "Last day (UTC) the token is accepted, e.g. 2027-03-01; afterwards it gets 401."),
    _s("clients", "rate", "rate", None,
       "Requests allowed per client, e.g. \"60/minute\"; more get 429 with Retry-After."),
    _s("clients", "token_budget", "rate", None,
       "Tokens one client may spend, e.g. \"100000/hour\": a request costs its prompt and image tokens plus "
       "max_tokens (answer tokens it did not use are given back). Bounds cost where `rate` only counts: "
       "over it, 429 with Retry-After; a request costing more than the whole budget, 413."),
    _s("clients", "max_concurrent", "int", None,
       "Requests one client may have in flight at once; more get 429.", minimum=1),
    _s("clients", "cache", "bool", False,
       "Serve this client's repeated deterministic requests (temperature 0 or a fixed seed) from an "
       "in-memory answer cache; never shared with another client."),
    _s("clients", "disabled", "bool", False,
       "Switch a client off without deleting it; its token then gets 401."),
)

SECTIONS = ("server", "model", "limits", "audit", "health", "clients")


# One TOML line per key, shown in `qwen-appliance settings` and docs/policy.md.
EXAMPLES = {
    "server.listen": 'listen = "0.0.0.0:8443"',
    "server.tls_cert": 'tls_cert = "tls/server.crt"',
    "server.tls_key": 'tls_key = "tls/server.key"',
    "server.client_ca": 'client_ca = "tls/ca.crt"',
    "server.client_cert": 'client_cert = "required"',
    "server.allow": 'allow = ["192.168.10.0/24"]',
    "server.trusted_proxies": 'trusted_proxies = ["192.168.10.2/32"]',
    "server.revoked": 'revoked = ["3f2a...64 hex digits"]',
    "server.max_connections": "max_connections = 1000",
    "server.max_connections_per_source": "max_connections_per_source = 64",
    "server.handshake_timeout_s": "handshake_timeout_s = 10",
    "server.refusal_records_per_second": "refusal_records_per_second = 20",
    "model.path": 'path = "/var/lib/qwen-appliance/models/Qwen3-VL-4B-Instruct-Q4_K_M.gguf"',
    "model.mmproj": 'mmproj = "/var/lib/qwen-appliance/models/mmproj-Qwen3-VL-4B-Instruct-F16.gguf"',
    "model.name": 'name = "qwen3-vl-4b"',
    "model.n_gpu_layers": "n_gpu_layers = -1",
    "model.n_ctx": "n_ctx = 8192",
    "model.threads": "threads = 8",
    "model.parallel": "parallel = 8",
    "model.prompt_cache": "prompt_cache = true",
    "model.chat_template": 'chat_template = "{% for m in messages %}...{% endfor %}"',
    "model.data_dir": 'data_dir = "/secure_data"',
    "model.image_min_tokens": "image_min_tokens = 256",
    "model.image_max_tokens": "image_max_tokens = 1024",
    "model.require_gpu": "require_gpu = true",
    "model.use_mlock": "use_mlock = true",
    "model.split_mode": 'split_mode = "layer"',
    "model.main_gpu": "main_gpu = 0",
    "model.tensor_split": "tensor_split = [3, 1]",
    "model.sha256": 'sha256 = "9b1c...64 hex digits"',
    "model.mmproj_sha256": 'mmproj_sha256 = "77ad...64 hex digits"',
    "limits.max_body_bytes": "max_body_bytes = 20_000_000",
    "limits.max_image_bytes": "max_image_bytes = 10_000_000",
    "limits.max_image_pixels": "max_image_pixels = 16_000_000",
    "limits.max_images": "max_images = 4",
    "limits.max_tokens": "max_tokens = 2048",
    "limits.max_queue": "max_queue = 16",
    "limits.response_cache_entries": "response_cache_entries = 1024",
    "limits.response_cache_ttl_s": "response_cache_ttl_s = 600",
    "audit.dir": 'dir = "/var/log/qwen-appliance"',
    "audit.hmac_key_file": 'hmac_key_file = "/etc/qwen-appliance/audit.key"',
    "audit.fsync": 'fsync = "always"',
    "audit.fsync_interval_ms": "fsync_interval_ms = 200",
    "audit.rotate_bytes": "rotate_bytes = 100_000_000",
    "audit.retention_days": "retention_days = 90",
    "audit.forward": 'forward = "journald"',
    "audit.forward_socket": 'forward_socket = "/run/systemd/journal/socket"',
    "audit.fail_closed": "fail_closed = true",
    "health.max_gpu_temp_c": "max_gpu_temp_c = 85",
    "health.min_audit_free_mb": "min_audit_free_mb = 1024",
    "health.fail_on_ecc_uncorrected": "fail_on_ecc_uncorrected = true",
    "health.gpu_poll_seconds": "gpu_poll_seconds = 10",
    "clients.name": 'name = "teller-03"',
    "clients.token_sha256": 'token_sha256 = "e3b0...64 hex digits"',
    "clients.scopes": 'scopes = ["chat"]',
    "clients.allow": 'allow = ["192.168.10.23/32"]',
    "clients.cert_cn": 'cert_cn = "teller-03.branch.local"',
    "clients.cert_sha256": 'cert_sha256 = "5d41...64 hex digits"',
    "clients.expires": "expires = 2027-03-01",
    "clients.rate": 'rate = "60/minute"',
    "clients.token_budget": 'token_budget = "100000/hour"',
    "clients.max_concurrent": "max_concurrent = 2",
    "clients.cache": "cache = true",
    "clients.disabled": "disabled = false",
}


def settings_in(section: str) -> tuple[Setting, ...]:
    """The keys of one section, in table order."""
    return tuple(s for s in SETTINGS if s.section == section)


def _default(s: Setting) -> str:
    if s.default is REQUIRED:
        return "required"
    if s.default is None:
        return "unset"
    return json.dumps(s.default)


def describe() -> str:
    """Human-readable table of every key, for `qwen-appliance settings`."""
    lines = []
    for s in SETTINGS:
        lines.append(f"{s.dotted:<26} {s.kind:<9} default {_default(s)}\n    {s.help}\n"
                     f"    e.g. {EXAMPLES[s.dotted]}")
    return "\n".join(lines)


_KIND_NAMES = {"str": "string", "int": "integer", "bool": "boolean", "path": "path",
               "list[str]": "list of strings", "choice": "string", "listen": "HOST:PORT",
               "cidrs": "list of CIDR ranges", "hex": "SHA-256 hex", "hexlist": "list of SHA-256 hex",
               "date": "TOML date", "rate": "N/unit", "floats": "list of numbers"}


def markdown() -> str:
    """docs/policy.md, generated from this table so the documentation cannot drift from the code."""
    out = [DOC_HEADER]
    for section in SECTIONS:
        title = "[[clients]]" if section == "clients" else f"[{section}]"
        out += [f"\n## `{title}`\n", "| key | type | default | example | what it protects |",
                "| --- | --- | --- | --- | --- |"]
        for s in settings_in(section):
            kind = _KIND_NAMES[s.kind] + (f" ({' / '.join(s.choices)})" if s.choices else "")
            out.append(f"| `{s.key}` | {kind} | `{_default(s)}` | `{EXAMPLES[s.dotted]}` | "
                       f"{s.help} |")
    return "\n".join(out) + "\n"


DOC_HEADER = """# policy.toml

The one file that says who may use the appliance and how. Written by `qwen-appliance init`, edited by the
branch admin, re-read without a restart on `systemctl reload qwen-appliance` (SIGHUP) or when its contents
change. An invalid policy is refused as a whole: at start-up the daemon does not start; on reload the old
policy stays in force and the log names the file, the key and a hint. Unknown sections and keys are errors,
never ignored. Relative paths resolve against the policy file's directory.

Check a file without starting anything: `qwen-appliance policy check FILE` (exit 0, or 2 with every problem
listed). This page is generated from the settings table in `appliance/config/settings.py`
(`qwen-appliance settings --markdown`); a test fails when they differ.

Changes that need a restart (the daemon logs a warning on reload): `[server] listen`, anything in `[model]`,
and raising `[limits] max_body_bytes`. Everything else applies to the next request; requests already running
finish under the policy they started with.

How a request is judged, in order: the network gate (`[server] allow`, from the socket address; a
`X-Forwarded-For` header counts only from `trusted_proxies`) → the TLS client certificate (verified against
`client_ca` in the handshake; refused if listed in `revoked`) → the bearer token (selects the client by the
SHA-256 of the token, compared in constant time) → that client's `disabled`, `expires`, `allow`,
`cert_cn` / `cert_sha256`, the route's scope → `rate` and `max_concurrent` → the body and image limits →
`token_budget` (once the prompt is tokenized, beside the engine). Unknown, disabled or expired tokens get
401; the right token from the wrong address or certificate, or without the scope, 403; over the rate,
concurrency or token budget, 429 with `Retry-After`."""
