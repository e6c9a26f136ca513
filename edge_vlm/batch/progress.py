"""The rich progress bar of ``edge-vlm batch``: images done / total, rate, ETA, errors.

The rate and ETA come from the :class:`~edge_vlm.batch.summary.Tally` (images worked on
per minute), not from rich's own speed estimate, which resumed (skipped) images would
inflate.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from edge_vlm.batch.results import BatchResult
from edge_vlm.batch.summary import BatchSummary, Tally


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _n(answers: int) -> str:
    return f"{answers} answer{'' if answers == 1 else 's'}"


class BatchProgress:
    """Shows a batch's progress on stderr while results arrive; use it as a context manager.

    Args:
        total_images: Images in the batch.
        console: Where to draw (default: stderr).
        enabled: False: count only, draw nothing.
    """

    def __init__(self, total_images: int, *, console: Console | None = None,
                 enabled: bool = True) -> None:
        self.tally = Tally()
        self.tally.summary.images_total = total_images
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("images"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[errors]}"),
            console=self.console,
            disable=not enabled,
            refresh_per_second=4,
        )
        self._image_reported = -1
        self._task: TaskID = self._progress.add_task(
            "batch", total=total_images, rate="", eta=_clock(None), errors="")

    @property
    def summary(self) -> BatchSummary:
        """The counts so far."""
        return self.tally.summary

    def __enter__(self) -> BatchProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.tally.tick()
        self._progress.stop()

    def update(self, result: BatchResult) -> None:
        """Count one result and redraw."""
        self.tally.add(result)
        s = self.summary
        failed = s.answers_failed
        self._progress.update(
            self._task,
            completed=s.images_done + s.images_skipped,
            rate=f"{s.images_per_min:.1f}/min" if s.images_done else "",
            eta=_clock(s.eta_s()),
            errors=f"[red]{_n(failed)} failed[/red]" if failed else "",
        )
        error = result.error
        if result.status == "error" and error is not None:
            if error.image and self._image_reported == result.image_index:
                return  # one line per bad image, not one per prompt
            self._image_reported = result.image_index if error.image else -1
            self._progress.console.print(
                f"[red]error[/red] {escape(str(result.path))}"
                f"{'' if error.image else ' (' + escape(repr(result.prompt)) + ')'}: "
                f"{escape(error.message)}",
                highlight=False, markup=True, soft_wrap=True)
