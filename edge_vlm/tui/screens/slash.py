"""The slash commands typed in the message box (``/image``, ``/model``, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edge_vlm.tui.paths import split_words, to_path
from edge_vlm.tui.safetext import one_line
from edge_vlm.tui.screens.settings import parse_max_tokens, parse_temperature

if TYPE_CHECKING:
    from edge_vlm.tui.screens.chat import ChatScreen


class SlashCommands:
    """Runs one command against the chat screen.

    Each handler returns True when the command is done (the box is cleared), False when
    the typed text should stay; a ValueError is shown as an error and keeps the text.
    """

    def __init__(self, screen: ChatScreen) -> None:
        self.screen = screen

    async def run(self, name: str, args: str) -> bool:
        """Run ``/name args``."""
        handler = getattr(self, "cmd_" + name.replace("-", "_"))
        done: bool = await handler(args)
        return done

    async def cmd_image(self, args: str) -> bool:
        s = self.screen
        if not args:
            s.action_attach()
            return True
        words = split_words(args)
        if words is None:
            raise ValueError("/image: a quote is not closed")
        s.read_images([to_path(w, s.cwd) for w in words], s.prompt.text)
        return False  # the box is cleared once every image was read

    async def cmd_detach(self, args: str) -> bool:
        bar = self.screen.attachments
        count = len(bar.images)
        if not args:
            await bar.clear()
            return True
        try:
            index = int(args)
        except ValueError:
            raise ValueError(f"/detach takes an image number, got {args!r}") from None
        if not 1 <= index <= count:
            raise ValueError(f"/detach: there is no image {index} ({count} attached)")
        await bar.remove_at(index - 1)
        return True

    async def cmd_new(self, args: str) -> bool:
        return await self.screen.new_conversation()

    async def cmd_history(self, args: str) -> bool:
        self.screen.action_history()
        return True

    async def cmd_export(self, args: str) -> bool:
        s = self.screen
        return s.export(to_path(args, s.cwd) if args else s.cwd)

    async def cmd_system(self, args: str) -> bool:
        s = self.screen
        if not args:
            s.action_settings()
            return True
        text = "" if args == "-" else args
        s.apply_options(s.options.with_changes(system=text))
        s.notify("System prompt cleared" if not text else
                 f"System prompt: {one_line(text, 60)}", markup=False)
        return True

    async def cmd_temperature(self, args: str) -> bool:
        s = self.screen
        return s.apply_options(s.options.with_changes(temperature=parse_temperature(args)))

    async def cmd_max_tokens(self, args: str) -> bool:
        s = self.screen
        return s.apply_options(s.options.with_changes(max_tokens=parse_max_tokens(args)))

    async def cmd_model(self, args: str) -> bool:
        s = self.screen
        if not args:
            s.action_settings()
            return True
        words = split_words(args)
        if not words or len(words) > 2:
            raise ValueError("/model takes a name or a GGUF path, and optionally its mmproj")
        model = words[0]
        if Path(model).suffix.lower() == ".gguf" or "/" in model:
            model = str(to_path(model, s.cwd))
        mmproj = str(to_path(words[1], s.cwd)) if len(words) == 2 else None
        return s.apply_options(s.options.with_changes(model=model, mmproj=mmproj))

    async def cmd_settings(self, args: str) -> bool:
        self.screen.action_settings()
        return True

    async def cmd_stop(self, args: str) -> bool:
        self.screen.action_stop()
        return True

    async def cmd_help(self, args: str) -> bool:
        self.screen.app.action_help()  # type: ignore[attr-defined]
        return True

    async def cmd_quit(self, args: str) -> bool:
        self.screen.app.exit()
        return True
