"""One HTTP request and its response: reading a capped body, JSON, headers, errors.

The body is counted while it is read, in pieces, and reading stops at the cap: a
``Content-Length`` is only used to refuse early, never to size a buffer, and chunked bodies
are counted the same way. A response is either one JSON document or a chunked stream
(Server-Sent Events).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from email.message import Message
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from edge_vlm.errors import EdgeVLMError
from edge_vlm.server.errors import (
    BadRequestError,
    HTTPError,
    LengthRequiredError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServiceUnavailableError,
)

_PIECE = 64 * 1024
_MAX_CHUNK_LINE = 1024
#: Bytes and seconds spent draining an unread body before closing, so the client reads
#: the error response instead of a connection reset.
_LINGER_BYTES = 4 * 1024 * 1024
_LINGER_S = 2.0


class ClientGone(Exception):
    """The client closed the connection."""


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


class Exchange:
    """One request on a connection, and the means to answer it.

    Args:
        handler: The ``http.server`` handler owning the connection.
        max_body_bytes: The body cap.
    """

    def __init__(self, handler: BaseHTTPRequestHandler, *, max_body_bytes: int) -> None:
        self.handler = handler
        self.started = time.perf_counter()
        self.method = handler.command
        parts = urlsplit(handler.path)
        self.path = parts.path or "/"
        self.query = parts.query
        self.headers: Message = handler.headers
        self.max_body_bytes = max_body_bytes
        self.status: int | None = None
        self.extra_headers: dict[str, str] = {}
        """Headers added to every response of this exchange (CORS, ``x-cache``)."""
        self.body_unread = self.method in ("POST", "PUT", "PATCH")
        self._chunked_open = False

    # -- request -----------------------------------------------------------------------

    def header(self, name: str, default: str = "") -> str:
        """A request header's value (case-insensitive name)."""
        value = self.headers.get(name)
        return value.strip() if value is not None else default

    def flag(self, name: str, default: bool) -> bool:
        """A boolean request header such as ``x-use-cache: false``."""
        value = self.header(name).lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        return default

    @property
    def socket(self) -> socket.socket:
        """The connection's socket."""
        sock: socket.socket = self.handler.connection
        return sock

    def read_body(self) -> bytes:
        """Read the whole body, counting bytes against the cap.

        Raises:
            PayloadTooLargeError: over ``max_body_bytes`` (declared or counted).
            RequestTimeoutError: the client sent too slowly.
            BadRequestError: a malformed length or chunk, or a body cut short.
            LengthRequiredError: neither ``Content-Length`` nor chunked encoding.
        """
        encoding = self.header("Transfer-Encoding").lower()
        length = self.headers.get("Content-Length")
        try:
            if encoding and encoding != "identity":
                if length is not None:
                    # Both framings at once is how request smuggling starts.
                    raise BadRequestError("request has both Transfer-Encoding and "
                                          "Content-Length; send one")
                if encoding != "chunked":
                    raise BadRequestError(f"Transfer-Encoding {encoding!r} is not supported; "
                                          "send the body with Content-Length or chunked")
                data = self._read_chunked()
            elif length is None:
                raise LengthRequiredError("the request has no body: send JSON with a "
                                          "Content-Length header")
            else:
                data = self._read_length(length)
        except TimeoutError as exc:
            raise RequestTimeoutError(
                "the request body did not arrive in time (server.read_timeout_s); "
                "send the whole request at once") from exc
        self.body_unread = False
        return data

    def _too_large(self, size: str) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"the request body is {size}, over the {self.max_body_bytes}-byte limit "
            "(server.max_body_bytes); send smaller images or raise the limit")

    def _read_length(self, value: str) -> bytes:
        text = value.strip()
        if not text.isdigit():
            raise BadRequestError(f"Content-Length {value!r} is not a number")
        declared = int(text)
        if declared > self.max_body_bytes:
            raise self._too_large(f"{declared} bytes")
        pieces: list[bytes] = []
        remaining = declared
        while remaining > 0:
            piece = self.handler.rfile.read(min(remaining, _PIECE))
            if not piece:
                raise ClientGone
            pieces.append(piece)
            remaining -= len(piece)
        return b"".join(pieces)

    def _read_chunked(self) -> bytes:
        rfile = self.handler.rfile
        pieces: list[bytes] = []
        total = 0
        while True:
            line = rfile.readline(_MAX_CHUNK_LINE)
            if not line:
                raise ClientGone
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadRequestError(f"bad chunk size line {line[:40]!r}") from None
            if size < 0:
                raise BadRequestError(f"bad chunk size line {line[:40]!r}")
            if size == 0:
                break
            total += size
            if total > self.max_body_bytes:
                raise self._too_large(f"more than {self.max_body_bytes} bytes (chunked)")
            remaining = size
            while remaining > 0:
                piece = rfile.read(min(remaining, _PIECE))
                if not piece:
                    raise ClientGone
                pieces.append(piece)
                remaining -= len(piece)
            if rfile.readline(_MAX_CHUNK_LINE).strip():
                raise BadRequestError("a chunk is longer than its size line says")
        for _ in range(100):  # trailers, up to the blank line
            line = rfile.readline(_MAX_CHUNK_LINE)
            if not line or not line.strip():
                break
        return b"".join(pieces)

    def read_json(self, max_depth: int) -> Any:
        """Read the body as JSON, refusing nesting deeper than ``max_depth``.

        Raises:
            BadRequestError: not JSON, or too deep.
        """
        data = self.read_body()
        if not data.strip():
            raise BadRequestError("the request body is empty: send a JSON object")
        try:
            value = json.loads(data)
        except RecursionError:
            raise _too_deep(max_depth) from None
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise BadRequestError(f"the request body is not valid JSON ({exc})") from None
        if json_depth(value, max_depth) > max_depth:
            raise _too_deep(max_depth)
        return value

    # -- response ----------------------------------------------------------------------

    def _start(self, status: int, headers: dict[str, str]) -> None:
        h = self.handler
        self.status = status
        h.send_response(status)
        for name, value in {**self.extra_headers, **headers}.items():
            h.send_header(name, value)
        if self.body_unread:
            # The client may still be sending a body we will not read: the connection
            # cannot carry another request.
            h.close_connection = True
        if h.close_connection:
            h.send_header("Connection", "close")
        h.end_headers()

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        """Send one JSON document."""
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self.send_bytes(status, data, "application/json", headers)

    def send_bytes(self, status: int, data: bytes, content_type: str,
                   headers: dict[str, str] | None = None) -> None:
        """Send a complete body."""
        self._start(status, {"Content-Type": content_type, "Content-Length": str(len(data)),
                             **(headers or {})})
        if self.method != "HEAD":
            self.handler.wfile.write(data)

    def send_error(self, err: EdgeVLMError) -> None:
        """Send an error in the OpenAI shape, with the status the error names."""
        headers = dict(err.headers) if isinstance(err, HTTPError) else {}
        # Hugging Face clients show this header's text as the error message.
        headers["X-Error-Message"] = header_safe(err.message)
        self.send_json(err.http_status, error_body(err), headers)

    def start_chunked(self, status: int, content_type: str, headers: dict[str, str]) -> None:
        """Start a chunked response (its length is not known in advance)."""
        self._start(status, {"Content-Type": content_type, "Transfer-Encoding": "chunked",
                             **headers})
        self._chunked_open = True

    def write_chunk(self, data: bytes) -> None:
        """Send one chunk now (one system call, no buffering)."""
        if data:
            self.handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self) -> None:
        """Send the last chunk."""
        if self._chunked_open:
            self._chunked_open = False
            self.handler.wfile.write(b"0\r\n\r\n")

    @property
    def responded(self) -> bool:
        """Whether the status line went out already."""
        return self.status is not None

    def linger(self) -> None:
        """Before closing with an unread body: stop sending, then drain a little.

        Closing a socket with unread input makes the kernel send a reset, and the client
        may then lose the error response it has not read yet.
        """
        if not self.body_unread:
            return
        sock = self.socket
        deadline = time.monotonic() + _LINGER_S
        drained = 0
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            while drained < _LINGER_BYTES and time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                piece = sock.recv(_PIECE)
                if not piece:
                    break
                drained += len(piece)


def _too_deep(max_depth: int) -> BadRequestError:
    return BadRequestError(
        f"the request JSON nests arrays and objects more than {max_depth} levels deep "
        "(server.max_json_depth)")


def json_depth(value: Any, stop_after: int) -> int:
    """The nesting depth of arrays and objects (1 for ``{}``), counted up to ``stop_after + 1``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > stop_after:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest
