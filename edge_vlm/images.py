"""Read, check and decode the images users attach to chat messages.

Images are untrusted: every source (``data:`` URL, local file, ``http(s)``) is size-capped
before it is read in full, only PNG, JPEG, WEBP, GIF and BMP reach a Pillow decoder, and
the pixel count is checked from the header before any pixel is decoded. The result is an
RGB image, turned upright from its EXIF orientation and downscaled, plus a stable
``identity`` the runtime can use as a cache key.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import math
import os
import re
import stat
import struct
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edge_vlm import netfetch
from edge_vlm.errors import (
    EdgeVLMError,
    ImageError,
    ImageTooLargeError,
    RemoteImageDisabledError,
    UnsupportedImageError,
)

if TYPE_CHECKING:
    from edge_vlm.config import ImageSettings

#: Pillow format names decoded; nothing else is handed to a Pillow parser.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from and how large they may be."""

    allow_local_files: bool = True
    """Whether local paths and ``file://`` URLs are read (the server: only with roots)."""
    allowed_local_roots: tuple[Path, ...] = ()
    """When non-empty, a local file's real path must lie under one of these folders."""
    allow_remote: bool = False
    """Whether ``http(s)`` URLs are fetched (off: edge-vlm is meant to run air-gapped)."""
    allowed_hosts: tuple[str, ...] = ()
    """Hosts fetched even when they are (or resolve to) loopback or private addresses."""
    max_bytes: int = 20 * 1024 * 1024
    """Largest encoded image accepted, in bytes."""
    max_pixels: int = 50_000_000
    """Largest image accepted, in pixels (width x height, read from the header)."""
    fetch_timeout_s: float = 10.0
    """Time allowed for one remote download, redirects included."""

    @classmethod
    def from_settings(cls, s: ImageSettings, **changes: Any) -> ImagePolicy:
        """The policy of the ``[images]`` settings; ``changes`` replace fields (the server
        reads local files only under its media root)."""
        return dataclasses.replace(
            cls(allow_local_files=s.allow_local_files, allow_remote=s.allow_remote,
                allowed_hosts=tuple(s.allowed_hosts), max_bytes=s.max_bytes,
                max_pixels=s.max_pixels),
            **changes)


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


def read_image_source(url: str, policy: ImagePolicy, field: str) -> tuple[bytes, str]:
    """Read an image's encoded bytes from any source the policy allows.

    Args:
        url: A ``data:`` URL, a local path or ``file://`` URL, or an ``http(s)`` URL.
        policy: Which sources are allowed and the byte limit.
        field: The request field the URL came from, named in every error.

    Returns:
        The bytes and a short description of where they came from, fit for logs.

    Raises:
        ImageError: The source is refused, missing, unreadable or too large.
    """
    text = url.strip()
    if not text:
        raise _error(field, "the image URL is empty; give a data: URL or a path")
    lowered = text[:8].lower()
    if lowered.startswith("data:"):
        return _read_data_url(text, policy.max_bytes, field)
    if lowered.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise _error(
                field,
                f"{_preview(text)} is an http(s) URL but remote images are off; "
                "pass --allow-remote-images or set images.allow_remote = true",
                RemoteImageDisabledError,
            )
        return netfetch.fetch(
            text,
            max_bytes=policy.max_bytes,
            timeout_s=policy.fetch_timeout_s,
            allowed_hosts=policy.allowed_hosts,
            field=field,
        )
    if lowered.startswith("file:"):
        parts = urllib.parse.urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise _error(
                field,
                f"{_preview(text)} names host {parts.netloc!r}; file:// URLs must be "
                "local (file:///path/to/image.png)",
            )
        return _read_local(urllib.request.url2pathname(parts.path), text, policy, field)
    scheme = _SCHEME.match(text)
    if scheme:
        raise _error(
            field,
            f"{_preview(text)} uses unsupported scheme {scheme.group(1)!r}; "
            "give a data: URL, a local path, or an http(s) URL",
        )
    return _read_local(text, text, policy, field)


def _preview(value: str, limit: int = 80) -> str:
    """The value quoted, shortened so a multi-megabyte data URL does not flood a log."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _read_data_url(url: str, max_bytes: int, field: str) -> tuple[bytes, str]:
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise _error(
            field,
            f"data URL {_preview(url)} has no ',' before the data; "
            "use data:image/png;base64,<base64 data>",
        )
    mime, *params = [part.strip().lower() for part in header.split(";")]
    if mime and not mime.startswith("image/"):
        raise _error(
            field,
            f"data URL has MIME type {mime!r}, not an image; "
            "use data:image/png;base64,... (or the image's own type)",
        )
    if "base64" not in params:
        raise _error(
            field,
            f"data URL {_preview(url)} is not base64-encoded; "
            "use data:<image type>;base64,<base64 data>",
        )
    if not payload:
        raise _error(field, f"data URL {_preview(url)} holds no data")
    # Refuse before decoding: base64 turns every 3 bytes into 4 characters.
    if len(payload) > 4 * math.ceil(max_bytes / 3):
        raise _too_large(field, f"data URL ({len(payload)} base64 characters)", max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _error(
            field,
            f"data URL {_preview(url)} is not valid base64 ({exc}); use the standard "
            "alphabet with '=' padding and no line breaks",
        ) from exc
    if len(data) > max_bytes:
        raise _too_large(field, "data URL", max_bytes)
    return data, f"data URL ({mime or 'no type'}, {len(data)} bytes)"


def _read_local(path_text: str, shown: str, policy: ImagePolicy, field: str) -> tuple[bytes, str]:
    where = _preview(shown)
    if not policy.allow_local_files:
        raise _error(
            field,
            f"{where} is a local file but local image files are off here; "
            "send the image inline as a data: URL (base64)",
        )
    try:
        real = Path(os.path.realpath(Path(path_text).expanduser()))
    except (ValueError, OSError) as exc:
        raise _error(field, f"{where} is not a usable path ({exc})") from exc
    roots = [Path(os.path.realpath(root.expanduser())) for root in policy.allowed_local_roots]
    # Checked on the real path (symlinks followed) and before touching the file, so a link
    # cannot escape and nothing is revealed about files outside the roots.
    if roots and not any(real.is_relative_to(root) for root in roots):
        raise _error(
            field,
            f"{where} is outside the folders images may be read from; move it under "
            "one of images.allowed_local_roots or send it as a data: URL",
        )
    try:
        _check_file(os.stat(real), where, policy.max_bytes, field)
        fd = os.open(
            real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        )
        try:
            # fstat again: the path may have been swapped between stat and open.
            _check_file(os.fstat(fd), where, policy.max_bytes, field)
            data = _read_fd(fd, policy.max_bytes + 1)
        finally:
            os.close(fd)
    except FileNotFoundError as exc:
        raise _error(field, f"no file at {where}; check the path") from exc
    except OSError as exc:
        raise _error(field, f"cannot read {where}: {exc.strerror}") from exc
    _check_file_size(len(data), where, policy.max_bytes, field)
    return data, f"file {str(real)!r}"


def _check_file(info: os.stat_result, where: str, max_bytes: int, field: str) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise _error(field, f"{where} is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise _error(field, f"{where} is not a regular file")
    _check_file_size(info.st_size, where, max_bytes, field)


def _check_file_size(size: int, where: str, max_bytes: int, field: str) -> None:
    if size == 0:
        raise _error(field, f"{where} is empty (0 bytes)")
    if size > max_bytes:
        raise _too_large(field, where, max_bytes)


def _read_fd(fd: int, limit: int) -> bytes:
    """Read up to ``limit`` bytes: a file still growing cannot push us past the cap."""
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0 and (chunk := os.read(fd, min(remaining, 1 << 20))):
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _error(field: str, message: str, cls: type[ImageError] = ImageError) -> ImageError:
    """An error naming the request field, in its message and as its ``param``."""
    return cls(f"{field}: {message}", param=field)


def _too_large(field: str, what: str, max_bytes: int) -> ImageError:
    message = f"{what} is larger than the {max_bytes}-byte image limit"
    return _error(
        field, f"{message}; send a smaller image or raise images.max_bytes", ImageTooLargeError
    )


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
        raise _error(field, "the image is empty (0 bytes)")
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
        raise _error(
            field,
            f"the image has too many pixels ({exc}); send a smaller image",
            ImageTooLargeError,
        ) from exc
    except EdgeVLMError:
        raise
    except Exception as exc:
        # Pillow reports damaged data as OSError, SyntaxError, ValueError, struct.error...
        raise _error(
            field,
            f"the image data is corrupt or truncated ({type(exc).__name__}: {exc}); "
            "re-export or re-send the image",
        ) from exc
    try:
        rgb = to_rgb(upright)
    except ValueError as exc:
        raise _error(
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
        raise _error(field, f"the image is {width}x{height} pixels, which is empty")
    # Also stay under Pillow's bomb limit, so its warning band is refused here rather than
    # only warned about (changing warning filters is process-global and not thread-safe).
    limit = max_pixels
    if Image.MAX_IMAGE_PIXELS is not None:
        limit = min(limit, Image.MAX_IMAGE_PIXELS)
    if width * height > limit:
        raise _error(
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
        return _error(
            field,
            f"the data starts like a {detected} image but its header is damaged; "
            "re-export or re-send the image",
        )
    what = f"a {detected} file" if detected != "unknown" else f"not a known image ({data[:8]!r}...)"
    return _error(
        field,
        f"the data is {what}; edge-vlm accepts {', '.join(ACCEPTED_FORMATS)}: "
        "convert the image to PNG or JPEG",
        UnsupportedImageError,
    )
