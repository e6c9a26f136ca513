"""Image thumbnails: Sixel or Kitty graphics where the terminal has them, half-blocks else.

``textual-image`` asks the terminal what it supports when it is first imported, which is
only possible before Textual takes over the terminal: :func:`prepare` must run before the
app starts (:class:`~edge_vlm.tui.app.ChatApp` calls it in its constructor).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, cast

from PIL import Image as PILImage
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Static

from edge_vlm.tui.safetext import one_line

_classes: dict[str, type[Widget] | None] = {}
#: Longest side thumbnails are shrunk to before drawing (drawing cost, not quality).
THUMB_PIXELS = 192


def prepare(mode: str) -> type[Widget] | None:
    """Pick (once per mode) the widget class that draws thumbnails; None for ``off``."""
    if mode in _classes:
        return _classes[mode]
    cls: type[Widget] | None
    if mode == "off":
        cls = None
    else:
        import textual_image.widget as tiw

        by_mode: dict[str, Any] = {"sixel": tiw.SixelImage, "kitty": tiw.TGPImage,
                                   "halfcell": tiw.HalfcellImage, "unicode": tiw.UnicodeImage}
        cls = cast("type[Widget]", by_mode.get(mode, tiw.Image))
    _classes[mode] = cls
    return cls


def small_image(source: bytes | Path) -> PILImage.Image | None:
    """The image shrunk for drawing, or None if it cannot be read (a moved file)."""
    try:
        with PILImage.open(io.BytesIO(source) if isinstance(source, bytes) else source) as src:
            src.draft("RGB", (THUMB_PIXELS, THUMB_PIXELS))
            image = src.convert("RGB")
        image.thumbnail((THUMB_PIXELS, THUMB_PIXELS))
        return image
    except (OSError, ValueError, PILImage.DecompressionBombError):
        return None


class Thumbnail(Vertical):
    """A thumbnail with its caption."""

    def __init__(self, source: bytes | Path, caption: str, *, mode: str,
                 height: int = 6) -> None:
        super().__init__(classes="thumbnail")
        self._source = source
        self._caption = caption
        self._mode = mode
        self._height = height

    def compose(self) -> ComposeResult:
        cls = prepare(self._mode)
        image = small_image(self._source) if cls is not None else None
        picture: Widget | None = None
        if cls is not None and image is not None:
            picture = cast(Any, cls)(image, classes="picture")  # textual-image's Image
        elif cls is not None:
            picture = Static("(image missing)", classes="picture missing", markup=False)
        if picture is not None:
            picture.styles.height = self._height
            yield picture
        yield Static(one_line(self._caption, 40), classes="caption", markup=False)
