"""F1 / ``/help``: every key and command."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from edge_vlm.tui.commands import KEYS, command_help_rows


class HelpScreen(ModalScreen[None]):
    """Keys and slash commands, in two tables; Esc, F1 or q closes."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,f1,q", "dismiss(None)", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="help-dialog", classes="dialog"):
            yield Static("Keys and commands", classes="dialog-title", markup=False)
            table: DataTable[Text] = DataTable(id="help-table", cursor_type="row",
                                              zebra_stripes=True, show_header=False)
            yield table
            yield Static("Type // to send a message starting with /.  Esc closes.",
                         classes="dialog-hint", markup=False)

    def on_mount(self) -> None:
        table: DataTable[Text] = self.query_one(DataTable)
        table.add_columns("key", "does")
        # Text, not str: DataTable reads str cells as markup and "[PATH]" would vanish.
        for key in KEYS:
            table.add_row(Text(key.keys, style="bold"), Text(key.action))
        table.add_row(Text(""), Text(""))
        for usage, text in command_help_rows():
            table.add_row(Text(usage, style="bold"), Text(text))
        table.focus()
