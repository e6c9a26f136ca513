"""Reading a request body: a byte cap counted while reading, a time limit, JSON depth.

The HTTP framing (``Content-Length``, chunked encoding, trailers, duplicate headers) is
h11's job; what arrives here is the body's bytes, in pieces. ``Content-Length`` is only
used to refuse early, never to size a buffer; a chunked body is counted the same way.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import Request

from edge_vlm.config import ServerSettings
from edge_vlm.server.errors import (
    BadRequestError,
    ClientGone,
    LengthRequiredError,
    PayloadTooLargeError,
    RequestTimeoutError,
)

#: Bytes and seconds spent draining a refused body before answering, so the client reads
#: the error response instead of a connection reset.
_DRAIN_BYTES = 4 * 1024 * 1024
_DRAIN_S = 2.0


def _too_large(size: str, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the request body is {size}, over the {limit}-byte limit "
        "(server.max_body_bytes); send smaller images or raise the limit",
        headers={"Connection": "close"})


async def read_body(request: Request, settings: ServerSettings) -> bytes:
    """Read the whole body of ``request`` under the server's limits.

    Raises:
        PayloadTooLargeError: over ``max_body_bytes`` (declared or counted).
        RequestTimeoutError: the body did not arrive within ``read_timeout_s``.
        LengthRequiredError: neither ``Content-Length`` nor chunked encoding.
        ClientGone: the client closed the connection.
    """
    limit = settings.max_body_bytes
    length = request.headers.get("content-length")
    chunked = "transfer-encoding" in request.headers
    if length is None and not chunked:
        raise LengthRequiredError("the request has no body: send JSON with a "
                                  "Content-Length header")
    if length is not None and int(length) > limit:  # h11 checked it is a number
        if request.headers.get("expect", "").lower() != "100-continue":
            await _drain(request, int(length))
        raise _too_large(f"{length} bytes", limit)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.read_timeout_s
    pieces: list[bytes] = []
    total = 0
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                message = await request.receive()
        except TimeoutError:
            raise RequestTimeoutError(
                "the request body did not arrive in time (server.read_timeout_s); "
                "send the whole request at once", headers={"Connection": "close"}) from None
        if message["type"] == "http.disconnect":
            raise ClientGone
        piece = message.get("body", b"")
        total += len(piece)
        if total > limit:
            await _drain(request, _DRAIN_BYTES)
            raise _too_large(f"more than {limit} bytes (chunked)", limit)
        pieces.append(piece)
        if not message.get("more_body", False):
            return b"".join(pieces)


async def _drain(request: Request, most: int) -> None:
    """Read and drop up to ``most`` bytes of a refused body (bounded in time)."""
    drained = 0
    try:
        async with asyncio.timeout(_DRAIN_S):
            while drained < min(most, _DRAIN_BYTES):
                message = await request.receive()
                if message["type"] != "http.request":
                    return
                drained += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
    except TimeoutError:
        return


async def read_json(request: Request, settings: ServerSettings) -> Any:
    """Read the body as JSON, refusing nesting deeper than ``max_json_depth``.

    Raises:
        BadRequestError: empty, not JSON, or too deep.
        PayloadTooLargeError, RequestTimeoutError, LengthRequiredError, ClientGone: see
            :func:`read_body`.
    """
    data = await read_body(request, settings)
    max_depth = settings.max_json_depth
    if not data.strip():
        raise BadRequestError("the request body is empty: send a JSON object")
    try:
        value = json.loads(data)
    except RecursionError:  # the C parser stops cleanly at Python's recursion limit
        raise _too_deep(max_depth) from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise BadRequestError(f"the request body is not valid JSON ({exc})") from None
    if json_depth(value, max_depth) > max_depth:
        raise _too_deep(max_depth)
    return value


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


def header_flag(request: Request, name: str, default: bool) -> bool:
    """A boolean request header such as ``x-use-cache: false``."""
    value = request.headers.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return default
