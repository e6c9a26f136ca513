"""The answers already in an output file, looked up by resume key.

A multiset: two identical files in one batch have the same key, and each must find its own
line, so a key found ``n`` times skips ``n`` answers, not every answer with that key.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any


class ResumeIndex:
    """Recorded answers by key, each usable once."""

    def __init__(self) -> None:
        self._done: defaultdict[str, deque[dict[str, Any]]] = defaultdict(deque)
        self._count = 0

    def add(self, record: dict[str, Any]) -> None:
        """Remember a successful output line (it must carry a ``key``)."""
        self._done[str(record["key"])].append(record)
        self._count += 1

    def take(self, key: str) -> dict[str, Any] | None:
        """The recorded line for ``key``, consumed; None when the work is still to do."""
        queue = self._done.get(key)
        if not queue:
            return None
        self._count -= 1
        return queue.popleft()

    def has(self, key: str) -> bool:
        """True when a line for ``key`` is still unused."""
        return bool(self._done.get(key))

    def keys(self) -> dict[str, Any]:
        """Each unused key with its first recorded answer (what a Ray worker needs to skip
        the work, and to continue a resumed conversation)."""
        return {k: q[0].get("answer") for k, q in self._done.items() if q}

    def __len__(self) -> int:
        return self._count
