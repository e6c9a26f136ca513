"""Images attached to the message being written, before it is sent.

Each is read and decoded once when attached, so a missing, unreadable or unsupported file
is reported at once (with the runtime's own error message) and the bytes travel with the
attachment: the picture sent is the picture shown, even if the file changes afterwards.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image as PILImage

from edge_vlm.errors import EdgeVLMError, ImageError, ImageTooLargeError
from edge_vlm.image_source import ImagePolicy, read_image_source
from edge_vlm.images import decode_image

if TYPE_CHECKING:
    from edge_vlm.tui.clipboard import ClipboardImage

_EXT = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "WEBP": ".webp", "GIF": ".gif",
        "BMP": ".bmp"}


def human_size(n: int) -> str:
    """``532 B``, ``12 KB``, ``3.4 MB``."""
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


@dataclass(frozen=True)
class PendingImage:
    """An image attached to the draft message."""

    name: str
    """What to call it: the file name, or ``clipboard.png``."""
    data: bytes = field(repr=False)
    """The encoded image as read."""
    width: int
    height: int
    format: str
    """Pillow's format name: ``PNG``, ``JPEG``, ..."""
    source: Path | None = None
    """The file it came from (None: the clipboard)."""

    @property
    def size(self) -> int:
        """Bytes."""
        return len(self.data)

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the bytes: the name it is stored under."""
        return hashlib.sha256(self.data).hexdigest()

    @property
    def suffix(self) -> str:
        """File suffix for its format (``.png``)."""
        return _EXT.get(self.format, ".img")

    def label(self) -> str:
        """``circle.png 96×72 12 KB``."""
        return f"{self.name} {self.width}×{self.height} {human_size(self.size)}"


def probe_bytes(data: bytes, name: str, *, policy: ImagePolicy | None = None,
                source: Path | None = None, field_name: str = "image") -> PendingImage:
    """Check that ``data`` is an image edge-vlm reads, and describe it.

    Raises:
        ImageError: unsupported format, corrupt data or over a limit.
    """
    policy = policy or ImagePolicy()
    if len(data) > policy.max_bytes:
        raise ImageTooLargeError(
            f"{field_name}: {name} is {human_size(len(data))}, over the "
            f"{human_size(policy.max_bytes)} image limit; attach a smaller image or raise "
            "images.max_bytes", param=field_name)
    # Decoding (downscaled: cheap for JPEG) proves the file is an image the model can take.
    img = decode_image(data, max_pixels=policy.max_pixels, max_side=256, field=field_name)
    with PILImage.open(io.BytesIO(data)) as header:
        width, height = header.size
    return PendingImage(name=name, data=data, width=width, height=height,
                        format=img.source_format, source=source)


def probe_file(path: str | Path, *, policy: ImagePolicy | None = None,
               field_name: str = "image") -> PendingImage:
    """Read and check an image file for attaching.

    Raises:
        ImageError: no such file, not a file, unsupported, corrupt or too large; the
            message names the path and what to do.
    """
    policy = policy or ImagePolicy()
    real = Path(path).expanduser()
    if not real.exists():  # named in full: the runtime shortens long paths in its message
        raise ImageError(f"{field_name}: no file at '{real}'; check the path (Tab completes "
                         "it after /image)", param=field_name)
    data, _ = read_image_source(str(real), policy, field_name)
    return probe_bytes(data, real.name, policy=policy, source=real.resolve(),
                       field_name=field_name)


def probe_sources(sources: Sequence[Path | ClipboardImage], policy: ImagePolicy) -> (
        tuple[list[PendingImage], list[str]]):
    """Read and check files and clipboard images; returns the images and the error messages
    of those that failed."""
    images: list[PendingImage] = []
    errors: list[str] = []
    for source in sources:
        try:
            if isinstance(source, Path):
                images.append(probe_file(source, policy=policy))
            elif source.path is not None:
                images.append(probe_file(source.path, policy=policy))
            elif source.data is not None:
                suffix = (source.mime or "image/png").split("/")[-1]
                images.append(probe_bytes(source.data, f"clipboard.{suffix}", policy=policy))
        except EdgeVLMError as err:
            errors.append(err.message)
    return images, errors
