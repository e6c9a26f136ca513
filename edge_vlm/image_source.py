"""Where the images users attach come from: the image policy and reading a chat message's
``image_url.url`` (``data:`` URL, local file, ``http(s)``) into bytes.

Sources are untrusted: every one is size-capped before it is read in full, local paths can
be confined to folders, and remote fetching is off unless the policy allows it. Decoding
the bytes is :mod:`edge_vlm.images`'s job.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import os
import re
import stat
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_vlm import netfetch
from edge_vlm.errors import ImageError, ImageTooLargeError, RemoteImageDisabledError

if TYPE_CHECKING:
    from edge_vlm.config import ImageSettings

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
        raise field_error(field, "the image URL is empty; give a data: URL or a path")
    lowered = text[:8].lower()
    if lowered.startswith("data:"):
        return _read_data_url(text, policy.max_bytes, field)
    if lowered.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise field_error(
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
            raise field_error(
                field,
                f"{_preview(text)} names host {parts.netloc!r}; file:// URLs must be "
                "local (file:///path/to/image.png)",
            )
        return _read_local(urllib.request.url2pathname(parts.path), text, policy, field)
    scheme = _SCHEME.match(text)
    if scheme:
        raise field_error(
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
        raise field_error(
            field,
            f"data URL {_preview(url)} has no ',' before the data; "
            "use data:image/png;base64,<base64 data>",
        )
    mime, *params = [part.strip().lower() for part in header.split(";")]
    if mime and not mime.startswith("image/"):
        raise field_error(
            field,
            f"data URL has MIME type {mime!r}, not an image; "
            "use data:image/png;base64,... (or the image's own type)",
        )
    if "base64" not in params:
        raise field_error(
            field,
            f"data URL {_preview(url)} is not base64-encoded; "
            "use data:<image type>;base64,<base64 data>",
        )
    if not payload:
        raise field_error(field, f"data URL {_preview(url)} holds no data")
    # Refuse before decoding: base64 turns every 3 bytes into 4 characters.
    if len(payload) > 4 * math.ceil(max_bytes / 3):
        raise _too_large(field, f"data URL ({len(payload)} base64 characters)", max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise field_error(
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
        raise field_error(
            field,
            f"{where} is a local file but local image files are off here; "
            "send the image inline as a data: URL (base64)",
        )
    try:
        real = Path(os.path.realpath(Path(path_text).expanduser()))
    except (ValueError, OSError) as exc:
        raise field_error(field, f"{where} is not a usable path ({exc})") from exc
    roots = [Path(os.path.realpath(root.expanduser())) for root in policy.allowed_local_roots]
    # Checked on the real path (symlinks followed) and before touching the file, so a link
    # cannot escape and nothing is revealed about files outside the roots.
    if roots and not any(real.is_relative_to(root) for root in roots):
        raise field_error(
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
        raise field_error(field, f"no file at {where}; check the path") from exc
    except OSError as exc:
        raise field_error(field, f"cannot read {where}: {exc.strerror}") from exc
    _check_file_size(len(data), where, policy.max_bytes, field)
    return data, f"file {str(real)!r}"


def _check_file(info: os.stat_result, where: str, max_bytes: int, field: str) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise field_error(field, f"{where} is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise field_error(field, f"{where} is not a regular file")
    _check_file_size(info.st_size, where, max_bytes, field)


def _check_file_size(size: int, where: str, max_bytes: int, field: str) -> None:
    if size == 0:
        raise field_error(field, f"{where} is empty (0 bytes)")
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


def field_error(field: str, message: str, cls: type[ImageError] = ImageError) -> ImageError:
    """An error naming the request field, in its message and as its ``param``."""
    return cls(f"{field}: {message}", param=field)


def _too_large(field: str, what: str, max_bytes: int) -> ImageError:
    message = f"{what} is larger than the {max_bytes}-byte image limit"
    return field_error(
        field, f"{message}; send a smaller image or raise images.max_bytes", ImageTooLargeError
    )
