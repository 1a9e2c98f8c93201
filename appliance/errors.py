"""One error hierarchy, one root: every failure the appliance reports, to an admin or to a client.

Admin-facing errors name the file, the key and a hint; service errors are conditions of the running daemon
(this request or record cannot be served now); client-facing errors carry an HTTP status, an error type and a
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

    def __init__(self, file: Path | str, key: str | None, message: str, *, hint: str | None = None) -> None:
        where = f"{file}: [{key}]" if key else str(file)
        super().__init__(f"{where}: {message}", hint=hint)
        self.file = str(file)
        self.key = key


class PolicyInvalid(ConfigError):
    """Every problem found in one policy file; `errors` lists them, the message shows them all."""

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.file, first.key, first.message.split(": ", 2)[-1], hint=first.hint)
        self.errors = errors

    def __str__(self) -> str:
        if len(self.errors) == 1:
            return str(self.errors[0])
        return f"{len(self.errors)} problems:\n" + "\n".join(f"  {e}" for e in self.errors)


class Problems:
    """Gathers ConfigErrors for one file instead of stopping at the first, so all are reported at once."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.errors: list[ConfigError] = []

    def add(self, key: str | None, message: str, hint: str | None = None) -> None:
        self.errors.append(ConfigError(self.file, key, message, hint=hint))

    def raise_if_any(self) -> None:
        if self.errors:
            raise PolicyInvalid(self.errors)


class ModelLoadError(SetupError):
    """The model or projector file is missing, corrupt, mismatched or refused by llama.cpp."""


class TLSSetupError(SetupError):
    """Certificates or keys that cannot be loaded into the TLS context."""


# --- the running service: a condition of this moment, not a set-up mistake ------------------------


class ServiceError(ApplianceError):
    """The daemon cannot do this now (e.g. make a record durable); per request, never a reason to exit 2."""


# --- client-facing: one class per HTTP status, each with its error type -----------------------------


class ClientError(ApplianceError):
    """A refusal sent to a client as JSON `{"error": {"type", "message"}}`."""

    status = 400
    type = "invalid_request_error"
    sent = True  # False: the type is audited but no client ever receives it
    detail: str | None = None  # for the audit record and the server log only, never sent to the client

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BadRequest(ClientError):
    status = 400


class ContextOverflow(BadRequest):
    """A prompt refused only once it was tokenized: `tokens` is what that work cost (and is charged)."""

    def __init__(self, message: str, *, tokens: int) -> None:
        super().__init__(message)
        self.tokens = tokens


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

    def __init__(self, message: str, *, allow: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allow = allow


class PayloadTooLarge(ClientError):
    status = 413
    type = "request_too_large"


class HeaderFieldsTooLarge(ClientError):
    """431: the request line and headers together are over the server's limit."""

    status = 431
    type = PayloadTooLarge.type


class UnsupportedMediaType(ClientError):
    status = 415
    type = "unsupported_media_type"


class Unprocessable(ClientError):
    status = 422


class TooManyRequests(ClientError):
    status = 429
    type = "rate_limit_error"


class ClientClosedRequest(ClientError):
    """499 (nginx's code): the client left before its answer; audited, never seen by anyone."""

    status = 499
    type = "client_closed_request"
    sent = False


class ServiceUnavailable(ClientError):
    status = 503
    type = "overloaded_error"


INTERNAL_ERROR = "internal_error"  # a 500: the client learns only the request id


def _refusals() -> list[type[ClientError]]:
    """Every refusal class, in declaration order (ClientError itself is the 400 fallback)."""
    out: list[type[ClientError]] = []
    todo: list[type[ClientError]] = [ClientError]
    while todo:
        cls = todo.pop(0)
        out.append(cls)
        todo += cls.__subclasses__()
    return out


def error_type(status: int) -> str:
    """The error type a client receives with this HTTP status (also for errors the framework renders)."""
    if status >= 500 and status != ServiceUnavailable.status:
        return INTERNAL_ERROR
    return next((c.type for c in _refusals() if c.status == status), ClientError.type)


def client_error_types() -> list[str]:
    """Every error type a client can receive, once each, in declaration order (the OpenAPI enum)."""
    types = [c.type for c in _refusals() if c.sent] + [INTERNAL_ERROR]
    return list(dict.fromkeys(types))
