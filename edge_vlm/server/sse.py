"""Server-Sent Events over a chunked response, as the OpenAI and HF clients read them.

Each event is ``data: <json>`` and a blank line; the stream ends with ``data: [DONE]``.
An error after the stream started is one more event, ``data: {"error": {...}}`` (both
clients raise it as an exception), followed by ``[DONE]`` and the end of the response.
"""

from __future__ import annotations

import json

from pydantic import BaseModel

from edge_vlm.errors import EdgeVLMError
from edge_vlm.server.exchange import Exchange, error_body


class SSEStream:
    """Writes events to a client; any write may raise ``OSError`` when the client left.

    Args:
        exchange: The exchange to answer.
        headers: Extra response headers.
    """

    def __init__(self, exchange: Exchange, headers: dict[str, str] | None = None) -> None:
        self._ex = exchange
        exchange.start_chunked(200, "text/event-stream; charset=utf-8", {
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # reverse proxies: do not hold events back
            **(headers or {}),
        })
        self.closed = False

    def send(self, item: BaseModel) -> None:
        """Send a chunk of the chat-completion schema."""
        self._data(item.model_dump_json(exclude_none=True))

    def error(self, err: EdgeVLMError) -> None:
        """Send an error event (the stream then ends with :meth:`close`)."""
        self._data(json.dumps(error_body(err), ensure_ascii=False))

    def _data(self, text: str) -> None:
        self._ex.write_chunk(f"data: {text}\n\n".encode())

    def close(self) -> None:
        """Send ``[DONE]`` and end the response."""
        if not self.closed:
            self.closed = True
            self._data("[DONE]")
            self._ex.end_chunked()
