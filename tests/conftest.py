"""Shared fixtures: real GGUF files written by the project, loaded through real llama.cpp."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from edge_vlm.testing import FAMILIES, Pair, variant, write_pair


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """edge-vlm's generic tiny pair: a seeded random llama model + mlp mmproj (a few MB),
    written with ``edge_vlm.testing`` (gguf-py)."""
    return write_pair(FAMILIES["generic"], tmp_path_factory.mktemp("tiny"), prefix="tiny-")


@pytest.fixture(scope="session")
def mismatched_mmproj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An mmproj that projects to 512 dims, for a 256-wide model."""
    wide = variant("generic", vision={"n_embd_text": 512})
    return write_pair(wide, tmp_path_factory.mktemp("mismatch"), prefix="wide-").mmproj


@pytest.fixture(scope="session")
def tiny_vlm(tiny_paths: Pair) -> Iterator[object]:
    import edge_vlm

    with edge_vlm.load(tiny_paths.model, tiny_paths.mmproj, threads=1) as vlm:
        yield vlm


@pytest.fixture(scope="session")
def tiling_pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """The tiny SmolVLM (idefics3) pair: 64-px tiles of 16 image tokens each plus an
    overview, 256-px longest edge, begin/end and row/column tokens around the tiles."""
    return write_pair(FAMILIES["smolvlm"], tmp_path_factory.mktemp("tiling"), prefix="tiling-")


@pytest.fixture(scope="session")
def tiling_vlm(tiling_pair: Pair) -> Iterator[object]:
    """:func:`tiling_pair` loaded on the CPU (tests that need a fresh load make their own)."""
    import edge_vlm

    with edge_vlm.load(tiling_pair.model, tiling_pair.mmproj, threads=1, gpu="off") as vlm:
        yield vlm


def draw(path: Path, bg: tuple[int, int, int], box: tuple[int, int, int] | None = None,
         size: tuple[int, int] = (96, 72)) -> Path:
    """Write a simple test image: a background, optionally with a filled rectangle."""
    img = Image.new("RGB", size, bg)
    if box is not None:
        ImageDraw.Draw(img).rectangle((10, 10, size[0] // 2, size[1] // 2), fill=box)
    img.save(path)
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("imgs")
    return {
        "red": draw(d / "red.png", (230, 20, 20)),
        "blue": draw(d / "blue.png", (20, 20, 230), (250, 250, 0)),
        "green": draw(d / "green.jpg", (20, 200, 40), (0, 0, 0)),
    }


def ask(image: Path | str | None, text: str = "What is this?") -> list[dict[str, object]]:
    """A one-message conversation about an image."""
    content: list[dict[str, object]] = []
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": str(image)}})
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty EDGE_VLM_HOME; no user config; the child load check off unless a test asks."""
    for key in [k for k in os.environ if k.startswith("EDGE_VLM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("EDGE_VLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EDGE_VLM_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("EDGE_VLM_STORE__CHECK_LOAD", "false")
    return tmp_path / "home"


@pytest.fixture
def pair(tmp_path: Path, tiny_paths: Pair) -> Pair:
    """A private copy of the tiny model pair (tests may damage it)."""
    src = tmp_path / "src"
    src.mkdir()
    return Pair(Path(shutil.copy(tiny_paths.model, src)), Path(shutil.copy(tiny_paths.mmproj, src)))
