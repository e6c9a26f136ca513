"""Errors only the server raises, each with its HTTP status and OpenAI error ``type``.

The runtime's own errors (:mod:`edge_vlm.errors`) already carry ``http_status``; these add
what only exists over HTTP: authentication, refused origins, limits, queueing and loading.
"""

from __future__ import annotations

from typing import Any

from edge_vlm.errors import EdgeVLMError, RequestError


class ClientGone(Exception):
    """The client closed the connection (recorded as status 499, nothing is sent)."""


class HTTPError(EdgeVLMError):
    """Base of the server's own errors.

    Attributes:
        code: The OpenAI error ``code`` string (None: the status decides).
        headers: Extra response headers (``Retry-After``, ``WWW-Authenticate``, ...).
    """

    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, param=param)
        self.headers = dict(headers or {})


class BadRequestError(HTTPError):
    """The request cannot be read: not JSON, too deeply nested, a broken body."""

    http_status = 400
    error_type = "invalid_request_error"


class ValidationFailedError(HTTPError):
    """The request is well-formed JSON but a field is invalid or over a limit (400, as
    OpenAI answers: the SDKs raise ``BadRequestError``)."""

    http_status = 400
    error_type = "invalid_request_error"
    code = "validation_error"


class AuthError(HTTPError):
    """No token, or the wrong one."""

    http_status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="edge-vlm"'})


class ForbiddenError(HTTPError):
    """A refused ``Host`` header (DNS rebinding) or cross-origin request."""

    http_status = 403
    error_type = "permission_error"
    code = "forbidden"


class RouteNotFoundError(HTTPError):
    """No endpoint at this path."""

    http_status = 404
    error_type = "not_found_error"
    code = "not_found"


class MethodNotAllowedError(HTTPError):
    """The path exists but not for this method."""

    http_status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeoutError(HTTPError):
    """The client took too long to send its request."""

    http_status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class LengthRequiredError(HTTPError):
    """A POST without ``Content-Length`` or chunked encoding."""

    http_status = 411
    error_type = "invalid_request_error"
    code = "length_required"


class PayloadTooLargeError(HTTPError):
    """The body is over ``server.max_body_bytes``."""

    http_status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLargeError(HTTPError):
    """The request line and headers are over the server's cap."""

    http_status = 431
    error_type = "invalid_request_error"
    code = "headers_too_large"


class ServiceUnavailableError(HTTPError):
    """Try again later: a model is loading or the queue is full (``Retry-After`` set).

    Attributes:
        retry_after: Seconds the client should wait before retrying.
        estimated_time: Seconds until the model is expected to be ready (loading only).
    """

    http_status = 503
    error_type = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float, code: str,
                 estimated_time: float | None = None) -> None:
        seconds = max(1, int(retry_after + 0.999))
        super().__init__(message, headers={"Retry-After": str(seconds)})
        self.code = code
        self.retry_after = seconds
        self.estimated_time = estimated_time


class GenerationTimeoutError(HTTPError):
    """The answer took longer than ``server.request_timeout_s``."""

    http_status = 504
    error_type = "timeout_error"
    code = "generation_timeout"


def validation_error(err: RequestError) -> ValidationFailedError:
    """The schema's RequestError (naming the field) as a 400."""
    return ValidationFailedError(err.message, param=err.param)


def error_body(err: EdgeVLMError) -> dict[str, Any]:
    """The OpenAI error document ``{"error": {"message", "type", "param", "code"}}``."""
    code = getattr(err, "code", None)
    body: dict[str, Any] = {"error": {
        "message": err.message,
        "type": err.error_type,
        "param": err.param,
        "code": code if code is not None else _default_code(err),
    }}
    if isinstance(err, ServiceUnavailableError) and err.estimated_time is not None:
        body["estimated_time"] = round(err.estimated_time, 1)
    return body


def _default_code(err: EdgeVLMError) -> str:
    """A snake_case code from the error class: ``ContextOverflowError`` → ``context_overflow``."""
    name = type(err).__name__.removesuffix("Error")
    out = "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
    return out or "error"


def header_safe(text: str, limit: int = 300) -> str:
    """A value fit for one header line: latin-1, no line breaks, bounded."""
    flat = " ".join(text.split())
    return flat.encode("latin-1", "replace").decode("latin-1")[:limit]
