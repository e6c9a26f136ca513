"""Ctrl+R / ``/history``: saved conversations; open, delete or export one."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from edge_vlm.tui.conversation import ConversationError, ConversationStore, Summary
from edge_vlm.tui.safetext import one_line
from edge_vlm.tui.screens.confirm import ConfirmScreen


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


class HistoryScreen(ModalScreen[str | None]):
    """The saved conversations, newest first; returns the id to open, or None."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("d,delete", "delete", "Delete"),
        Binding("e", "export", "Export Markdown"),
    ]

    def __init__(self, store: ConversationStore, *, export_dir: Path,
                 current: str | None = None) -> None:
        super().__init__()
        self._store = store
        self._export_dir = export_dir
        self._current = current
        self._summaries: list[Summary] = []

    def compose(self) -> ComposeResult:
        with Vertical(id="history-dialog", classes="dialog"):
            yield Static("History — Enter opens, d deletes, e exports Markdown, Esc closes",
                         classes="dialog-title", markup=False)
            yield OptionList(id="history-list")
            yield Static("", id="history-empty", markup=False)

    def on_mount(self) -> None:
        self._reload()
        self.query_one(OptionList).focus()

    def _reload(self, keep: int = 0) -> None:
        self._summaries = self._store.list()
        options = self.query_one(OptionList)
        options.clear_options()
        for s in self._summaries:
            mark = "● " if s.id == self._current else "  "
            text = (f"{mark}{one_line(s.title, 44):<44}  {_when(s.updated)}  "
                    f"{s.turns} msg")
            options.add_option(Option(Content(text), id=s.id))
        empty = self.query_one("#history-empty", Static)
        empty.update("" if self._summaries else f"No saved conversations in {self._store.root}")
        if self._summaries:
            options.highlighted = min(keep, len(self._summaries) - 1)

    def _selected(self) -> Summary | None:
        index = self.query_one(OptionList).highlighted
        if index is None or not 0 <= index < len(self._summaries):
            return None
        return self._summaries[index]

    @on(OptionList.OptionSelected)
    def _open(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(event.option.id)

    @work
    async def action_delete(self) -> None:
        chosen = self._selected()
        if chosen is None:
            return
        index = self.query_one(OptionList).highlighted or 0
        if not await self.app.push_screen_wait(
                ConfirmScreen(f"Delete “{one_line(chosen.title, 50)}”? This cannot be undone.")):
            return
        try:
            self._store.delete(chosen.id)
        except ConversationError as err:
            self.notify(err.message, severity="error", markup=False)
            return
        self.notify(f"Deleted “{one_line(chosen.title, 50)}”", markup=False)
        self._reload(keep=index)

    def action_export(self) -> None:
        chosen = self._selected()
        if chosen is None:
            return
        try:
            path = self._store.export_markdown(self._store.load(chosen.id), self._export_dir)
        except ConversationError as err:
            self.notify(err.message, severity="error", markup=False)
            return
        self.notify(f"Exported to {path}", markup=False)
