"""Bad input: each case is a clear error naming what was wrong, and the model stays usable."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import pytest

import edge_vlm
from edge_vlm.errors import (
    ContextOverflowError,
    ImageError,
    ImageTooLargeError,
    ModelLoadError,
    RequestError,
    UnsupportedImageError,
)
from tests.conftest import ask

FIELD = "messages[0].content[0].image_url.url"


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def image_files(d: Path, good: Path) -> dict[str, tuple[str, type[Exception], str]]:
    """name -> (url, error class, words the message must contain)."""
    (d / "empty.png").write_bytes(b"")
    raw = good.read_bytes()
    (d / "trunc.png").write_bytes(raw[: len(raw) // 2])
    from PIL import Image

    Image.new("RGB", (64, 64), (1, 2, 3)).save(d / "ok.jpg", quality=90)
    jpg = (d / "ok.jpg").read_bytes()
    (d / "trunc.jpg").write_bytes(jpg[:200])
    (d / "bomb.png").write_bytes(png_header_only(20000, 20000))
    (d / "pic.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (d / "fake.png").write_bytes(b"this is not an image at all" * 10)
    (d / "folder").mkdir()
    return {
        "invalid base64": ("data:image/png;base64,@@@@", ImageError, "base64"),
        "data url without comma": ("data:image/png;base64", ImageError, "no ','"),
        "non-image mime": ("data:text/plain;base64," + base64.b64encode(b"hi").decode(),
                           ImageError, "text/plain"),
        "missing file": (str(d / "nope.png"), ImageError, "nope.png"),
        "directory": (str(d / "folder"), ImageError, "folder"),
        "zero bytes": (str(d / "empty.png"), ImageError, "empty"),
        "truncated png": (str(d / "trunc.png"), ImageError, "truncated"),
        "truncated jpeg": (str(d / "trunc.jpg"), ImageError, "truncated"),
        "20000x20000 bomb": (str(d / "bomb.png"), ImageTooLargeError, "too many pixels"),
        "svg": (str(d / "pic.svg"), UnsupportedImageError, "SVG"),
        "not an image": (str(d / "fake.png"), ImageError, "not a known image"),
        "remote off": ("http://example.com/a.png", ImageError, "allow-remote-images"),
    }


CASES = ["invalid base64", "data url without comma", "non-image mime", "missing file",
         "directory", "zero bytes", "truncated png", "truncated jpeg", "20000x20000 bomb", "svg",
         "not an image", "remote off"]


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory: pytest.TempPathFactory, images):  # type: ignore[no-untyped-def]
    return image_files(tmp_path_factory.mktemp("bad"), images["red"])


@pytest.mark.parametrize("case", CASES)
def test_bad_image_is_a_clear_error_and_the_model_survives(tiny_vlm, images, bad_images, case):
    url, cls, words = bad_images[case]
    with pytest.raises(cls) as err:
        tiny_vlm.chat(ask(url), max_tokens=2)
    msg = str(err.value)
    assert FIELD in msg, msg
    assert words.lower() in msg.lower(), msg
    assert tiny_vlm.chat(ask(images["red"]), max_tokens=2).usage.completion_tokens == 2


REQUESTS = {
    "empty messages": ({"messages": []}, "messages"),
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    "content of the wrong type": ({"messages": [{"role": "user", "content": 5}]},
                                  "messages[0].content"),
    "image in assistant message": ({"messages": [{"role": "user", "content": "hi"}, {
        "role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]}]},
        "messages[1]"),
    "image in system message": ({"messages": [{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": "a.png"}}]}]}, "messages[0]"),
    "max_tokens 0": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
                     "max_tokens"),
    "max_tokens -1": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
                      "max_tokens"),
    "max_tokens huge": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12},
                        "max_tokens"),
    "NaN temperature": ({"messages": [{"role": "user", "content": "hi"}],
                         "temperature": float("nan")}, "temperature"),
    "n=2": ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
}


@pytest.mark.parametrize("case", list(REQUESTS))
def test_bad_request_names_the_field(tiny_vlm, case):
    request, field = REQUESTS[case]
    with pytest.raises(RequestError) as err:
        tiny_vlm.chat(request)
    assert str(err.value).startswith(field + ":"), str(err.value)
    assert tiny_vlm.chat([{"role": "user", "content": "hi"}], max_tokens=1).usage.total_tokens


def test_unknown_fields_from_newer_clients_are_ignored(tiny_vlm):
    reply = tiny_vlm.chat({"messages": [{"role": "user", "content": "hi", "x_new": 1}],
                           "max_tokens": 2, "reasoning_effort": "low", "logit_bias": {}})
    assert reply.usage.completion_tokens == 2


def test_prompt_overflowing_the_context(tiny_vlm, images):
    with pytest.raises(ContextOverflowError, match="the context holds"):
        tiny_vlm.chat(ask(images["red"], "word " * 3000), max_tokens=4)


def gguf_cases(d: Path, tiny_paths) -> dict[str, tuple[Path, Path, str]]:  # type: ignore[no-untyped-def]
    not_gguf = d / "notes.gguf"
    not_gguf.write_text("hello, I am a text file")
    trunc = d / "trunc.gguf"
    trunc.write_bytes(tiny_paths.model.read_bytes()[:5000])
    return {
        "not a gguf": (not_gguf, tiny_paths.mmproj, "not a GGUF"),
        "truncated gguf": (trunc, tiny_paths.mmproj, "truncated"),
        "model given as mmproj": (tiny_paths.model, tiny_paths.model, "not an mmproj"),
    }


@pytest.mark.parametrize("case", ["not a gguf", "truncated gguf", "model given as mmproj"])
def test_bad_model_files_are_refused_before_llama_cpp(tmp_path, tiny_paths, case):
    model, mmproj, words = gguf_cases(tmp_path, tiny_paths)[case]
    with pytest.raises(ModelLoadError) as err:
        edge_vlm.load(model, mmproj)
    assert words.lower() in str(err.value).lower(), str(err.value)
