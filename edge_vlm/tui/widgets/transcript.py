"""The conversation as it is shown: questions with their thumbnails, answers in Markdown."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from markdown_it import MarkdownIt
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream

from edge_vlm.schema import GenerationStats
from edge_vlm.stats import short_line
from edge_vlm.tui.attachments import PendingImage
from edge_vlm.tui.conversation import Attachment, Conversation, answer_note
from edge_vlm.tui.paths import display_path
from edge_vlm.tui.safetext import visible
from edge_vlm.tui.widgets.thumbnail import Thumbnail

WELCOME = (
    "Attach an image with /image PATH (Tab completes), Ctrl+O to browse, by dropping or "
    "pasting a file, or Ctrl+V for the clipboard; then ask about it and press Enter.\n"
    "F1 lists every key and command.")


def _parser() -> MarkdownIt:
    # No raw HTML: a model writing "<b>" gets "<b>" on screen, not bold text.
    return MarkdownIt("gfm-like", {"html": False})


class UserMessage(Vertical):
    """A question, with a thumbnail of each image it carried."""

    def __init__(self, text: str, images: list[tuple[bytes | Path, str]], *,
                 thumbnails: str, thumb_height: int = 6) -> None:
        super().__init__(classes="message user")
        self._text = text
        self._images = images
        self._mode = thumbnails
        self._height = thumb_height

    def compose(self) -> ComposeResult:
        yield Static("You", classes="role", markup=False)
        if self._images:
            with Horizontal(classes="thumbnails"):
                for source, caption in self._images:
                    yield Thumbnail(source, caption, mode=self._mode, height=self._height)
        if self._text:
            yield Static(visible(self._text), classes="text", markup=False)


class AnswerMessage(Vertical):
    """An answer: streamed into a Markdown widget, then a line of stats or a note."""

    def __init__(self, model: str, text: str = "") -> None:
        super().__init__(classes="message assistant")
        self._model = model
        self._initial = text
        self._stream: MarkdownStream | None = None
        self.raw = text
        """The answer as the model wrote it (shown with control characters made visible)."""

    def compose(self) -> ComposeResult:
        yield Static(self._model, classes="role", markup=False)
        yield Markdown(visible(self._initial), parser_factory=_parser, open_links=False,
                       classes="answer")
        yield Static("", classes="meta", markup=False)

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)

    def set_meta(self, text: str) -> None:
        """The small line under the answer."""
        self.query_one(".meta", Static).update(text)

    async def append(self, text: str) -> None:
        """Add streamed text."""
        if self._stream is None:
            self._stream = Markdown.get_stream(self.markdown)
        self.raw += text
        await self._stream.write(visible(text))

    async def finish(self, finish_reason: str | None, stats: GenerationStats | None, *,
                     show_stats: bool) -> None:
        """End the stream with one full update and show how the answer ended."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        await self.markdown.update(visible(self.raw))
        self.set_meta(answer_meta(finish_reason, stats, show_stats=show_stats))
        self.set_class(finish_reason == "cancelled", "stopped")

    async def abandon(self) -> None:
        """Stop streaming without a final update (the answer failed)."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None


def answer_meta(finish_reason: str | None, stats: GenerationStats | None, *,
                show_stats: bool) -> str:
    """``■ stopped · ttft 120 ms · ...``."""
    parts = []
    note = answer_note(finish_reason)
    if note:
        parts.append(("■ " if finish_reason == "cancelled" else "… ") + note)
    if show_stats and stats is not None:
        parts.append(short_line(stats))
    return " · ".join(parts)


class Transcript(VerticalScroll):
    """The scrolling conversation; stays at the bottom while an answer streams in."""

    def __init__(self, *, thumbnails: str, show_stats: bool, thumb_height: int = 6,
                 samples: Path | None = None, id: str | None = None) -> None:
        super().__init__(id=id)
        self.thumbnails = thumbnails
        self.show_stats = show_stats
        self.thumb_height = thumb_height
        self.welcome = WELCOME
        if samples is not None:
            self.welcome += f"\nSample images to try: /image {display_path(samples)}/ (Tab)"

    def compose(self) -> ComposeResult:
        yield Static(self.welcome, id="welcome", markup=False)

    def on_mount(self) -> None:
        self.anchor()

    async def add_user(self, text: str, images: list[PendingImage]) -> UserMessage:
        """Show a question with the images as attached."""
        await self._hide_welcome()
        widget = UserMessage(text, [(im.data, im.label()) for im in images],
                             thumbnails=self.thumbnails, thumb_height=self.thumb_height)
        await self.mount(widget)
        self.anchor()
        return widget

    async def add_answer(self, model: str) -> AnswerMessage:
        """Show an empty answer to stream into."""
        widget = AnswerMessage(model)
        await self.mount(widget)
        widget.set_meta("writing… (Esc stops)")
        self.anchor()
        return widget

    async def show(self, conversation: Conversation,
                   image_path: Callable[[Attachment], Path]) -> None:
        """Replace what is shown with a saved conversation."""
        await self.remove_children()
        if not conversation.turns:
            await self.mount(Static(self.welcome, id="welcome", markup=False))
        widgets: list[UserMessage | AnswerMessage] = []
        for turn in conversation.turns:
            if turn.role == "user":
                widgets.append(UserMessage(
                    turn.text, [(image_path(a), a.label()) for a in turn.attachments],
                    thumbnails=self.thumbnails, thumb_height=self.thumb_height))
            else:
                widgets.append(AnswerMessage(turn.model or "assistant", turn.text))
        await self.mount_all(widgets)
        for widget, turn in zip(widgets, conversation.turns, strict=True):
            if isinstance(widget, AnswerMessage):
                widget.set_meta(answer_meta(turn.finish_reason, turn.stats,
                                            show_stats=self.show_stats))
                widget.set_class(turn.finish_reason == "cancelled", "stopped")
        self.scroll_end(animate=False)
        self.anchor()

    async def _hide_welcome(self) -> None:
        for welcome in self.query("#welcome"):
            await welcome.remove()
