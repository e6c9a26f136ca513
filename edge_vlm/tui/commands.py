"""The app's keys and slash commands: one table, read by the help screen and the parser."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeyHelp:
    """One line of the key list."""

    keys: str
    action: str


#: Every key of the app, as the help screen (F1) and the README list them.
KEYS: tuple[KeyHelp, ...] = (
    KeyHelp("Enter", "send the message"),
    KeyHelp("Shift+Enter, Ctrl+J", "new line (Alt+Enter too)"),
    KeyHelp("Esc", "stop the answer; close a dialog"),
    KeyHelp("Ctrl+O", "attach an image with the file picker"),
    KeyHelp("Ctrl+V", "attach the image on the clipboard"),
    KeyHelp("Tab", "complete the path after /image"),
    KeyHelp("Shift+Tab, Delete", "select an attached image, remove it"),
    KeyHelp("Ctrl+Up, Ctrl+Down", "scroll the conversation"),
    KeyHelp("Ctrl+N", "new conversation"),
    KeyHelp("Ctrl+R", "history: reopen, delete, export"),
    KeyHelp("Ctrl+S, F2", "model, system prompt, temperature, tokens, detail"),
    KeyHelp("F1", "this help"),
    KeyHelp("Ctrl+P", "command palette"),
    KeyHelp("Ctrl+Q", "quit"),
)


@dataclass(frozen=True)
class CommandSpec:
    """A slash command typed in the message box."""

    name: str
    args: str
    help: str
    aliases: tuple[str, ...] = ()


COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec("image", "PATH...", "attach images (Tab completes)", ("img",)),
    CommandSpec("detach", "[N]", "remove attached image N (default: all)"),
    CommandSpec("new", "", "start a new conversation"),
    CommandSpec("history", "", "reopen, delete or export conversations"),
    CommandSpec("export", "[PATH]", "save as Markdown (default: this folder)"),
    CommandSpec("system", "[TEXT|-]", "set (or - clear) the system prompt"),
    CommandSpec("temperature", "T", "0 to 2; 0 is greedy", ("temp",)),
    CommandSpec("max-tokens", "N", "longest answer, in tokens"),
    CommandSpec("model", "NAME [MMPROJ]", "load a model (a name or GGUF path)"),
    CommandSpec("settings", "", "model, system prompt, temperature, tokens, detail"),
    CommandSpec("stop", "", "stop the answer (Esc)"),
    CommandSpec("help", "", "keys and commands (F1)"),
    CommandSpec("quit", "", "leave (Ctrl+Q)"),
)

_BY_NAME = {n: c for c in COMMANDS for n in (c.name, *c.aliases)}


@dataclass(frozen=True)
class ParsedCommand:
    """A slash command as typed."""

    spec: CommandSpec | None
    """None: an unknown command."""
    name: str
    args: str


def parse_command(text: str) -> ParsedCommand | None:
    """Recognise ``/name args``; None for a message (``//x`` sends ``/x``)."""
    stripped = text.strip()
    if not stripped.startswith("/") or stripped.startswith("//"):
        return None
    name, _, args = stripped[1:].partition(" ")
    if not name or "/" in name:  # "/usr/bin/x is what?" is a message, not a command
        return None
    return ParsedCommand(_BY_NAME.get(name.lower()), name, args.strip())


def unescape_message(text: str) -> str:
    """The message to send, trimmed; one typed as ``//x`` is sent as ``/x``."""
    stripped = text.strip()
    return stripped[1:] if stripped.startswith("//") else stripped


def command_help_rows() -> list[tuple[str, str]]:
    """``("/image PATH...", "attach images ...")`` for every command."""
    return [(f"/{c.name} {c.args}".rstrip(), c.help) for c in COMMANDS]
