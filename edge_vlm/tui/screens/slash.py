"""The slash commands typed in the message box (``/image``, ``/model``, ...): what each asks
for, read from its arguments.

:func:`interpret` only reads: it returns a :data:`SlashAction` saying what to do, and the
chat screen does it (:meth:`~edge_vlm.tui.screens.chat.ChatScreen.run_command`). Bad
arguments raise ValueError with the message to show.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge_vlm.tui.paths import split_words, to_path
from edge_vlm.tui.safetext import one_line
from edge_vlm.tui.screens.settings import parse_max_tokens, parse_temperature
from edge_vlm.tui.session import ChatOptions


@dataclass(frozen=True)
class Attach:
    """Attach these images (None: open the image picker)."""

    paths: list[Path] | None


@dataclass(frozen=True)
class Detach:
    """Remove attached image ``index`` (1-based; None: all of them)."""

    index: int | None


@dataclass(frozen=True)
class Export:
    """Save the conversation as Markdown to this file or folder."""

    path: Path


@dataclass(frozen=True)
class ChangeOptions:
    """Use these options (a different model is loaded); ``note`` is shown when done."""

    options: ChatOptions
    note: str = ""


@dataclass(frozen=True)
class Open:
    """A screen action without arguments."""

    what: Literal["new", "history", "settings", "stop", "help", "quit"]


SlashAction = Attach | Detach | Export | ChangeOptions | Open


def interpret(name: str, args: str, *, cwd: Path, options: ChatOptions,
              attached: int) -> SlashAction:
    """What ``/name args`` asks for.

    Args:
        name: The command's name (aliases resolved: :func:`~edge_vlm.tui.commands.parse_command`).
        args: What follows the name, trimmed.
        cwd: The folder relative paths are read from.
        options: The current options, which ``/temperature`` and friends change.
        attached: How many images are attached (``/detach N`` is checked against it).

    Raises:
        ValueError: the arguments are wrong (the message says how).
    """
    if name == "image":
        if not args:
            return Attach(None)
        words = split_words(args)
        if words is None:
            raise ValueError("/image: a quote is not closed")
        return Attach([to_path(w, cwd) for w in words])
    if name == "detach":
        return Detach(_image_number(args, attached) if args else None)
    if name == "export":
        return Export(to_path(args, cwd) if args else cwd)
    if name == "system":
        if not args:
            return Open("settings")
        text = "" if args == "-" else args
        return ChangeOptions(options.with_changes(system=text),
                             "System prompt cleared" if not text
                             else f"System prompt: {one_line(text, 60)}")
    if name == "temperature":
        return ChangeOptions(options.with_changes(temperature=parse_temperature(args)))
    if name == "max-tokens":
        return ChangeOptions(options.with_changes(max_tokens=parse_max_tokens(args)))
    if name == "model":
        return Open("settings") if not args else _model(args, cwd, options)
    if name in ("new", "history", "settings", "stop", "help", "quit"):
        return Open(name)  # type: ignore[arg-type]
    raise ValueError(f"/{name} is not a command")


def _image_number(args: str, attached: int) -> int:
    try:
        index = int(args)
    except ValueError:
        raise ValueError(f"/detach takes an image number, got {args!r}") from None
    if not 1 <= index <= attached:
        raise ValueError(f"/detach: there is no image {index} ({attached} attached)")
    return index


def _model(args: str, cwd: Path, options: ChatOptions) -> ChangeOptions:
    words = split_words(args)
    if not words or len(words) > 2:
        raise ValueError("/model takes a name or a GGUF path, and optionally its mmproj")
    model = words[0]
    if Path(model).suffix.lower() == ".gguf" or "/" in model:
        model = str(to_path(model, cwd))
    mmproj = str(to_path(words[1], cwd)) if len(words) == 2 else None
    return ChangeOptions(options.with_changes(model=model, mmproj=mmproj))
