"""Helpers shared by the ``test_tui*`` modules (no tests here)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textual.pilot import Pilot

from edge_vlm.config import Settings, load_settings
from edge_vlm.schema import (
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    GenerationStats,
    ImageStats,
)
from edge_vlm.testing import Pair
from edge_vlm.tui.app import ChatApp
from edge_vlm.tui.conversation import ConversationStore
from edge_vlm.tui.session import ChatModel, load_chat_model
from edge_vlm.tui.widgets.transcript import AnswerMessage


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings from defaults only (no user config file), thumbnails as half-blocks."""
    values: dict[str, Any] = {"tui.thumbnails": "halfcell", "runtime.threads": 1,
                              "sampling.max_tokens": 12}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_settings(values, config_file=tmp_path / "no-config.toml")


async def wait_until(pilot: Pilot[Any], condition: Callable[[], bool], timeout: float = 20.0,
                     what: str = "condition") -> None:
    """Poll (letting the app run) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.05)
    await pilot.pause()


def tiny_loader(paths: Pair) -> Callable[[str | None, str | None, Settings], ChatModel]:
    """Loads the tiny model whatever the app names (the app's own choice is recorded)."""
    def load(model: str | None, mmproj: str | None, settings: Settings) -> ChatModel:
        return load_chat_model(str(paths.model), str(paths.mmproj), settings)
    return load


class SlowModel:
    """A real model whose chunks are held back ``delay`` seconds each, so a test can press
    Esc mid-answer. Cancellation still goes to (and is honoured by) the real engine."""

    def __init__(self, inner: ChatModel, delay: float = 0.05) -> None:
        self.inner = inner
        self.name = inner.name
        self.delay = delay
        self.chunks_seen = 0

    def chat(self, messages: Any = None, *, stream: bool = True,
             cancel: threading.Event | None = None,
             **fields: Any) -> Iterator[ChatCompletionChunk]:
        for chunk in self.inner.chat(messages, stream=True, cancel=cancel, **fields):
            self.chunks_seen += 1
            time.sleep(self.delay)
            yield chunk

    def close(self) -> None:
        self.inner.close()


@dataclass
class ScriptedModel:
    """A fake model for screenshots: answers with scripted text and fixed stats, and records
    every call (what was sent, with which fields)."""

    name: str = "shapes-vlm"
    replies: list[list[str]] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=lambda: GenerationStats(
        ttft_ms=182.0, image_encode_ms=95.0, decode_tps=41.5, context_used=96, n_ctx=2048,
        completion_tokens=4, images=[ImageStats(identity="x", width=96, height=72)]))
    history: list[dict[str, Any]] = field(default_factory=list)
    closed: bool = False

    def enqueue(self, *pieces: str) -> None:
        self.replies.append(list(pieces))

    def chat(self, messages: Any = None, *, stream: bool = True,
             cancel: threading.Event | None = None,
             **fields: Any) -> Iterator[ChatCompletionChunk]:
        self.history.append({"messages": messages, **fields})
        pieces = self.replies.pop(0) if self.replies else ["A red circle."]

        def chunk(delta: Delta, finish: Any = None, timings: Any = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id="chatcmpl-test", created=0, model=self.name,
                                       choices=[ChunkChoice(delta=delta, finish_reason=finish)],
                                       timings=timings)

        def gen() -> Iterator[ChatCompletionChunk]:
            yield chunk(Delta(role="assistant", content=""))
            for piece in pieces:
                yield chunk(Delta(content=piece))
            yield chunk(Delta(), "stop", self.stats)
        return gen()

    def close(self) -> None:
        self.closed = True


def scripted_loader(model: ScriptedModel) -> Callable[[str | None, str | None, Settings],
                                                      ChatModel]:
    def load(name: str | None, mmproj: str | None, settings: Settings) -> ChatModel:
        return model
    return load


# --- driving the app ---------------------------------------------------------------

SIZE = (80, 24)
"""Terminal size of the app tests."""


def make_app(tmp_path: Path, loader: Any, **kw: Any) -> ChatApp:
    settings = make_settings(tmp_path, **kw.pop("settings", {}))
    return ChatApp(settings, loader=loader, store=ConversationStore(tmp_path / "convs"),
                   cwd=kw.pop("cwd", tmp_path), **kw)


def notices(app: ChatApp) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def ready(pilot: Any, app: ChatApp) -> None:
    await wait_until(pilot, lambda: app.chat.model is not None, what="the model to load")


async def ask(pilot: Any, app: ChatApp, text: str) -> AnswerMessage:
    """Type a message, press Enter, wait for the whole answer."""
    app.chat.prompt.text = text
    await pilot.press("enter")
    await wait_until(pilot, lambda: not app.chat.generating, what="the answer")
    return list(app.query(AnswerMessage))[-1]


async def attach(pilot: Any, app: ChatApp, path: Path | str) -> None:
    before = len(app.chat.attachments.images)
    app.chat.prompt.text = f"/image {path}"
    await pilot.press("enter")
    await wait_until(pilot, lambda: len(app.chat.attachments.images) > before,
                     what="the image to attach")
