"""A bounded in-memory LRU of vision-encoder outputs.

Keyed by the mmproj's fingerprint, the preprocessing settings and the image's content
identity (never its path or URL: a changed file at the same path must not hit).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import numpy.typing as npt

Key = tuple[str, ...]


class EmbeddingCache:
    """An LRU bounded by bytes.

    Args:
        max_bytes: The budget; 0 turns the cache off.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Key, npt.NDArray[np.float32]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Key) -> npt.NDArray[np.float32] | None:
        """The cached embeddings, or None; a hit becomes the most recently used."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Key, value: npt.NDArray[np.float32]) -> None:
        """Store embeddings, evicting the least recently used beyond the budget."""
        size = int(value.nbytes)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= int(old.nbytes)
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes and self._items:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= int(evicted.nbytes)

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._items.clear()
            self._bytes = 0
