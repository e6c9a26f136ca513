"""Recent KV-cache states kept in host memory, so that coming back to a conversation does not
pay for its prompt again (pure Python: the bytes come from and go to the backend).

The engine keeps one live KV cache and reuses its prefix. When a request is about to discard
part of it (another conversation, an edited turn), the engine first saves the live state
here, keyed by its exact list of KV items (text token ids; images by content identity and
position count). A later request restores the stored state sharing the longest prefix with
its prompt, when that is longer than what the live cache shares, and evaluates only the
rest. Least recently used states are dropped to stay within the budget
(``cache.kv_ram_mb``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

# A KV item: a text token id, or an image chunk's key (identity + position count).
KVItem = int | tuple[str, int]


@dataclass(frozen=True)
class KVState:
    """One saved sequence state.

    Attributes:
        items: What the KV cache held, in order.
        n_pos: KV positions those items occupy.
        data: llama.cpp's serialised sequence state.
    """

    items: tuple[KVItem, ...]
    n_pos: int
    data: bytearray


def common_prefix(a: Sequence[KVItem], b: Sequence[KVItem]) -> int:
    """How many leading items two sequences share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class KVStateCache:
    """An LRU of :class:`KVState` within ``max_bytes`` (0: off).

    Args:
        max_bytes: Budget for the stored states' bytes.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._states: OrderedDict[tuple[KVItem, ...], KVState] = OrderedDict()
        self.bytes = 0
        self.restores = 0
        """States handed back by :meth:`best` (for stats and tests)."""

    def __len__(self) -> int:
        return len(self._states)

    def put(self, items: Sequence[KVItem], n_pos: int, data: bytearray) -> bool:
        """Store a state (most recently used). A stored state whose items are a prefix of
        these is dropped: the new one holds everything it did.

        Returns:
            False when the state alone is larger than the budget (not stored).
        """
        size = len(data)
        if not self.max_bytes or size > self.max_bytes or not items:
            return False
        key = tuple(items)
        for k in self._states:
            if len(k) >= len(key) and k[:len(key)] == key:  # already held by a longer one
                self._states.move_to_end(k)
                return True
        for old in [k for k in self._states if len(k) <= len(key) and key[:len(k)] == k]:
            self._drop(old)
        while self._states and self.bytes + size > self.max_bytes:
            self._drop(next(iter(self._states)))
        self._states[key] = KVState(key, n_pos, data)
        self.bytes += size
        return True

    def best(self, items: Sequence[KVItem], at_least: int = 0) -> tuple[KVState, int] | None:
        """The state sharing the longest prefix with ``items`` (more than ``at_least``
        items), and that length; marks it recently used."""
        found: tuple[KVState, int] | None = None
        for state in self._states.values():
            n = common_prefix(state.items, items)
            if n > at_least and (found is None or n > found[1]):
                found = (state, n)
        if found is not None:
            self._states.move_to_end(found[0].items)
            self.restores += 1
        return found

    def clear(self) -> None:
        """Drop every state."""
        self._states.clear()
        self.bytes = 0

    def _drop(self, key: tuple[KVItem, ...]) -> None:
        self.bytes -= len(self._states.pop(key).data)
