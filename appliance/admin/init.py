"""`qwen-appliance init DIR`: a complete, closed-by-default set-up (CA, certificates, one client, policy)."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from appliance import files
from appliance.audit.log import new_hmac_key
from appliance.errors import SetupError
from appliance.security import pki
from appliance.security.tokens import new_token, token_digest

POLICY_TEMPLATE = """\
# qwen-appliance policy, written by `qwen-appliance init`. Every key is documented in docs/policy.md.
# Relative paths resolve against this file's directory.

[server]
listen = {listen}
tls_cert = "tls/server.crt"
tls_key = "tls/server.key"
client_ca = "tls/ca.crt"
client_cert = "required"   # mutual TLS: no certificate signed by client_ca, no handshake
allow = {allow}   # network gate: only these ranges may connect
trusted_proxies = []       # X-Forwarded-For is ignored unless the peer is listed here
revoked = []               # SHA-256 fingerprints of client certificates to refuse
max_connections = 1000     # TCP connections at once (keep below the unit's LimitNOFILE)
max_connections_per_source = 64
handshake_timeout_s = 10   # a silent socket is closed after this
refusal_records_per_second = 20   # per source; the rest are counted and summarised

[model]
path = {model}
{mmproj_line}
data_dir = {data_dir}     # files /api/v1/chat may name as "image"
n_gpu_layers = -1          # all layers on the GPU when the build has CUDA
n_ctx = 4096
threads = 0                # 0 = choose for this host
parallel = 4               # requests decoded together; KV memory is parallel x n_ctx

[limits]
max_body_bytes = 20_000_000
max_image_bytes = 10_000_000
max_image_pixels = 16_000_000
max_images = 8
max_tokens = 2048
max_queue = 16

[audit]
dir = "audit"              # content-free, hash-chained JSON Lines; verify with `qwen-appliance audit verify`
hmac_key_file = "audit.key"   # HMAC key for prompt and image digests (0600)
fsync = "always"
retention_days = 30
fail_closed = true         # no audit record, no answer

[[clients]]
name = {client}
token_sha256 = "{token_sha256}"   # the token itself is never stored
scopes = ["chat", "models"]
"""


@dataclass(frozen=True)
class InitResult:
    """What `init` created; the token exists only here and in what the admin copies."""

    policy: Path
    url: str
    token: str
    ca_cert: Path
    client_cert: Path
    client_key: Path

    def as_json(self) -> dict[str, str]:
        return {
            "policy": str(self.policy),
            "url": self.url,
            "token": self.token,
            "ca_cert": str(self.ca_cert),
            "client_cert": str(self.client_cert),
            "client_key": str(self.client_key),
        }


def _rel(path: Path, base: Path) -> str:
    """Store paths relative to the policy when they lie below it, so the folder can move."""
    path = path.resolve()
    try:
        return str(path.relative_to(base.resolve()))
    except ValueError:
        return str(path)


def init(
    directory: Path,
    listen: str = "127.0.0.1:8443",
    model: Path | None = None,
    mmproj: Path | None = None,
    client: str = "client-01",
    force: bool = False,
    token_file: Path | None = None,
    allow: list[str] | None = None,
) -> InitResult:
    """Create DIR with tls/, clients/NAME/, data/ and policy.toml; refuse to overwrite unless forced."""
    policy_path = directory / "policy.toml"
    for cidr in allow or []:
        try:
            ipaddress.ip_network(cidr)
        except ValueError:
            raise SetupError(
                f"--allow {cidr!r} is not an address range", hint="write it like 192.168.10.0/24"
            ) from None
    if policy_path.exists() and not force:
        raise SetupError(f"{policy_path} already exists", hint="use another DIR or pass --force")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    host = listen.rpartition(":")[0].strip("[]")
    ca = pki.new_ca()
    pki.save(ca, directory / "tls/ca.crt", directory / "tls/ca.key")
    pki.save(pki.new_server_cert(ca, [host]), directory / "tls/server.crt", directory / "tls/server.key")
    bundle = directory / "clients" / client
    pki.save(pki.new_client_cert(ca, client), bundle / "client.crt", bundle / "client.key")
    files.write_public(bundle / "ca.crt", pki.cert_pem(ca.cert))
    (directory / "data").mkdir(exist_ok=True)
    if not (directory / "audit.key").exists() or force:
        files.write_secret(directory / "audit.key", new_hmac_key().encode())
    token = new_token()
    if token_file is not None:
        files.write_secret(token_file, token.encode() + b"\n")
    ranges = ["127.0.0.0/8", "::1/128", *(allow or [])]
    files.write_public(
        policy_path, _policy_text(directory, listen, model, mmproj, client, token, ranges).encode()
    )
    return InitResult(
        policy=policy_path.resolve(),
        url=_url(listen, host),
        token=token,
        ca_cert=(bundle / "ca.crt").resolve(),
        client_cert=(bundle / "client.crt").resolve(),
        client_key=(bundle / "client.key").resolve(),
    )


def _policy_text(
    directory: Path,
    listen: str,
    model: Path | None,
    mmproj: Path | None,
    client: str,
    token: str,
    allow: list[str],
) -> str:
    model_s = json.dumps(_rel(model, directory) if model else "models/model.gguf")
    if model is not None and model.is_file():
        model_s += f'\nsha256 = "{files.sha256_file(model)}"'  # pinned: a different file is refused at start
    mmproj_line = (
        f"mmproj = {json.dumps(_rel(mmproj, directory))}"
        if mmproj
        else '# mmproj = "models/mmproj.gguf"   # without it, images are refused'
    )
    if mmproj is not None and mmproj.is_file():
        mmproj_line += f'\nmmproj_sha256 = "{files.sha256_file(mmproj)}"'
    return POLICY_TEMPLATE.format(
        listen=json.dumps(listen),
        model=model_s,
        mmproj_line=mmproj_line,
        data_dir='"data"',
        client=json.dumps(client),
        allow=json.dumps(allow),
        token_sha256=token_digest(token),
    )


def _url(listen: str, host: str) -> str:
    port = listen.rpartition(":")[2]
    wildcard = ("0.0.0.0", "::", "")  # noqa: S104 - compared, never bound  # nosec B104
    if host in wildcard:  # a wildcard bind is reached by this host's name
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"https://{host}:{port}"
