"""uvicorn's h11 protocol with the one bound it lacks: time to send the request headers.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) and caps the header
size (h11's ``max_incomplete_event_size``), but a client that opens a connection and
sends its headers a byte at a time, or nothing at all, holds it for ever. Here every
connection waiting for request headers gets ``server.read_timeout_s`` to complete them,
then ``408`` and the connection closed. The body has its own limit (:mod:`.body`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderTimeoutH11Protocol(H11Protocol):
    """H11Protocol closing a connection whose request headers take too long.

    The timeout is read from ``config.header_timeout_s`` (set by
    :func:`edge_vlm.server.run.uvicorn_config`).
    """

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._header_timeout_s: float = getattr(config, "header_timeout_s", 30.0)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        waiting_for_headers = self.conn.their_state is h11.IDLE
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()  # the request line and headers are in
        elif waiting_for_headers and self._header_timer is None:
            self._arm_header_timer()  # the next request on a kept-alive connection

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The keep-alive timer now bounds the idle time; once bytes of a next request
        # arrive, data_received arms the header timer again.
        self._disarm_header_timer()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self._header_timeout_s, self._headers_late)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is being written: not a slow client
        body = (b'{"error":{"message":"the request headers did not arrive in time '
                b'(server.read_timeout_s)","type":"invalid_request_error","param":null,'
                b'"code":"request_timeout"}}')
        try:
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        finally:
            self.transport.close()
