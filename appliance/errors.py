"""One error hierarchy: every failure the appliance reports, to an admin or to a client.

Admin-facing errors name the file, the key and a hint; client-facing errors carry an HTTP status and a
message that is safe to show (never exception text, paths outside data_dir, or which tokens exist).
"""

from __future__ import annotations

from pathlib import Path


class ApplianceError(Exception):
    """Root of every error the appliance raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


# --- admin-facing: set-up, policy, model, start-up -------------------------------------------------


class SetupError(ApplianceError):
    """Something an admin must fix before the daemon can start; exit code 2 like a usage error."""

    exit_code = 2


class ConfigError(SetupError):
    """A policy file that cannot be used; names the file and the key."""

    def __init__(
        self, file: Path | str, key: str | None, message: str, *, hint: str | None = None
    ) -> None:
        where = f"{file}: [{key}]" if key else str(file)
        super().__init__(f"{where}: {message}", hint=hint)
        self.file = str(file)
        self.key = key


class ModelLoadError(SetupError):
    """The model or projector file is missing, corrupt, mismatched or refused by llama.cpp."""


class TLSSetupError(SetupError):
    """Certificates or keys that cannot be loaded into the TLS context."""


# --- client-facing: one class per HTTP status ------------------------------------------------------


class ClientError(ApplianceError):
    """A refusal sent to a client as JSON `{"error": {"type", "message"}}`."""

    status = 400
    type = "invalid_request_error"
    detail: str | None = None  # for the audit record and the server log only, never sent to the client

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BadRequest(ClientError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ClientError):
    status = 401
    type = "authentication_error"


class Forbidden(ClientError):
    status = 403
    type = "permission_error"


class NotFound(ClientError):
    status = 404
    type = "not_found_error"


class MethodNotAllowed(ClientError):
    """405; RFC 9110 wants the route's methods named in `Allow`."""

    status = 405
    type = "invalid_request_error"

    def __init__(self, message: str, *, allow: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allow = allow


class PayloadTooLarge(ClientError):
    status = 413
    type = "request_too_large"


class HeaderFieldsTooLarge(ClientError):
    """431: the request line and headers together are over the server's limit."""

    status = 431
    type = "request_too_large"


class UnsupportedMediaType(ClientError):
    status = 415
    type = "unsupported_media_type"


class Unprocessable(ClientError):
    status = 422
    type = "invalid_request_error"


class TooManyRequests(ClientError):
    status = 429
    type = "rate_limit_error"


class ClientClosedRequest(ClientError):
    """499 (nginx's code): the client left before its answer; audited, never seen by anyone."""

    status = 499
    type = "client_closed_request"


class ServiceUnavailable(ClientError):
    status = 503
    type = "overloaded_error"
