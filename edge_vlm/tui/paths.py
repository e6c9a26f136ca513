"""Paths typed after ``/image`` or pasted by a terminal when a file is dropped on it.

Terminals paste a dropped file's path in different forms: quoted (``'/a/My Pic.png'``,
GNOME Terminal, Kitty, Windows Terminal), with escaped spaces (``/a/My\\ Pic.png``, iTerm2,
macOS Terminal), as a ``file://`` URI (Konsole, some file managers), or several of them
separated by spaces or newlines.
"""

from __future__ import annotations

import os
import shlex
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

#: File name suffixes treated as images when a path is pasted.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"})


def is_image_name(path: str | Path) -> bool:
    """True when the name ends with an image suffix (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def split_words(text: str) -> list[str] | None:
    """Split like a POSIX shell: quotes and backslash escapes; None if a quote is unclosed."""
    try:
        return shlex.split(text, comments=False, posix=True)
    except ValueError:
        return None


def to_path(word: str, cwd: Path | None = None) -> Path:
    """A word as a path: ``file://`` URIs decoded, ``~`` expanded, relative to ``cwd``."""
    if word.lower().startswith("file:"):
        parts = urllib.parse.urlsplit(word)
        path = Path(urllib.request.url2pathname(parts.path))
    else:
        path = Path(word).expanduser()
    if not path.is_absolute():
        path = (cwd or Path.cwd()) / path
    return path


def parse_pasted_paths(text: str, cwd: Path | None = None) -> list[Path] | None:
    """The image files a paste consists of, or None when it is ordinary text.

    A paste counts as paths only when *all* of it is one or more existing image files;
    anything else (a sentence, a missing file, a text file) is text to insert.

    Args:
        text: What the terminal pasted.
        cwd: Folder relative paths are taken from (default: the current directory).

    Returns:
        The absolute paths in the order pasted, or None.
    """
    stripped = text.strip()
    if not stripped:
        return None
    whole = to_path(stripped, cwd)  # an unquoted path with spaces, pasted as text
    if is_image_name(whole) and whole.is_file():
        return [whole]
    words = split_words(stripped)
    if not words:
        return None
    paths = [to_path(w, cwd) for w in words]
    if all(is_image_name(p) and p.is_file() for p in paths):
        return paths
    return None


@dataclass(frozen=True)
class Completion:
    """The result of completing a path fragment."""

    text: str
    """The fragment to put in place of the one completed (unchanged when nothing matched)."""
    candidates: list[str] = field(default_factory=list)
    """Names that matched, when more than one did (folders end with ``/``)."""


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace(" ", "\\ ").replace("'", "\\'").replace('"', '\\"')


def complete_path(fragment: str, cwd: Path | None = None, *, images_only: bool = True) -> (
        Completion):
    """Complete the last path of an ``/image`` command, as a shell does on Tab.

    Args:
        fragment: The path typed so far, possibly with backslash-escaped spaces or an
            opening quote.
        cwd: Folder relative paths are taken from.
        images_only: Offer only folders and image files.

    Returns:
        The completed fragment and, when several names match, the candidates.
    """
    quote = fragment[:1] if fragment[:1] in ("'", '"') else ""
    raw = fragment[1:] if quote else fragment.replace("\\ ", " ").replace("\\\\", "\\")
    head, _, base = raw.rpartition("/")
    folder_text = head + "/" if "/" in raw else ""
    folder = to_path(folder_text or ".", cwd) if folder_text != "/" else Path("/")
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return Completion(fragment)
    names: list[str] = []
    for entry in entries:
        if not entry.name.startswith(base) or (entry.name.startswith(".") and
                                               not base.startswith(".")):
            continue
        try:
            is_dir = entry.is_dir()
        except OSError:
            continue
        if is_dir:
            names.append(entry.name + "/")
        elif not images_only or is_image_name(entry.name):
            names.append(entry.name)
    if not names:
        return Completion(fragment)
    names.sort()
    common = os.path.commonprefix(names)  # noqa: RUF071 -- names, compared as text
    done = len(names) == 1
    completed = folder_text + common
    if quote:
        text = quote + completed + (quote if done and not completed.endswith("/") else "")
    else:
        text = _quote(completed)
    return Completion(text, [] if done else names)


def last_word_start(text: str) -> int:
    """Index where the last shell word of ``text`` starts (``len(text)`` after a space).

    Quotes and backslash-escaped spaces keep a path with spaces one word.
    """
    start, i, quote, in_word = len(text), 0, "", False
    while i < len(text):
        c = text[i]
        if quote:
            if c == quote:
                quote = ""
        elif c == "\\":
            if not in_word:
                start, in_word = i, True
            i += 1  # the escaped character belongs to the word
        elif c in "'\"":
            if not in_word:
                start, in_word = i, True
            quote = c
        elif c.isspace():
            in_word = False
            start = i + 1
        elif not in_word:
            start, in_word = i, True
        i += 1
    return min(start, len(text))


def display_path(path: str | Path) -> str:
    """A path as shown: under the home folder it starts with ``~``."""
    text = str(path)
    home = str(Path.home())
    if home not in ("", "/") and (text == home or text.startswith(home + os.sep)):
        return "~" + text[len(home):]
    return text
