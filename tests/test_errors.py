"""Issue 12: one root error; error type names declared once; each error in its proper place."""

from __future__ import annotations

from appliance.audit.log import AuditUnavailable
from appliance.daemon.sdnotify import ListenFdsError
from appliance.errors import (
    INTERNAL_ERROR,
    ApplianceError,
    ClientError,
    HeaderFieldsTooLarge,
    PayloadTooLarge,
    ServiceError,
    SetupError,
    client_error_types,
    error_type,
)


def test_error_types_come_from_the_classes() -> None:
    assert client_error_types() == [
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "unsupported_media_type",
        "rate_limit_error",
        "overloaded_error",
        INTERNAL_ERROR,
    ]
    assert {s: error_type(s) for s in (400, 404, 405, 413, 415, 422, 429, 431, 500, 503)} == {
        400: "invalid_request_error",
        404: "not_found_error",
        405: "invalid_request_error",
        413: "request_too_large",
        415: "unsupported_media_type",
        422: "invalid_request_error",
        429: "rate_limit_error",
        431: "request_too_large",
        500: INTERNAL_ERROR,
        503: "overloaded_error",
    }
    assert HeaderFieldsTooLarge.type == PayloadTooLarge.type and issubclass(ClientError, ApplianceError)


def test_audit_unavailable_is_a_service_condition_not_a_setup_mistake() -> None:
    assert issubclass(AuditUnavailable, ServiceError) and not issubclass(AuditUnavailable, SetupError)
    assert issubclass(AuditUnavailable, ApplianceError)  # `except ApplianceError` still catches it


def test_a_broken_socket_unit_is_a_setup_error() -> None:
    assert issubclass(ListenFdsError, SetupError) and ListenFdsError("x").exit_code == 2
