"""Decode and check the images users attach to chat messages.

Images are untrusted: their bytes are read under the policy of :mod:`edge_vlm.image_source`
(size-capped before they are read in full), only PNG, JPEG, WEBP, GIF and BMP reach a
Pillow decoder, and the pixel count is checked from the header before any pixel is
decoded. The result is an
RGB image, turned upright from its EXIF orientation and downscaled, plus a stable
``identity`` the runtime can use as a cache key.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import struct
import time
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edge_vlm.errors import EdgeVLMError, ImageError, ImageTooLargeError, UnsupportedImageError
from edge_vlm.image_source import ImagePolicy, field_error, read_image_source

#: Pillow format names decoded; nothing else is handed to a Pillow parser.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image, ready for the vision encoder."""

    image: Image.Image = dataclass_field(compare=False, repr=False)
    """The pixels: RGB, upright, downscaled to ``max_side``."""
    width: int
    height: int
    source_format: str
    """The format Pillow detected: ``"PNG"``, ``"JPEG"``, ..."""
    source_bytes: int
    """Size of the encoded image."""
    identity: str
    """SHA-256 (hex) of width, height and RGB pixels: equal pixels, equal identity."""
    decode_ms: float = dataclass_field(compare=False)

    def rgb_bytes(self) -> bytes:
        """The pixels as packed 8-bit RGB, row by row (``width * height * 3`` bytes)."""
        return self.image.tobytes()


def load_image(
    url: str, policy: ImagePolicy, *, max_side: int | None = None, field: str = "image_url.url"
) -> LoadedImage:
    """Read and decode one image from a chat message's ``image_url.url``.

    Args:
        url: A ``data:`` URL, a local path or ``file://`` URL, or an ``http(s)`` URL.
        policy: Which sources are allowed and the size limits.
        max_side: When given, the longest side of the result is at most this.
        field: The request field the URL came from, named in every error.

    Returns:
        The decoded image.

    Raises:
        ImageError: The image cannot be read or decoded (subclasses for limits, formats
            and remote URLs).
    """
    data, _ = read_image_source(url, policy, field)
    return decode_image(data, max_pixels=policy.max_pixels, max_side=max_side, field=field)


def decode_image(
    data: bytes,
    *,
    max_pixels: int = ImagePolicy.max_pixels,
    max_side: int | None = None,
    field: str = "image_url.url",
) -> LoadedImage:
    """Decode untrusted image bytes into an upright, downscaled RGB image.

    Args:
        data: The encoded image.
        max_pixels: Largest width x height accepted, checked before decoding. Pillow's
            own ``Image.MAX_IMAGE_PIXELS`` applies too when it is lower.
        max_side: When given, the longest side of the result is at most this; JPEGs are
            then decoded at a reduced scale (DCT scaling) instead of full size.
        field: The request field the image came from, named in every error.

    Returns:
        The decoded image.

    Raises:
        ImageTooLargeError: Too many pixels.
        UnsupportedImageError: Not PNG, JPEG, WEBP, GIF or BMP.
        ImageError: Empty, corrupt or truncated data.
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    started = time.perf_counter()
    if not data:
        raise field_error(field, "the image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as source:
            fmt = source.format or "unknown"
            _check_pixels(source.size, max_pixels, field)
            # MPO: the multi-picture JPEG of phone cameras, opened by the JPEG plugin.
            if max_side is not None and fmt in ("JPEG", "MPO"):
                _draft(source, max_side)
            source.load()
            upright = _upright(source)
    except UnidentifiedImageError as exc:
        raise _unidentified(data, field) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise field_error(
            field,
            f"the image has too many pixels ({exc}); send a smaller image",
            ImageTooLargeError,
        ) from exc
    except EdgeVLMError:
        raise
    except Exception as exc:
        # Pillow reports damaged data as OSError, SyntaxError, ValueError, struct.error...
        raise field_error(
            field,
            f"the image data is corrupt or truncated ({type(exc).__name__}: {exc}); "
            "re-export or re-send the image",
        ) from exc
    try:
        rgb = to_rgb(upright)
    except ValueError as exc:
        raise field_error(
            field,
            f"{fmt} image in colour mode {upright.mode!r} cannot be converted to RGB; "
            "convert it to 8-bit RGB",
            UnsupportedImageError,
        ) from exc
    if max_side is not None:
        rgb = _downscale(rgb, max_side)
    width, height = rgb.size
    digest = hashlib.sha256(struct.pack(">II", width, height))
    digest.update(rgb.tobytes())
    return LoadedImage(
        image=rgb,
        width=width,
        height=height,
        source_format=fmt,
        source_bytes=len(data),
        identity=digest.hexdigest(),
        decode_ms=(time.perf_counter() - started) * 1000.0,
    )


def _check_pixels(size: tuple[int, int], max_pixels: int, field: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise field_error(field, f"the image is {width}x{height} pixels, which is empty")
    # Also stay under Pillow's bomb limit, so its warning band is refused here rather than
    # only warned about (changing warning filters is process-global and not thread-safe).
    limit = max_pixels
    if Image.MAX_IMAGE_PIXELS is not None:
        limit = min(limit, Image.MAX_IMAGE_PIXELS)
    if width * height > limit:
        raise field_error(
            field,
            f"the image is {width}x{height} = {width * height} pixels, over the "
            f"{limit}-pixel limit; send a smaller image or raise images.max_pixels",
            ImageTooLargeError,
        )


def _draft(image: Image.Image, max_side: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the requested size."""
    width, height = image.size
    scale = max_side / max(width, height)
    if scale < 1:
        image.draft(
            image.mode, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale)))
        )


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a damaged EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except (SyntaxError, ValueError, KeyError, TypeError, struct.error):
        return image.copy()


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, the same way every time.

    Transparency (alpha channels, palette and colour-key transparency) is composited over
    white; 16- and 32-bit integer greys are scaled from 0..65535 to 0..255; float greys
    are clipped to 0..255, as Pillow's own ``convert("L")`` does.

    Args:
        image: A loaded image in any mode.

    Returns:
        An RGB image (``image`` itself when it is already RGB without transparency).

    Raises:
        ValueError: Pillow cannot convert the mode to RGB.
    """
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image)
        if mode == "F":
            grey = np.clip(np.rint(np.nan_to_num(values)), 0, 255)
        else:
            grey = (np.clip(values.astype(np.int64), 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    return image.convert("RGB")


def _downscale(image: Image.Image, max_side: int) -> Image.Image:
    width, height = image.size
    longest = max(width, height)
    if longest <= max_side:
        return image
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


# Magic numbers, only to name what was refused: these bytes never reach a Pillow parser.
_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP",
    b"%PDF-": "PDF", b"%!PS": "EPS", b"\xc5\xd0\xd3\xc6": "EPS", b"8BPS": "PSD",
    b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"II+\x00": "BigTIFF", b"MM\x00+": "BigTIFF",
    b"\x00\x00\x01\x00": "ICO", b"\x00\x00\x02\x00": "CUR", b"icns": "ICNS", b"DDS ": "DDS",
    b"\x00\x00\x00\x0cjP  \r\n\x87\n": "JPEG 2000", b"\xff\x4f\xff\x51": "JPEG 2000",
    b"\x00\x00\x00\x0cJXL \r\n\x87\n": "JPEG XL", b"\xff\x0a": "JPEG XL", b"qoif": "QOI",
}  # fmt: skip
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


def sniff_format(data: bytes) -> str:
    """Name an image format from its first bytes (used for error messages only)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        return "HEIC" if brand in _HEIF_BRANDS else "ISO media (MP4/MOV)"
    for magic, name in _SIGNATURES.items():
        if data.startswith(magic):
            return name
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in head:
        return "SVG"
    if head.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    if head.startswith(b"<?xml"):
        return "XML"
    if re.match(rb"p[1-7]\s", head):
        return "PNM"
    return "unknown"


def _unidentified(data: bytes, field: str) -> ImageError:
    detected = sniff_format(data)
    if detected in ACCEPTED_FORMATS:
        return field_error(
            field,
            f"the data starts like a {detected} image but its header is damaged; "
            "re-export or re-send the image",
        )
    what = f"a {detected} file" if detected != "unknown" else f"not a known image ({data[:8]!r}...)"
    return field_error(
        field,
        f"the data is {what}; edge-vlm accepts {', '.join(ACCEPTED_FORMATS)}: "
        "convert the image to PNG or JPEG",
        UnsupportedImageError,
    )
