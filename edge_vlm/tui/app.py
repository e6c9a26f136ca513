"""The ``edge-vlm chat`` app."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import ClassVar, Literal

from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen

from edge_vlm.config import Settings
from edge_vlm.tui.clipboard import ClipboardImage, read_image
from edge_vlm.tui.conversation import ConversationStore
from edge_vlm.tui.screens.chat import ChatScreen
from edge_vlm.tui.session import ChatModelLoader, ChatOptions, load_chat_model
from edge_vlm.tui.widgets.thumbnail import prepare


def _samples() -> Path | None:
    from edge_vlm.resolve import samples_dir

    folder = samples_dir()
    return folder if folder.is_dir() else None


class ChatApp(App[None]):
    """Talk about images with a vision-language model running in this process."""

    CSS_PATH = "app.tcss"
    TITLE = "edge-vlm chat"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        settings: Settings,
        *,
        model: str | None = None,
        mmproj: str | None = None,
        images: Sequence[str] = (),
        loader: ChatModelLoader = load_chat_model,
        store: ConversationStore | None = None,
        clipboard: Callable[[], ClipboardImage] = read_image,
        cwd: Path | None = None,
        options: ChatOptions | None = None,
        samples: Path | Literal["auto"] | None = "auto",
    ) -> None:
        """
        Args:
            settings: The settings (the ``tui`` section and the sampling defaults).
            model: Model name or GGUF path (default: ``settings.model.default``).
            mmproj: The mmproj for a model given as a path.
            images: Image paths to attach to the first message.
            loader: Loads a model (tests pass a scripted one).
            store: Where conversations are saved (default: the data dir).
            clipboard: Reads the clipboard image (Ctrl+V).
            cwd: Folder relative paths and exports use (default: the current one).
            options: Start with these options instead of the settings' defaults.
            samples: A folder of sample images to suggest (``auto``: the shipped model's).
        """
        # textual-image asks the terminal about graphics support: only possible before
        # Textual owns the terminal, so it happens here, not when a thumbnail is drawn.
        prepare(settings.tui.thumbnails)
        super().__init__()
        self.settings = settings
        self.chat = ChatScreen(
            settings,
            options or ChatOptions.from_settings(settings, model=model, mmproj=mmproj),
            loader=loader,
            store=store or ConversationStore(),
            clipboard=clipboard,
            cwd=cwd or Path.cwd(),
            initial_images=list(images),
            samples=_samples() if samples == "auto" else samples,
        )

    def get_default_screen(self) -> Screen[None]:
        return self.chat

    def on_mount(self) -> None:
        try:
            self.theme = self.settings.tui.theme
        except Exception:  # an unknown theme name in the settings file
            self.notify(f"unknown theme {self.settings.tui.theme!r} (tui.theme); using the "
                        "default", severity="warning", markup=False)

    def action_help(self) -> None:
        """F1: keys and commands."""
        from edge_vlm.tui.screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        chat = self.chat
        yield SystemCommand("Attach image", "Pick an image file to attach (Ctrl+O)",
                            chat.action_attach)
        yield SystemCommand("Paste image", "Attach the image on the clipboard (Ctrl+V)",
                            chat.action_paste_image)
        yield SystemCommand("New conversation", "Start over (Ctrl+N)", chat.action_new)
        yield SystemCommand("History", "Reopen, delete or export a conversation (Ctrl+R)",
                            chat.action_history)
        yield SystemCommand("Export conversation", "Save it as Markdown in the current "
                            "folder", chat.action_export)
        yield SystemCommand("Settings", "Model, system prompt, temperature, max tokens "
                            "(Ctrl+S)", chat.action_settings)
        yield SystemCommand("Stop answer", "Stop the answer being written (Esc)",
                            chat.action_stop)
        yield SystemCommand("Help", "Every key and command (F1)", self.action_help)
