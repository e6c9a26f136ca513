"""What a batch yields: one :class:`BatchResult` per (image, prompt), and its results-file line.

Both engines (one machine, Ray Data) build these with the same code, so their lines are
the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_vlm.schema import GenerationStats, Usage

Status = Literal["ok", "error", "skipped"]


@dataclass(frozen=True)
class BatchError:
    """Why an answer failed: the error class name and a message fit for a person."""

    type: str
    message: str
    image: bool = field(default=False, compare=False)
    """True when the image itself is at fault (every prompt about it fails the same way)."""


@dataclass
class BatchResult:
    """One answer of a batch, or one skipped because the results file already holds it.

    Attributes:
        path: The image file, as named in the inputs.
        image_index: Position of the image in the batch (0-based).
        prompt_index: Position of the prompt among the image's prompts (the turn, with
            ``conversation``).
        last_for_image: True on the image's last prompt.
        image_sha256: SHA-256 of the file's bytes (None when it could not be read).
        prompt: The question.
        status: ``ok``, ``error`` or ``skipped`` (already in the results file).
        answer: The text, or the parsed JSON value with a schema.
        text: The answer exactly as generated.
        finish_reason: ``stop``, ``length`` or ``cancelled``.
        usage: Token counts.
        timings: The engine's stats of this answer.
        model: The model's name.
        settings: Hash of the answer-changing settings.
        key: The resume key.
        error: What went wrong, for ``error`` results.
        recorded: For ``skipped`` results, the line found in the results file.
    """

    path: Path
    image_index: int
    prompt_index: int
    last_for_image: bool
    image_sha256: str | None
    prompt: str
    status: Status
    model: str
    settings: str
    key: str
    answer: Any = None
    text: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: GenerationStats | None = None
    error: BatchError | None = None
    recorded: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """True unless the answer failed."""
        return self.status != "error"

    def record(self) -> dict[str, Any]:
        """The results-file line of this answer."""
        if self.recorded is not None:
            return self.recorded
        return {
            "path": str(self.path),
            "image_sha256": self.image_sha256,
            "prompt": self.prompt,
            "prompt_index": self.prompt_index,
            "answer": self.answer,
            "finish_reason": self.finish_reason,
            "usage": self.usage.model_dump() if self.usage else None,
            "timings": self.timings.model_dump() if self.timings else None,
            "model": self.model,
            "settings": self.settings,
            "key": self.key,
            "error": ({"type": self.error.type, "message": self.error.message}
                      if self.error else None),
        }
