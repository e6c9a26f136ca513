"""Counting a batch's results: images done, failed and skipped, answers, rate, cache use."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from edge_vlm.batch.results import BatchResult


@dataclass
class BatchSummary:
    """What a batch did.

    Images count once all their prompts are through: ``images_done`` were worked on in
    this run (``images_failed`` of them with at least one failed answer);
    ``images_skipped`` had every answer in the results file already.
    """

    images_total: int = 0
    images_done: int = 0
    images_failed: int = 0
    images_skipped: int = 0
    answers_ok: int = 0
    answers_failed: int = 0
    answers_skipped: int = 0
    cache_hits: int = 0
    """Answers whose image encoding was reused (KV prefix or embedding cache)."""
    image_encode_ms: float = 0.0
    """Time spent in the vision encoder."""
    elapsed_s: float = 0.0
    interrupted: bool = False

    @property
    def images_per_min(self) -> float:
        """Images worked on per minute of this run (skipped images left out)."""
        return self.images_done / (self.elapsed_s / 60.0) if self.elapsed_s > 0 else 0.0

    @property
    def images_remaining(self) -> int:
        """Images not yet done or skipped."""
        return max(0, self.images_total - self.images_done - self.images_skipped)

    def eta_s(self) -> float | None:
        """Seconds left at the current rate (None before the first image is done)."""
        rate = self.images_per_min
        return self.images_remaining / rate * 60.0 if rate > 0 else None

    def describe(self) -> str:
        """One human line."""
        head = "interrupted" if self.interrupted else "done"
        return (
            f"{head}: {self.images_done} of {_n(self.images_total, 'image')} answered "
            f"({self.images_failed} with errors), {self.images_skipped} already in the "
            f"results, {self.images_remaining} left; answers: {self.answers_ok} "
            f"ok, {self.answers_failed} failed, {self.answers_skipped} skipped; "
            f"{self.elapsed_s:.1f} s, {self.images_per_min:.1f} images/min; image encoding "
            f"reused {_n(self.cache_hits, 'time')} ({self.image_encode_ms / 1000:.1f} s "
            "encoding)"
        )


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


@dataclass
class Tally:
    """Builds a :class:`BatchSummary` from results as they arrive."""

    summary: BatchSummary = field(default_factory=BatchSummary)
    _start: float = field(default_factory=time.perf_counter)
    _image_failed: bool = False
    _image_all_skipped: bool = True

    def add(self, result: BatchResult) -> bool:
        """Count one result; True when it completed its image."""
        s = self.summary
        if result.status == "skipped":
            s.answers_skipped += 1
        else:
            self._image_all_skipped = False
            if result.status == "ok":
                s.answers_ok += 1
            else:
                s.answers_failed += 1
                self._image_failed = True
            if result.timings is not None:
                s.image_encode_ms += result.timings.image_encode_ms
                if any(im.cache_hit for im in result.timings.images):
                    s.cache_hits += 1
        self.tick()
        if not result.last_for_image:
            return False
        if self._image_all_skipped:
            s.images_skipped += 1
        else:
            s.images_done += 1
            s.images_failed += self._image_failed
        self._image_failed, self._image_all_skipped = False, True
        return True

    def tick(self) -> None:
        """Bring ``elapsed_s`` up to now."""
        self.summary.elapsed_s = time.perf_counter() - self._start
