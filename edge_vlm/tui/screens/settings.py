"""Ctrl+S / F2: model, system prompt, temperature, max tokens, image detail; returns options."""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widgets import Button, Input, Label, Select, Static, TextArea

from edge_vlm.tui.session import ChatOptions


def parse_temperature(text: str) -> float:
    """A temperature from 0 to 2. Raises ValueError with a message for a person."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"temperature must be a number from 0 to 2, got {text!r}") from None
    if not 0.0 <= value <= 2.0:
        raise ValueError(f"temperature must be from 0 to 2, got {value:g}")
    return value


def parse_max_tokens(text: str) -> int:
    """A positive token count. Raises ValueError with a message for a person."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"max tokens must be a whole number, got {text!r}") from None
    if value < 1:
        raise ValueError(f"max tokens must be at least 1, got {value}")
    return value


DETAIL_CHOICES = [
    ("auto: within the image-token budget", "auto"),
    ("low: one tile, fastest", "low"),
    ("high: every tile the model allows", "high"),
]
"""``image_url.detail`` of the images attached from now on."""


class SettingsScreen(ModalScreen[ChatOptions | None]):
    """Edit the session's options; Ctrl+S or Save applies, Esc cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss(None)", "Cancel"),
        Binding("ctrl+s", "save", "Save"),
    ]

    def __init__(self, options: ChatOptions, installed: list[str]) -> None:
        super().__init__()
        self._options = options
        self._installed = installed

    def compose(self) -> ComposeResult:
        o = self._options
        names = ["default", *self._installed]
        with Vertical(id="settings-dialog", classes="dialog"):
            yield Static("Settings — Ctrl+S saves, Esc cancels", classes="dialog-title",
                         markup=False)
            with Horizontal(classes="field"):
                yield Label("Model")
                yield Input(o.model or "default", id="model", compact=True,
                            suggester=SuggestFromList(names, case_sensitive=False),
                            placeholder="installed name, 'default' or a GGUF path")
            yield Static("installed: " + ", ".join(names), id="installed", markup=False,
                         classes="hint")
            with Horizontal(classes="field"):
                yield Label("mmproj")
                yield Input(o.mmproj or "", id="mmproj", compact=True,
                            placeholder="for a GGUF path (found beside it if empty)")
            yield Label("System prompt (this conversation)")
            yield TextArea(o.system, id="system", soft_wrap=True, compact=True)
            with Horizontal(classes="field"):
                yield Label("Temperature")
                yield Input(f"{o.temperature:g}", id="temperature", compact=True)
            with Horizontal(classes="field"):
                yield Label("Max tokens")
                yield Input(str(o.max_tokens), id="max-tokens", compact=True, type="integer")
            with Horizontal(classes="field"):
                yield Label("Image detail")
                yield Select(DETAIL_CHOICES, value=o.detail, allow_blank=False, id="detail",
                             compact=True)
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#model", Input).focus()

    def action_save(self) -> None:
        try:
            temperature = parse_temperature(self.query_one("#temperature", Input).value)
            max_tokens = parse_max_tokens(self.query_one("#max-tokens", Input).value)
        except ValueError as err:
            self.notify(str(err), severity="error", markup=False)
            return
        model = self.query_one("#model", Input).value.strip() or "default"
        mmproj = self.query_one("#mmproj", Input).value.strip() or None
        detail = self.query_one("#detail", Select).value
        self.dismiss(self._options.with_changes(
            model=model, mmproj=mmproj, system=self.query_one("#system", TextArea).text,
            temperature=temperature, max_tokens=max_tokens,
            detail=detail if detail in ("auto", "low", "high") else self._options.detail))

    @on(Button.Pressed, "#save")
    def _save(self) -> None:
        self.action_save()

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self.action_save()
