"""The errors edge-vlm raises.

Every error's message is written for a person: it says what was wrong, with the offending
value, and what to do about it. Each edge (CLI, TUI, server) converts these once: the CLI
prints the message and exits with :attr:`EdgeVLMError.exit_code`, the server answers with
:attr:`EdgeVLMError.http_status` and an OpenAI-style error body.
"""

from __future__ import annotations


class EdgeVLMError(Exception):
    """Base of every error edge-vlm raises on purpose.

    Attributes:
        exit_code: The CLI exit code (2: bad usage or bad input, 1: runtime failure).
        http_status: The HTTP status the server answers with.
        error_type: The OpenAI error ``type`` string.
        param: The request field at fault, as a path such as ``messages[1].content[0]``.
    """

    exit_code: int = 1
    http_status: int = 500
    error_type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return self.message


class RequestError(EdgeVLMError):
    """The chat-completion request is malformed or asks for something unsupported."""

    exit_code = 2
    http_status = 400
    error_type = "invalid_request_error"


class ImageError(RequestError):
    """An image could not be read, is unsupported, or exceeds a limit."""

    http_status = 400


class ImageTooLargeError(ImageError):
    """An image exceeds the byte or pixel limit."""

    http_status = 413


class UnsupportedImageError(ImageError):
    """An image is in a format edge-vlm refuses (SVG, PDF, TIFF, ...)."""

    http_status = 415


class RemoteImageDisabledError(ImageError):
    """An ``http(s)`` image URL was given while remote images are off, or it is not allowed."""

    http_status = 400


class ContextOverflowError(RequestError):
    """Prompt tokens plus ``max_tokens`` do not fit in the model's context window."""


class ModelLoadError(EdgeVLMError):
    """A model or mmproj file could not be loaded or failed validation."""

    exit_code = 2
    http_status = 500


class ModelNotFoundError(ModelLoadError):
    """A model name or path does not resolve to an installed model or a file."""

    http_status = 404
    error_type = "not_found_error"


class ModelMismatchError(ModelLoadError):
    """The mmproj does not belong to the language model (different embedding widths)."""


class GenerationError(EdgeVLMError):
    """llama.cpp failed while evaluating the prompt or decoding."""


class ConfigError(EdgeVLMError):
    """The settings file or environment holds an invalid value."""

    exit_code = 2


class StoreError(EdgeVLMError):
    """The model store could not complete an operation."""


class RequestTooLargeError(RequestError):
    """A request exceeds a size limit (messages, text, schema): the message names the limit
    and the setting that raises it."""

    http_status = 413
