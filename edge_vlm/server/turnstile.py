"""One generation at a time per model, in arrival order, waiting bounded in time.

The engine's own lock already serialises generations; this queue in front of it is what
the server needs on top: first come first served, a deadline, giving up when the client
left, and a running estimate of how long a turn takes (for ``Retry-After``).
"""

from __future__ import annotations

import threading
import time
from collections import deque

from edge_vlm.server.errors import ClientGone, ServiceUnavailableError

_POLL_S = 0.1


class Turnstile:
    """A FIFO mutex with deadlines and cancellation."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._busy = False
        self.avg_turn_s = 1.0
        """Exponential moving average of how long a turn lasts."""

    @property
    def waiting(self) -> int:
        """Requests waiting for their turn."""
        with self._cond:
            return len(self._queue)

    def enter(self, deadline: float, cancel: threading.Event, what: str) -> None:
        """Wait for this caller's turn.

        Args:
            deadline: ``time.monotonic()`` value after which to give up.
            cancel: Set when the client left.
            what: The model's name, for the error message.

        Raises:
            ServiceUnavailableError: the deadline passed first (503, ``Retry-After``).
            ClientGone: ``cancel`` was set first.
        """
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while self._busy or self._queue[0] is not ticket:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ServiceUnavailableError(
                            f"model {what!r} stayed busy with other requests until this "
                            "request's time ran out (server.request_timeout_s); retry later",
                            retry_after=self.avg_turn_s * max(1, len(self._queue)),
                            code="queue_timeout")
                    if cancel.is_set():
                        raise ClientGone
                    self._cond.wait(min(remaining, _POLL_S))
                self._queue.popleft()
                self._busy = True
            except BaseException:
                if ticket in self._queue:
                    self._queue.remove(ticket)
                    self._cond.notify_all()
                raise

    def leave(self, turn_s: float) -> None:
        """End the current turn, which lasted ``turn_s`` seconds."""
        with self._cond:
            self._busy = False
            self.avg_turn_s = 0.8 * self.avg_turn_s + 0.2 * max(turn_s, 0.01)
            self._cond.notify_all()
