"""Image loading: sources, formats, colour modes, limits and remote fetching."""

from __future__ import annotations

import base64
import io
import os
import random
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from edge_vlm import images
from edge_vlm.errors import (
    ImageError,
    ImageTooLargeError,
    RemoteImageDisabledError,
    UnsupportedImageError,
)
from edge_vlm.image_source import ImagePolicy
from edge_vlm.images import decode_image, load_image, to_rgb

FIELD = "messages[1].content[0].image_url.url"


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims any size in a few bytes (a decompression-bomb stand-in)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(tag + body)
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))


def close(pixel: object, want: tuple[int, int, int], tol: int = 0) -> bool:
    assert isinstance(pixel, tuple), pixel
    return all(abs(a - b) <= tol for a, b in zip(pixel, want, strict=True))


def red_blue(size: tuple[int, int] = (8, 6)) -> Image.Image:
    img = Image.new("RGB", size, (255, 0, 0))
    img.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return img


# --- formats and modes ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_every_accepted_format_decodes(fmt: str) -> None:
    loaded = load_image(data_url(encode(red_blue((16, 12)), fmt)), ImagePolicy(), field=FIELD)
    assert (loaded.source_format, loaded.width, loaded.height) == (fmt, 16, 12)
    assert loaded.image.mode == "RGB"
    assert close(loaded.image.getpixel((2, 6)), (255, 0, 0), tol=40)
    assert close(loaded.image.getpixel((13, 6)), (0, 0, 255), tol=40)
    assert len(loaded.rgb_bytes()) == 16 * 12 * 3


def _palette(transparent: bool) -> Image.Image:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 255, 0])
    img.putpixel((1, 0), 1)
    if transparent:
        img.info["transparency"] = 1
    return img


MODE_CASES = [
    # (image, format, save options, expected pixels at x = 0 and x = 1)
    (Image.new("RGBA", (2, 1), (0, 0, 0, 0)), "PNG", {}, [(255, 255, 255)] * 2),
    (Image.new("LA", (2, 1), (0, 128)), "PNG", {}, [(127, 127, 127)] * 2),
    (Image.new("L", (2, 1), 77), "PNG", {}, [(77, 77, 77)] * 2),
    (Image.new("L", (2, 1), 0), "PNG", {"transparency": 0}, [(255, 255, 255)] * 2),
    (Image.new("RGB", (2, 1)), "PNG", {"transparency": (0, 0, 0)}, [(255, 255, 255)] * 2),
    (Image.new("I;16", (2, 1), 0x8080), "PNG", {}, [(128, 128, 128)] * 2),
    (Image.new("I;16", (2, 1), 0xFFFF), "PNG", {}, [(255, 255, 255)] * 2),
    (_palette(False), "PNG", {}, [(255, 0, 0), (0, 255, 0)]),
    (_palette(True), "PNG", {"transparency": 1}, [(255, 0, 0), (255, 255, 255)]),
    (_palette(True), "GIF", {"transparency": 1}, [(255, 0, 0), (255, 255, 255)]),
    (Image.new("CMYK", (2, 1), (0, 255, 255, 0)), "JPEG", {"quality": 95}, [(255, 0, 0)] * 2),
]


@pytest.mark.parametrize(("img", "fmt", "options", "want"), MODE_CASES)
def test_every_mode_becomes_rgb_with_right_colours(
    img: Image.Image, fmt: str, options: dict[str, object], want: list[tuple[int, int, int]]
) -> None:
    loaded = decode_image(encode(img, fmt, **options), field=FIELD)
    assert loaded.image.mode == "RGB"
    tol = 8 if fmt == "JPEG" else 1
    got = [loaded.image.getpixel((x, 0)) for x in (0, 1)]
    assert all(close(pixel, colour, tol) for pixel, colour in zip(got, want, strict=True)), got


def test_bilevel_and_wide_integer_and_float_modes() -> None:
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    loaded = decode_image(encode(bilevel, "PNG")).image
    assert [loaded.getpixel((x, 0)) for x in (0, 1)] == [(0, 0, 0), (255, 255, 255)]
    assert to_rgb(Image.new("I", (1, 1), 65535)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("I", (1, 1), -5)).getpixel((0, 0)) == (0, 0, 0)
    assert to_rgb(Image.new("F", (1, 1), 12.4)).getpixel((0, 0)) == (12, 12, 12)
    assert to_rgb(Image.new("F", (1, 1), 300.0)).getpixel((0, 0)) == (255, 255, 255)


def test_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), colour) for colour in ("red", "blue")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data).image.getpixel((1, 1)) == (255, 0, 0)


def test_exif_orientation_6_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed rotated 90 degrees clockwise
    loaded = decode_image(encode(red_blue((40, 20)), "JPEG", exif=exif.tobytes()))
    assert (loaded.width, loaded.height) == (20, 40)
    assert close(loaded.image.getpixel((10, 5)), (255, 0, 0), tol=40)  # stored left: top
    assert close(loaded.image.getpixel((10, 35)), (0, 0, 255), tol=40)


# --- sizes and identity --------------------------------------------------------------


def test_large_jpeg_is_decoded_at_reduced_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(red_blue((4032, 3024)), "JPEG", quality=70)
    handed: list[tuple[int, int]] = []
    real_downscale = images._downscale

    def spy(image: Image.Image, max_side: int) -> Image.Image:
        handed.append(image.size)
        return real_downscale(image, max_side)

    monkeypatch.setattr(images, "_downscale", spy)
    loaded = decode_image(data, max_side=512)
    assert (loaded.width, loaded.height) == (512, 384)
    assert handed == [(1008, 756)]  # DCT-scaled by 1/4, never the full 4032x3024
    assert close(loaded.image.getpixel((100, 200)), (255, 0, 0), tol=40)


def test_downscale_other_formats_and_keep_small_ones() -> None:
    assert decode_image(encode(red_blue((1000, 500)), "PNG"), max_side=100).image.size == (100, 50)
    assert decode_image(encode(red_blue((60, 30)), "PNG"), max_side=100).image.size == (60, 30)


def test_tiny_and_extreme_aspect_images() -> None:
    one = decode_image(encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"), max_side=64)
    assert (one.width, one.height, one.image.getpixel((0, 0))) == (1, 1, (9, 8, 7))
    strip = decode_image(encode(Image.new("L", (52800, 44)), "PNG"), max_side=512)
    assert (strip.width, strip.height) == (512, 1)


def test_identity_follows_pixels_not_encoding() -> None:
    base = red_blue()
    png = decode_image(encode(base, "PNG"))
    assert decode_image(encode(base, "PNG", compress_level=0)).identity == png.identity
    assert decode_image(encode(base, "WEBP", lossless=True)).identity == png.identity
    assert decode_image(encode(base, "BMP")).identity == png.identity
    changed = base.copy()
    changed.putpixel((0, 0), (255, 0, 1))
    assert decode_image(encode(changed, "PNG")).identity != png.identity
    # Same bytes of RGB, different shape.
    tall = decode_image(encode(Image.new("RGB", (2, 3), "red"), "PNG"))
    wide = decode_image(encode(Image.new("RGB", (3, 2), "red"), "PNG"))
    assert tall.rgb_bytes() == wide.rgb_bytes() and tall.identity != wide.identity


# --- refused input -------------------------------------------------------------------

PNG = encode(red_blue(), "PNG")
NOISY_PNG = encode(Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3)), "PNG")
JPEG = encode(red_blue((64, 64)), "JPEG")
SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>'


def refused(url: str, policy: ImagePolicy | None = None) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(url, policy or ImagePolicy(), field=FIELD)
    assert FIELD in str(info.value) and info.value.param == FIELD
    return info.value


@pytest.mark.parametrize(
    ("url", "kind", "says"),
    [
        ("", ImageError, "empty"),
        ("data:image/png;base64,", ImageError, "no data"),
        ("data:image/png;base64,iVBOR!!w0K", ImageError, "not valid base64"),
        ("data:image/png;base64,iVBORw0", ImageError, "not valid base64"),  # no padding
        ("data:image/png;base64iVBORw0KGgo=", ImageError, "no ','"),
        ("data:text/plain;base64,aGVsbG8=", ImageError, "'text/plain'"),
        ("data:image/png,%89PNG", ImageError, "not base64"),
        (data_url(png_header(20000, 20000)), ImageTooLargeError, "too many pixels"),
        (data_url(png_header(10000, 6000)), ImageTooLargeError, "10000x6000"),
        (data_url(NOISY_PNG[: len(NOISY_PNG) // 2]), ImageError, "corrupt or truncated"),
        (data_url(JPEG[: len(JPEG) // 2], "image/jpeg"), ImageError, "corrupt or truncated"),
        (data_url(PNG[:12]), ImageError, "header is damaged"),
        (data_url(SVG, "image/svg+xml"), UnsupportedImageError, "SVG"),
        (data_url(b"%PDF-1.7\n1 0 obj\n"), UnsupportedImageError, "PDF"),
        (data_url(b"%!PS-Adobe-3.0 EPSF-3.0\n"), UnsupportedImageError, "EPS"),
        (data_url(encode(red_blue(), "TIFF")), UnsupportedImageError, "TIFF"),
        (data_url(encode(red_blue(), "ICO")), UnsupportedImageError, "ICO"),
        (data_url(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic"), UnsupportedImageError, "HEIC"),
        (data_url(os.urandom(256).replace(b"BM", b"xx")), UnsupportedImageError, "not a known"),
        ("http://example.com/cat.png", RemoteImageDisabledError, "--allow-remote-images"),
        ("ftp://example.com/cat.png", ImageError, "unsupported scheme 'ftp'"),
        ("file://server/share/cat.png", ImageError, "must be local"),
    ],
)
def test_bad_urls_are_refused_clearly(url: str, kind: type[ImageError], says: str) -> None:
    error = refused(url)
    assert type(error) is kind
    assert says in str(error)


def test_data_url_length_checked_before_decoding() -> None:
    # Not even valid base64: refusing it as too large proves nothing was decoded.
    error = refused("data:image/png;base64," + "!" * 200, ImagePolicy(max_bytes=100))
    assert isinstance(error, ImageTooLargeError)


def test_pixel_limit_is_the_policy(tmp_path: Path) -> None:
    url = data_url(encode(Image.new("RGB", (100, 100)), "PNG"))
    assert "10000 pixels" in str(refused(url, ImagePolicy(max_pixels=9999)))
    assert load_image(url, ImagePolicy(max_pixels=10000)).width == 100


def test_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cat.png").write_bytes(PNG)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "noise.png").write_bytes(os.urandom(64).replace(b"BM", b"xx"))
    (tmp_path / "folder.png").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    policy = ImagePolicy()
    assert load_image(str(tmp_path / "cat.png"), policy).width == 8
    assert load_image((tmp_path / "cat.png").as_uri(), policy).width == 8
    assert load_image("~/cat.png", policy).width == 8
    assert "no file at" in str(refused(str(tmp_path / "missing.png")))
    assert "is a directory" in str(refused(str(tmp_path / "folder.png")))
    assert "is empty" in str(refused(str(tmp_path / "empty.png")))
    assert isinstance(refused(str(tmp_path / "noise.png")), UnsupportedImageError)
    too_big = refused(str(tmp_path / "cat.png"), ImagePolicy(max_bytes=len(PNG) - 1))
    assert isinstance(too_big, ImageTooLargeError)
    assert "data: URL" in str(refused(str(tmp_path / "cat.png"), ImagePolicy(False)))


def test_local_roots_and_symlink_escape(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "ok.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(PNG)
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "sub").symlink_to(outside)
    policy = ImagePolicy(allowed_local_roots=(root,))
    assert load_image(str(root / "ok.png"), policy).width == 8
    for path in (outside / "secret.png", root / "link.png", root / "sub" / "secret.png"):
        assert "outside the folders" in str(refused(str(path), policy))
    assert "outside the folders" in str(refused(str(root / ".." / "outside" / "x"), policy))
