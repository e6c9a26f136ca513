"""Read an image from the system clipboard through the platform's clipboard tool.

Wayland: ``wl-paste`` (wl-clipboard); X11: ``xclip``; macOS: ``pngpaste`` or ``osascript``.
When the clipboard holds a copied *file* (``text/uri-list``, as file managers copy), the
file's path is returned instead of bytes. Without a usable tool the error says which one to
install; over SSH (no display) it says how else to attach.
"""

from __future__ import annotations

import binascii
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_vlm.errors import EdgeVLMError
from edge_vlm.tui.paths import is_image_name, to_path

#: Image types asked for, best first.
PREFERRED_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp")
_TIMEOUT_S = 5.0

Runner = Callable[[Sequence[str]], bytes]
"""Runs a command and returns its stdout; raises ``subprocess.CalledProcessError``/``OSError``."""


class ClipboardError(EdgeVLMError):
    """The clipboard holds no image, or no clipboard tool is available."""


@dataclass(frozen=True)
class ClipboardImage:
    """An image taken from the clipboard: its bytes, or the path of a copied file."""

    tool: str
    """The tool that read it (``wl-paste``, ``xclip``, ``pngpaste``, ``osascript``)."""
    data: bytes | None = None
    """The encoded image, when the clipboard held image data."""
    mime: str | None = None
    """Its type, e.g. ``image/png``."""
    path: Path | None = None
    """The copied file, when the clipboard held a file reference."""


def _run(argv: Sequence[str]) -> bytes:
    done = subprocess.run(list(argv), capture_output=True, timeout=_TIMEOUT_S, check=True)
    return done.stdout


def read_image(
    *,
    env: Mapping[str, str] | None = None,
    which: Callable[[str], str | None] = shutil.which,
    run: Runner = _run,
    platform: str = sys.platform,
) -> ClipboardImage:
    """Take the image (or copied image file) that is on the system clipboard.

    Args:
        env: Environment to read ``WAYLAND_DISPLAY`` / ``DISPLAY`` from (default: os.environ).
        which: Finds a tool on ``PATH``.
        run: Runs a tool and returns its stdout.
        platform: ``sys.platform``.

    Raises:
        ClipboardError: no image on the clipboard, or no tool to read it (naming the tool
            to install).
    """
    env = os.environ if env is None else env
    if platform == "darwin":
        return _read_macos(which, run)
    if platform.startswith("win"):
        raise ClipboardError(
            "pasting an image from the clipboard is not supported on Windows yet: save it "
            "to a file and attach it with /image PATH or Ctrl+O")
    wayland, x11 = bool(env.get("WAYLAND_DISPLAY")), bool(env.get("DISPLAY"))
    if wayland and which("wl-paste"):
        return _read_typed("wl-paste", ["wl-paste", "--list-types"],
                           lambda t: ["wl-paste", "--no-newline", "--type", t], run)
    if x11 and which("xclip"):
        return _read_typed("xclip", ["xclip", "-selection", "clipboard", "-t", "TARGETS", "-o"],
                           lambda t: ["xclip", "-selection", "clipboard", "-t", t, "-o"], run)
    if wayland:
        raise ClipboardError("no clipboard tool: install wl-clipboard (it provides wl-paste) "
                             "to paste images with Ctrl+V")
    if x11:
        raise ClipboardError("no clipboard tool: install xclip to paste images with Ctrl+V")
    raise ClipboardError(
        "no graphical clipboard here (neither WAYLAND_DISPLAY nor DISPLAY is set, e.g. over "
        "SSH): attach with /image PATH or Ctrl+O, or paste the file's path")


def _read_typed(tool: str, list_cmd: list[str], get_cmd: Callable[[str], list[str]],
                run: Runner) -> ClipboardImage:
    try:
        types = [t.strip() for t in run(list_cmd).decode("utf-8", "replace").splitlines()]
    except (OSError, subprocess.SubprocessError) as err:
        raise ClipboardError(f"{tool} could not read the clipboard ({_why(err)}); is it "
                             "empty?") from None
    types = [t for t in types if t]
    for mime in PREFERRED_TYPES:
        if mime in types:
            data = _get(tool, get_cmd(mime), run)
            if data:
                return ClipboardImage(tool=tool, data=data, mime=mime)
    if "text/uri-list" in types:
        text = _get(tool, get_cmd("text/uri-list"), run).decode("utf-8", "replace")
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#") and is_image_name(line):
                return ClipboardImage(tool=tool, path=to_path(line))
    shown = ", ".join(types[:6]) or "nothing"
    raise ClipboardError(f"the clipboard holds no image (it has: {shown}); copy an image "
                         "first, or attach a file with /image PATH")


def _get(tool: str, argv: list[str], run: Runner) -> bytes:
    try:
        return run(argv)
    except (OSError, subprocess.SubprocessError) as err:
        raise ClipboardError(f"{tool} failed to read the clipboard: {_why(err)}") from None


def _why(err: BaseException) -> str:
    if isinstance(err, subprocess.CalledProcessError):
        detail = (err.stderr or b"").decode("utf-8", "replace").strip()
        return detail or f"exit status {err.returncode}"
    if isinstance(err, subprocess.TimeoutExpired):
        return f"no answer within {err.timeout:.0f} s"
    return str(err)


_PNGF = re.compile(r"«data PNGf([0-9A-Fa-f]+)»")


def _read_macos(which: Callable[[str], str | None], run: Runner) -> ClipboardImage:
    if which("pngpaste"):
        try:
            data = run(["pngpaste", "-"])
        except (OSError, subprocess.SubprocessError):
            data = b""
        if data:
            return ClipboardImage(tool="pngpaste", data=data, mime="image/png")
        raise ClipboardError("the clipboard holds no image; copy an image first, or attach "
                             "a file with /image PATH")
    if which("osascript"):
        try:
            out = run(["osascript", "-e", "the clipboard as «class PNGf»"])
        except (OSError, subprocess.SubprocessError):
            out = b""
        found = _PNGF.search(out.decode("utf-8", "replace"))
        if found:
            return ClipboardImage(tool="osascript", data=binascii.unhexlify(found.group(1)),
                                  mime="image/png")
        raise ClipboardError("the clipboard holds no image; copy an image first (or install "
                             "pngpaste: brew install pngpaste)")
    raise ClipboardError("no clipboard tool: install pngpaste (brew install pngpaste)")
