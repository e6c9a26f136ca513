"""What the app needs from the runtime: load a model, stream an answer, list models.

No Textual here. The app runs :func:`stream_answer` in a thread worker and loads models
with a :data:`Loader` in another; both only touch the runtime's public API
(:func:`edge_vlm.load`, :meth:`edge_vlm.api.VLM.chat`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from edge_vlm.config import Settings
from edge_vlm.schema import ChatCompletionChunk, ChatMessage, Detail, GenerationStats


class ChatModel(Protocol):
    """The part of :class:`edge_vlm.api.VLM` the app uses."""

    name: str

    def chat(self, messages: Any = ..., *, stream: Literal[True],
             cancel: threading.Event | None = ...,
             **fields: Any) -> Iterator[ChatCompletionChunk]: ...

    def close(self) -> None: ...


Loader = Callable[[str | None, str | None, Settings], ChatModel]
"""Loads ``(model, mmproj, settings)``; raises :class:`~edge_vlm.errors.EdgeVLMError`."""


def default_loader(model: str | None, mmproj: str | None, settings: Settings) -> ChatModel:
    """Load through the public API (llama.cpp is imported here, in the worker)."""
    import edge_vlm

    return edge_vlm.load(model, mmproj, settings=settings)


@dataclass(frozen=True)
class ChatOptions:
    """What the user can change from inside the app (defaults from the settings)."""

    model: str | None
    """Model name or GGUF path (None: ``model.default``)."""
    mmproj: str | None
    system: str
    """System prompt for the current conversation (empty: none)."""
    temperature: float
    max_tokens: int
    detail: Detail = "auto"
    """Detail of the images attached from now on (``image_url.detail``)."""

    @classmethod
    def from_settings(cls, settings: Settings, *, model: str | None = None,
                      mmproj: str | None = None) -> ChatOptions:
        return cls(model=model or settings.model.default,
                   mmproj=mmproj if mmproj is not None else settings.model.mmproj,
                   system=settings.tui.system_prompt,
                   temperature=settings.sampling.temperature,
                   max_tokens=settings.sampling.max_tokens,
                   detail=settings.images.detail)

    def with_changes(self, **changes: Any) -> ChatOptions:
        return replace(self, **changes)

    def model_key(self) -> tuple[str | None, str | None]:
        """What identifies the loaded model: changing it means reloading."""
        return (self.model, self.mmproj or None)


@dataclass(frozen=True)
class AnswerEnd:
    """How an answer ended."""

    finish_reason: str
    """``stop``, ``length`` or ``cancelled``."""
    stats: GenerationStats | None


def stream_answer(
    model: ChatModel,
    messages: list[ChatMessage],
    options: ChatOptions,
    cancel: threading.Event,
    emit: Callable[[str], object],
    *,
    interval_s: float = 1 / 30,
) -> AnswerEnd:
    """Generate an answer, handing text to ``emit`` in batches of at most ``interval_s``.

    Batching keeps a fast model from flooding the UI with one message per token; the UI
    still sees text as it comes (a batch is sent as soon as the interval has passed).

    Raises:
        EdgeVLMError: from the runtime (bad image, context overflow, ...).
    """
    if cancel.is_set():
        return AnswerEnd("cancelled", None)
    pending: list[str] = []
    last = time.monotonic()
    end = AnswerEnd("stop", None)
    for chunk in model.chat(messages, stream=True, cancel=cancel,
                            max_tokens=options.max_tokens, temperature=options.temperature):
        for choice in chunk.choices:
            if choice.delta.content:
                pending.append(choice.delta.content)
            if choice.finish_reason is not None:
                end = AnswerEnd(choice.finish_reason, chunk.timings)
        now = time.monotonic()
        if pending and now - last >= interval_s:
            emit("".join(pending))
            pending.clear()
            last = now
    if pending:
        emit("".join(pending))
    return end


def format_stats(stats: GenerationStats) -> str:
    """One short line of an answer's stats.

    ``ttft 120 ms · image 35 ms (low, 1 tile, 64 tok) · 24.1 tok/s · ctx 412/4096``: the image
    part names the detail, tiles and image tokens of a single image; several
    images show their count and total tokens.
    """
    parts = [f"ttft {stats.ttft_ms:.0f} ms"]
    if stats.images:
        cached = sum(1 for im in stats.images if im.cache_hit)
        if len(stats.images) == 1:
            im = stats.images[0]
            what = [im.detail, f"{im.tiles} tile" + ("s" if im.tiles != 1 else "")]
        else:
            what = [f"{len(stats.images)} images"]
        what.append(f"{sum(im.tokens for im in stats.images)} tok")
        if cached == len(stats.images):
            what.append("cached")
        elif cached:
            what.append(f"{cached}/{len(stats.images)} cached")
        parts.append(f"image {stats.image_encode_ms:.0f} ms ({', '.join(what)})")
    tps = stats.decode_tps
    parts.append(f"{tps:.0f} tok/s" if tps >= 100 else f"{tps:.1f} tok/s")
    parts.append(f"ctx {stats.context_used}/{stats.n_ctx}")
    return " · ".join(parts)


def installed_models() -> list[str]:
    """Names of the models installed in the model store (empty without a store)."""
    try:
        from edge_vlm.store.store import Store
    except ImportError:  # an install without the store
        return []
    try:
        models, _problems = Store.default().installed()
    except Exception:  # a broken store must not break the settings dialog
        return []
    return sorted({m.name for m in models})
