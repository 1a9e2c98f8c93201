"""The one table of policy keys: it drives parsing, validation, `qwen-appliance settings` and docs.

Every key the daemon reads from policy.toml is declared here once, with its type, default and why it exists.
"""

from __future__ import annotations

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
    _s("model", "chat_template", "str", None,
       "Jinja chat template overriding the one embedded in the GGUF."),
    _s("model", "data_dir", "path", None,
       "Directory whose files /api/v1/chat may name as \"image\" (the guide's /secure_data); "
       "paths outside it are refused."),
    _s("model", "image_min_tokens", "int", 0,
       "Lower bound of tokens one image becomes (0 = llama.cpp default).", minimum=0),
    _s("model", "image_max_tokens", "int", 0,
       "Upper bound of tokens one image becomes, bounding its cost (0 = llama.cpp default).",
       minimum=0),
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
    # [[clients]]
    _s("clients", "name", "str", REQUIRED, "Client identity, shown in logs and the audit trail."),
    _s("clients", "token_sha256", "str", REQUIRED,
       "SHA-256 (hex) of the client's bearer token; the token itself is never stored."),
    _s("clients", "scopes", "list[str]", ["chat"],
       "What the client may do: chat, models, metrics, admin.",
       choices=("chat", "models", "metrics", "admin")),
)

SECTIONS = ("server", "model", "limits", "clients")


def settings_in(section: str) -> tuple[Setting, ...]:
    """The keys of one section, in table order."""
    return tuple(s for s in SETTINGS if s.section == section)


def describe() -> str:
    """Human-readable table of every key, for `qwen-appliance settings`."""
    lines = []
    for s in SETTINGS:
        default = "(required)" if s.default is REQUIRED else repr(s.default)
        lines.append(f"{s.dotted:<28} {s.kind:<10} default {default}\n    {s.help}")
    return "\n".join(lines)
