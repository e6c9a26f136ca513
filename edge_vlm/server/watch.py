"""Notice a client that left, or a request past its deadline, while the model works.

A client closing its connection makes the socket readable with nothing to read. A thread
per running request waits for exactly that (``select``, woken by the kernel, not polled)
and sets the request's cancel flag, which the engine checks between tokens: a client
that disconnects mid-stream frees the model within one token, even during a long prompt
evaluation where nothing is being written to it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from types import TracebackType

_TICK_S = 0.25
#: Not on Windows; there ``select`` having said "readable" is what keeps recv from waiting.
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


class Watch:
    """Sets ``cancel`` when the client disconnects or ``deadline`` passes.

    Use as a context manager around the work; leaving it stops the thread.

    Args:
        sock: The client's connection.
        cancel: The request's cancel flag.
        deadline: ``time.monotonic()`` value of the request's deadline.
    """

    def __init__(self, sock: socket.socket, cancel: threading.Event, deadline: float) -> None:
        self._sock = sock
        self.cancel = cancel
        self.deadline = deadline
        self.client_gone = False
        self.timed_out = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-vlm-watch", daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * _TICK_S)

    def _run(self) -> None:
        watching = True
        while not self._stop.is_set():
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.timed_out = True
                self.cancel.set()
                return
            if not watching:
                self._stop.wait(min(_TICK_S, remaining))
                continue
            try:
                readable, _, _ = select.select([self._sock], [], [], min(_TICK_S, remaining))
            except (OSError, ValueError):  # closed under us
                self._gone()
                return
            if not readable or self._stop.is_set():
                continue
            try:
                data = self._sock.recv(1, socket.MSG_PEEK | _DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                self._gone()
                return
            if not data:
                self._gone()
                return
            # The client sent more (a pipelined request): it is still there, and from now
            # on only a failed write can tell otherwise; keep watching the deadline.
            watching = False

    def _gone(self) -> None:
        self.client_gone = True
        self.cancel.set()

    def mark_gone(self) -> None:
        """Record that a write to the client failed."""
        with contextlib.suppress(Exception):
            self._gone()
