"""The one table of policy keys: it drives parsing, validation, `qwen-appliance settings` and docs.

Every key the daemon reads from policy.toml is declared here once: type, default, example, whether it needs a
restart, and why it exists.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from typing import Any, Literal

REQUIRED = object()  # marker: the key has no default and must be present
# Whether a reload applies the key: "no" restart needed, any "change" needs one, or only a "raise" of it.
Restart = Literal["no", "change", "raise"]


@dataclass(frozen=True)
class Setting:
    """One policy key: where it lives, what it accepts, an example, whether a reload applies it, and why."""

    section: str
    key: str
    kind: str  # "str" | "int" | "bool" | "path" | "list[str]" | "choice" | "listen"
    default: Any
    help: str
    example: str  # a TOML value, shown as `key = example` in `qwen-appliance settings` and docs/policy.md
    restart: Restart = "no"
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def example_line(self) -> str:
        return f"{self.key} = {self.example}"


def _s(section: str, key: str, kind: str, default: Any, help: str, *, example: str, **kw: Any) -> Setting:
    return Setting(section, key, kind, default, help, example, **kw)


# A table: one key a row reads better than one value a line.
# fmt: off
SETTINGS: tuple[Setting, ...] = (
    # [server]
    _s("server", "listen", "listen", "127.0.0.1:8443",
       "HOST:PORT the HTTPS listener binds; plain HTTP is never offered.",
       example='"0.0.0.0:8443"', restart="change"),
    _s("server", "tls_cert", "path", REQUIRED, "Server certificate chain (PEM).", example='"tls/server.crt"'),
    _s("server", "tls_key", "path", REQUIRED,
       "Server private key (PEM); must not be readable by group or others.", example='"tls/server.key"'),
    _s("server", "client_ca", "path", None,
       "CA bundle that signs client certificates; required unless client_cert = \"off\".",
       example='"tls/ca.crt"'),
    _s("server", "client_cert", "choice", "required",
       "Mutual TLS: a handshake without a certificate from client_ca fails when \"required\".",
       choices=("required", "optional", "off"), example='"required"'),
    _s("server", "allow", "cidrs", ["127.0.0.0/8", "::1/128"],
       "Network gate: peers outside these address ranges are refused (403) before any token is read.",
       example='["192.168.10.0/24"]'),
    _s("server", "trusted_proxies", "cidrs", [],
       "Peers whose X-Forwarded-For header is believed: all its lines, as one list, read from the right "
       "past these proxies (the client's own lines are never trusted); a Forwarded header from them is "
       "refused (403). From anyone else both headers are ignored.", example='["192.168.10.2/32"]'),
    _s("server", "revoked", "hexlist", [],
       "Client certificates refused even though the CA signed them: the SHA-256 of each as issued (`openssl "
       "x509 -fingerprint -sha256`, `cert list` sha256) or of its signed part (`cert list` tbs sha256, the "
       "trail's cert_sha256); either matches every re-encoding of that certificate.",
       example='["3f2a...64 hex digits"]'),
    _s("server", "max_connections", "int", 1000,
       "TCP connections held at once (TLS handshakes included); more are closed at once, counted and "
       "logged, so idle sockets cannot use up the process's file descriptors (LimitNOFILE must be higher).",
       minimum=1, maximum=100_000, example="1000"),
    _s("server", "max_connections_per_source", "int", 64,
       "TCP connections one source address may hold at once, so one host cannot take them all; behind a "
       "proxy (trusted_proxies) every client shares the proxy's address: raise it to max_connections.",
       minimum=1, maximum=100_000, example="64"),
    _s("server", "handshake_timeout_s", "int", 10,
       "Seconds a new connection has to complete its TLS handshake; silent sockets are closed after it.",
       minimum=1, maximum=60, example="10"),
    _s("server", "refusal_records_per_second", "int", 20,
       "Refusal audit records per source address and second; the rest are counted "
       "(qwa_refusal_records_suppressed_total) and summarised in one record per source and second.",
       minimum=1, maximum=10_000, example="20"),
    # [model]
    _s("model", "path", "path", REQUIRED, "The Qwen3-VL text model GGUF file.",
       example='"/var/lib/qwen-appliance/models/Qwen3-VL-4B-Instruct-Q4_K_M.gguf"', restart="change"),
    _s("model", "mmproj", "path", None,
       "Its vision projector GGUF; without it the model serves text only and refuses images.",
       example='"/var/lib/qwen-appliance/models/mmproj-Qwen3-VL-4B-Instruct-F16.gguf"', restart="change"),
    _s("model", "name", "str", None, "Model name shown in /v1/models; default: the GGUF file stem.",
       example='"qwen3-vl-4b"', restart="change"),
    _s("model", "n_gpu_layers", "int", -1,
       "Layers offloaded to the GPU: -1 all (when the build has CUDA), 0 none.", minimum=-1,
       example="-1", restart="change"),
    _s("model", "n_ctx", "int", 4096,
       "Context window in tokens: prompt, image tokens and answer together.",
       minimum=256, maximum=262144, example="8192", restart="change"),
    _s("model", "threads", "int", 0, "CPU threads for inference; 0 picks a value for this host.",
       minimum=0, maximum=256, example="8", restart="change"),
    _s("model", "parallel", "int", 4,
       "Requests decoded together in one batch (slots); each has its own n_ctx, so the KV cache holds "
       "parallel x n_ctx tokens. More waiting requests queue (max_queue).", minimum=1, maximum=16,
       example="8", restart="change"),
    _s("model", "prompt_cache", "bool", True,
       "Reuse a slot's already evaluated prompt prefix: across clients only template and system text "
       "(a timing side channel could otherwise reveal another client's document), in full for the same "
       "client.", example="true", restart="change"),
    _s("model", "chat_template", "str", None,
       "Jinja chat template overriding the one embedded in the GGUF.",
       example='"{% for m in messages %}...{% endfor %}"', restart="change"),
    _s("model", "data_dir", "path", None,
       "Directory whose files /api/v1/chat may name as \"image\" (the guide's /secure_data); "
       "paths outside it are refused.", example='"/secure_data"', restart="change"),
    _s("model", "image_min_tokens", "int", 0,
       "Lower bound of tokens one image becomes (0 = llama.cpp default).", minimum=0,
       example="256", restart="change"),
    _s("model", "image_max_tokens", "int", 1024,
       "Upper bound of tokens one image becomes: larger images are scaled down to it before encoding, "
       "which bounds how long every other request waits while one image is encoded (0 = llama.cpp's "
       "default, 4096 for Qwen-VL: over ten times the encoder time).", minimum=0,
       example="1024", restart="change"),
    _s("model", "require_gpu", "bool", False,
       "Refuse to start unless layers are really offloaded to a GPU, instead of running on the CPU.",
       example="true", restart="change"),
    _s("model", "use_mlock", "bool", False,
       "Lock weights and KV cache in RAM so customer context never reaches swap (needs LimitMEMLOCK).",
       example="true", restart="change"),
    _s("model", "split_mode", "choice", "layer",
       "How llama.cpp spreads the model over several GPUs.", choices=("none", "layer", "row"),
       example='"layer"', restart="change"),
    _s("model", "main_gpu", "int", 0, "GPU used for the model (split_mode none) or scratch.",
       minimum=0, maximum=63, example="0", restart="change"),
    _s("model", "tensor_split", "floats", [],
       "Share of the model per GPU, e.g. [3, 1]; empty lets llama.cpp decide.",
       example="[3, 1]", restart="change"),
    _s("model", "sha256", "str", None,
       "Expected SHA-256 of the model file; start-up refuses a file that differs.",
       example='"9b1c...64 hex digits"', restart="change"),
    _s("model", "mmproj_sha256", "str", None,
       "Expected SHA-256 of the mmproj file; start-up refuses a file that differs.",
       example='"77ad...64 hex digits"', restart="change"),
    # [limits]
    _s("limits", "max_body_bytes", "int", 20_000_000,
       "Largest request body; bigger bodies get 413 before they are parsed.", minimum=1024,
       example="20_000_000", restart="raise"),
    _s("limits", "max_image_bytes", "int", 10_000_000,
       "Largest encoded image; bigger images get 413.", minimum=1, example="10_000_000"),
    _s("limits", "max_image_pixels", "int", 16_000_000,
       "Largest decoded image (width x height); guards against decompression bombs.", minimum=1,
       example="16_000_000"),
    _s("limits", "max_images", "int", 8, "Most images in one request.", minimum=0, example="4"),
    _s("limits", "max_tokens", "int", 2048,
       "Most completion tokens one request may ask for.", minimum=1, example="2048"),
    _s("limits", "max_queue", "int", 16,
       "Requests waiting for the engine; beyond this clients get 503 with Retry-After.",
       minimum=1, example="16"),
    _s("limits", "response_cache_entries", "int", 256,
       "Answers kept in memory for clients with cache = true (0 turns the cache off).", minimum=0,
       maximum=100_000, example="1024"),
    _s("limits", "response_cache_ttl_s", "int", 300,
       "Seconds a cached answer may be served again.", minimum=1, maximum=86400, example="600"),
    # [audit]
    _s("audit", "dir", "path", "audit",
       "Directory of the JSON Lines audit trail (0700; files 0600).",
       example='"/var/log/qwen-appliance"', restart="change"),
    _s("audit", "hmac_key_file", "path", "audit.key",
       "Key for the HMAC digests of prompts and images (0600); without it nothing can be correlated.",
       example='"/etc/qwen-appliance/audit.key"', restart="change"),
    _s("audit", "fsync", "choice", "always",
       "\"always\": every record is on disk before the response; \"interval\" is faster but a power "
       "cut can lose the last fsync_interval_ms of records.", choices=("always", "interval"),
       example='"always"', restart="change"),
    _s("audit", "fsync_interval_ms", "int", 1000,
       "Longest time between fsyncs when fsync = \"interval\".", minimum=1, maximum=60000,
       example="200", restart="change"),
    _s("audit", "rotate_bytes", "int", 100_000_000,
       "Size at which a file is sealed and a new one started (also at UTC midnight).",
       minimum=4096, example="100_000_000", restart="change"),
    _s("audit", "retention_days", "int", 30,
       "Files older than this are deleted (each deletion is itself recorded).", minimum=1,
       example="90", restart="change"),
    _s("audit", "forward", "choice", "none",
       "Also send each record to the local journald or syslog socket, so the host's existing forwarding "
       "(journal-upload, rsyslog) carries it to the bank's SIEM; the daemon opens no network connection.",
       choices=("none", "journald", "syslog"), example='"journald"', restart="change"),
    _s("audit", "forward_socket", "path", None,
       "Socket for forward; default /run/systemd/journal/socket (journald) or /dev/log (syslog).",
       example='"/run/systemd/journal/socket"', restart="change"),
    _s("audit", "fail_closed", "bool", True,
       "Refuse requests with 503 while records cannot be written; false serves without an audit trail.",
       example="true", restart="change"),
    # [health]
    _s("health", "max_gpu_temp_c", "int", 90,
       "/readyz answers 503 while a GPU is hotter than this.", minimum=40, maximum=120, example="85"),
    _s("health", "min_audit_free_mb", "int", 512,
       "/readyz answers 503 while the audit directory's disk has less free space than this.",
       minimum=0, example="1024"),
    _s("health", "fail_on_ecc_uncorrected", "bool", True,
       "/readyz answers 503 while a GPU reports uncorrected ECC errors (answers may be corrupt).",
       example="true"),
    _s("health", "gpu_poll_seconds", "int", 10, "How often NVML is read.", minimum=1, maximum=3600,
       example="10"),
    # [[clients]]
    _s("clients", "name", "str", REQUIRED, "Client identity, shown in logs and the audit trail.",
       example='"teller-03"'),
    _s("clients", "token_sha256", "str", REQUIRED,
       "SHA-256 (hex) of the client's bearer token; the token itself is never stored.",
       example='"e3b0...64 hex digits"'),
    _s("clients", "scopes", "list[str]", ["chat"],
       "What the client may do: chat, models, metrics, admin.",
       choices=("chat", "models", "metrics", "admin"), example='["chat"]'),
    _s("clients", "allow", "cidrs", None,
       "Address ranges this client may connect from; each must lie inside [server] allow.",
       example='["192.168.10.23/32"]'),
    _s("clients", "cert_cn", "str", None,
       "Subject CN the client's TLS certificate must carry; a stolen token alone is not enough.",
       example='"teller-03.branch.local"'),
    _s("clients", "cert_sha256", "hex", None,
       "The one TLS certificate this client must present (stricter than cert_cn): its SHA-256 as issued "
       "(`cert list` sha256) or of its signed part (tbs sha256); re-encodings of it count as the same.",
       example='"5d41...64 hex digits"'),
    _s("clients", "expires", "date", None,
       "Last day (UTC) the token is accepted, e.g. 2027-03-01; afterwards it gets 401.",
       example="2027-03-01"),
    _s("clients", "rate", "rate", None,
       "Requests allowed per client, e.g. \"60/minute\"; more get 429 with Retry-After.",
       example='"60/minute"'),
    _s("clients", "token_budget", "rate", None,
       "Tokens one client may spend, e.g. \"100000/hour\": a request costs its prompt and image tokens plus "
       "max_tokens (answer tokens it did not use are given back). Bounds cost where `rate` only counts: "
       "over it, 429 with Retry-After; a request costing more than the whole budget, 413.",
       example='"100000/hour"'),
    _s("clients", "max_concurrent", "int", None,
       "Requests one client may have in flight at once; more get 429.", minimum=1, example="2"),
    _s("clients", "cache", "bool", False,
       "Serve this client's repeated deterministic requests (temperature 0 or a fixed seed) from an "
       "in-memory answer cache; never shared with another client.", example="true"),
    _s("clients", "disabled", "bool", False,
       "Switch a client off without deleting it; its token then gets 401.", example="false"),
)
# fmt: on

SECTIONS = ("server", "model", "limits", "audit", "health", "clients")


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
        lines.append(
            f"{s.dotted:<26} {s.kind:<9} default {_default(s)}\n    {s.help}\n    e.g. {s.example_line}"
        )
    return "\n".join(lines)


def restart_keys() -> tuple[Setting, ...]:
    """The keys a reload cannot apply: the daemon warns that they take effect at the next restart."""
    return tuple(s for s in SETTINGS if s.restart != "no")


def restart_note() -> str:
    """The docs' sentence on what needs a restart, from `restart` (a section when all its keys do)."""
    parts = []
    for section in SECTIONS:
        keys = settings_in(section)
        if all(s.restart == "change" for s in keys):
            parts.append(f"anything in `[{section}]`")
            continue
        parts += [
            f"{'raising ' if s.restart == 'raise' else ''}`[{section}] {s.key}`"
            for s in keys
            if s.restart != "no"
        ]
    listed = ", ".join(parts[:-1]) + f" and {parts[-1]}" if len(parts) > 1 else "".join(parts)
    return textwrap.fill(
        f"Changes that need a restart (the daemon logs a warning on reload): {listed}. "
        "Everything else applies to the next request; requests already running finish under "
        "the policy they started with.",
        width=110,
    )


_KIND_NAMES = {
    "str": "string",
    "int": "integer",
    "bool": "boolean",
    "path": "path",
    "list[str]": "list of strings",
    "choice": "string",
    "listen": "HOST:PORT",
    "cidrs": "list of CIDR ranges",
    "hex": "SHA-256 hex",
    "hexlist": "list of SHA-256 hex",
    "date": "TOML date",
    "rate": "N/unit",
    "floats": "list of numbers",
}


def markdown() -> str:
    """docs/policy.md, generated from this table so the documentation cannot drift from the code."""
    out = [DOC_HEADER.format(restart=restart_note())]
    for section in SECTIONS:
        title = "[[clients]]" if section == "clients" else f"[{section}]"
        out += [
            f"\n## `{title}`\n",
            "| key | type | default | example | what it protects |",
            "| --- | --- | --- | --- | --- |",
        ]
        for s in settings_in(section):
            kind = _KIND_NAMES[s.kind] + (f" ({' / '.join(s.choices)})" if s.choices else "")
            out.append(f"| `{s.key}` | {kind} | `{_default(s)}` | `{s.example_line}` | {s.help} |")
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

{restart}

How a request is judged, in order: the network gate (`[server] allow`, from the socket address; a
`X-Forwarded-For` header counts only from `trusted_proxies`) → the TLS client certificate (verified against
`client_ca` in the handshake; refused if listed in `revoked`) → the bearer token (selects the client by the
SHA-256 of the token, compared in constant time) → that client's `disabled`, `expires`, `allow`,
`cert_cn` / `cert_sha256`, the route's scope → `rate` and `max_concurrent` → the body and image limits →
`token_budget` (once the prompt is tokenized, beside the engine). Unknown, disabled or expired tokens get
401; the right token from the wrong address or certificate, or without the scope, 403; over the rate,
concurrency or token budget, 429 with `Retry-After`."""
