"""Make untrusted text (model output, file names) safe to show in a terminal.

Textual never interprets Rich markup in :class:`~textual.widgets.Markdown` or in
``Static(markup=False)``, but control characters would still reach the terminal: an ESC
from the model could recolour, move the cursor or retitle the window. Every control
character is therefore replaced by a visible stand-in, so ``\\x1b[31m`` shows as ``␛[31m``.
"""

from __future__ import annotations

_C0_PICTURES = {c: chr(0x2400 + c) for c in range(0x20)}
_TABLE: dict[int, str] = {**_C0_PICTURES, 0x7F: "\u2421"}
for _c in range(0x80, 0xA0):  # C1 controls (0x9b is a one-byte CSI on some terminals)
    _TABLE[_c] = f"\\x{_c:02x}"
del _TABLE[0x0A], _TABLE[0x09]  # newline and tab are text


def visible(text: str) -> str:
    """Replace control characters (except newline and tab) with visible stand-ins.

    ``\\r\\n`` becomes a newline first; a lone ``\\r`` shows as ``␍``.

    Args:
        text: Untrusted text.

    Returns:
        The text with nothing a terminal would act on.
    """
    return text.replace("\r\n", "\n").translate(_TABLE)


def one_line(text: str, limit: int = 60) -> str:
    """A visible, single-line preview of ``text``, cut to ``limit`` characters."""
    flat = " ".join(visible(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
