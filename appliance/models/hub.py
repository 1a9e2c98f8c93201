"""Hugging Face Hub downloads: endpoint, proxies and timeout from the environment; errors an admin can act on.

huggingface_hub is imported only when a command reaches the Hub, so offline commands never need it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import SetupError
from appliance.models.manifest import FileSpec
from appliance.text import escape_unprintable

TIMEOUT_ENV = "QWEN_APPLIANCE_HUB_TIMEOUT"
DEFAULT_ENDPOINT = "https://huggingface.co"
HUB_TIMEOUT_S = 10.0
IMPORT_HINT = (
    "on a machine with internet access fetch the files (`hf download REPO FILE`, see "
    "`qwen-appliance model list`), carry them over and run `qwen-appliance model import FILE...`"
)
_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def offline_error() -> SetupError:
    return SetupError(
        "HF_HUB_OFFLINE is set, so `model pull` cannot reach the Hugging Face Hub", hint=IMPORT_HINT
    )


@dataclass(frozen=True)
class Hub:
    """Where and how to reach the Hub: endpoint and proxies from the environment, a short timeout."""

    endpoint: str
    timeout: float

    @classmethod
    def from_env(cls) -> Hub:
        raw = os.environ.get(TIMEOUT_ENV, "")
        try:
            timeout = float(raw) if raw else HUB_TIMEOUT_S
        except ValueError:
            raise SetupError(f"${TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
        endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        return cls(endpoint, max(timeout, 0.1))

    def preflight(self, repo: str, revision: str, spec: FileSpec) -> None:
        """One HEAD request without retries, so an unreachable Hub fails in seconds, not minutes."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(repo, spec.file, revision=revision, endpoint=self.endpoint)
        try:
            meta = get_hf_file_metadata(url, timeout=self.timeout, endpoint=self.endpoint)
        except Exception as e:
            raise self.error(e, f"{repo}@{revision}/{spec.file}") from None
        if spec.size is not None and meta.size is not None and meta.size != spec.size:
            raise SetupError(
                f"{repo}@{revision}/{spec.file} is {meta.size} bytes on the Hub, but the "
                f"manifest says {spec.size}",
                hint="the manifest's revision pins the known-good file",
            )

    def download(self, repo: str, revision: str, file: str, staging: Path) -> Path:
        """hf_hub_download into the staging dir: progress bar, and an interrupted download resumes."""
        from huggingface_hub import hf_hub_download

        print(f"downloading {repo}@{revision[:12]}/{file} ...", file=sys.stderr)
        try:
            local = hf_hub_download(
                repo,
                file,
                revision=revision,
                local_dir=staging,
                endpoint=self.endpoint,
                etag_timeout=self.timeout,
            )
        except Exception as e:
            raise self.error(e, f"{repo}@{revision}/{file}", interrupted=True) from None
        return Path(str(local))

    def error(self, exc: Exception, what: str, interrupted: bool = False) -> SetupError:
        """Turn a huggingface_hub or network exception into one clear admin error."""
        from huggingface_hub import errors as hf

        reason = escape_unprintable(_root_cause(exc), 300)
        if isinstance(exc, hf.OfflineModeIsEnabled):
            return offline_error()
        missing = (hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.EntryNotFoundError)
        if isinstance(exc, missing) and not isinstance(exc, hf.LocalEntryNotFoundError):  # local: network
            return SetupError(
                f"{what} is not on the Hub: {reason}",
                hint="the manifest may be out of date: check repo, revision and file, or pass --revision",
            )
        if isinstance(exc, hf.HfHubHTTPError):
            return SetupError(f"the Hub refused {what}: {reason}", hint="try again later; " + IMPORT_HINT)
        again = "run the same command again to resume the download; " if interrupted else ""
        return SetupError(
            f"the Hugging Face Hub is unreachable at {self.endpoint} ({reason})",
            hint=f"{again}behind a proxy set HTTPS_PROXY; {IMPORT_HINT}",
        )


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's first line (e.g. 'Connection refused'), the most telling for an admin."""
    for _ in range(20):  # chains are short; the bound only guards against a cycle
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def reachable_hub(repo: str, revision: str, specs: list[FileSpec]) -> Hub:
    """Refuse at once when offline is requested; else check every file is reachable before any download."""
    if offline_requested():
        raise offline_error()
    hub = Hub.from_env()
    for spec in specs:
        hub.preflight(repo, revision, spec)
    return hub
