"""What the app needs from the runtime: load a model, stream an answer, list models.

No Textual here. The app runs :func:`stream_answer` in a thread worker and loads models
with a :data:`ChatModelLoader` in another; both only touch the runtime's public API
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


ChatModelLoader = Callable[[str | None, str | None, Settings], ChatModel]
"""Loads ``(model, mmproj, settings)``; raises :class:`~edge_vlm.errors.EdgeVLMError`."""


def load_chat_model(model: str | None, mmproj: str | None, settings: Settings) -> ChatModel:
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


def installed_names(settings: Settings) -> list[str]:
    """Names of the models installed in the model store (empty when it cannot be read: a
    broken store must not break the settings dialog)."""
    try:
        from edge_vlm.preflight import open_store

        return open_store(settings).names()
    except Exception:  # an install without the store, or a store that cannot be read
        return []
