"""The message box: Enter sends, Shift+Enter (or Alt+Enter, Ctrl+J) adds a line, a pasted
image path attaches the image, Tab completes the path after ``/image``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from textual import events
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import TextArea

from edge_vlm.tui.paths import complete_path, last_word_start, parse_pasted_paths

_NEWLINE_KEYS = frozenset({"shift+enter", "alt+enter", "ctrl+j", "newline"})
_IMAGE_PREFIXES = ("/image ", "/img ")


class PromptInput(TextArea):
    """A multi-line message box for the chat."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+v", "screen.paste_image", "Paste image", show=False),
    ]

    @dataclass
    class Submitted(Message):
        """Enter was pressed: send or run what was typed."""

        prompt: PromptInput
        text: str

    @dataclass
    class PathsPasted(Message):
        """The terminal pasted (dropped) paths of existing image files."""

        prompt: PromptInput
        paths: list[Path]

    @dataclass
    class Completions(Message):
        """Tab found several names for the path being typed."""

        prompt: PromptInput
        candidates: list[str]

    def __init__(self, *, id: str | None = None, placeholder: str = "",
                 cwd: Path | None = None) -> None:
        super().__init__(id=id, soft_wrap=True, show_line_numbers=False, tab_behavior="focus",
                         highlight_cursor_line=False, placeholder=placeholder)
        self.cwd = cwd

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        if event.key in _NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        if event.key == "tab" and self._complete():
            event.stop()
            event.prevent_default()
        # Otherwise Textual goes on to TextArea._on_key (handlers run along the MRO).

    async def _on_paste(self, event: events.Paste) -> None:
        paths = parse_pasted_paths(event.text, self.cwd)
        if paths is not None and not self.read_only:
            event.stop()
            event.prevent_default()
            self.post_message(self.PathsPasted(self, paths))
        # Otherwise TextArea._on_paste inserts the text (handlers run along the MRO).

    def _complete(self) -> bool:
        """Complete the last path of an ``/image`` command; False when not in one."""
        text = self.text
        lowered = text.lower()
        if "\n" in text or not lowered.startswith(_IMAGE_PREFIXES):
            return False
        if self.cursor_location != self.document.end:
            return False
        start = last_word_start(text)
        head, last = text[:start], text[start:]
        done = complete_path(last, self.cwd)
        if done.text != last:
            self.text = head + done.text
            self.move_cursor(self.document.end)
        if done.candidates:
            self.post_message(self.Completions(self, done.candidates))
        return True
