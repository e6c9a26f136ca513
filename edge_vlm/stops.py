"""Stop strings over a token stream: text is held back only while it may start a stop string."""

from __future__ import annotations

import codecs


class StopFilter:
    """Feeds decoded pieces in, gives back text that is safe to show.

    A stop string is never emitted, even when it arrives split over several tokens, and
    multi-byte UTF-8 characters split over tokens are joined before they are shown.

    Args:
        stops: The stop strings (may be empty).
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Add a token's bytes; return the text that can be emitted now."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        for stop in self._stops:
            at = self._pending.find(stop)
            if at >= 0:
                out = self._pending[:at]
                self._pending = ""
                self.stopped = True
                return out
        hold = self._longest_partial()
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold:]
        return out

    def flush(self) -> str:
        """The text still held back, at the end of generation."""
        if self.stopped:
            return ""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out

    def _longest_partial(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best
