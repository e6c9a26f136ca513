"""Image detail on a tiling (idefics3, SmolVLM-style) projector: low / auto / high budgets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_vlm.backend import ImageChunk, RGBImage

# tiling_vlm (conftest): the tiny SmolVLM pair, 64-px tiles, 256-px longest edge.


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(path)
    return path


def ask_detail(vlm, image: Path, detail: str | None):  # type: ignore[no-untyped-def]
    url = {"url": str(image)} | ({"detail": detail} if detail else {})
    return vlm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": url},
                                                  {"type": "text", "text": "What is this?"}]}],
                    max_tokens=2, temperature=0).timings


def test_high_uses_the_full_tiling_and_low_one_tile(tiling_vlm, photo):
    high = ask_detail(tiling_vlm, photo, "high")
    low = ask_detail(tiling_vlm, photo, "low")
    assert high.images[0].detail == "high" and low.images[0].detail == "low"
    # 400x300 at longest edge 256 -> 256x192 -> 4x3 tiles of 64 px + the overview.
    assert high.images[0].tiles == 13
    assert low.images[0].tiles <= 2
    assert low.image_tokens < high.image_tokens
    assert low.images[0].tokens == low.image_tokens


def test_auto_on_a_cpu_defaults_to_the_cheap_budget(tiling_vlm, photo):
    auto = ask_detail(tiling_vlm, photo, None)
    low = ask_detail(tiling_vlm, photo, "low")
    assert auto.images[0].detail == "auto"
    assert auto.image_tokens == low.image_tokens


def test_detail_is_part_of_the_cache_identity(tiling_vlm, photo):
    ask_detail(tiling_vlm, photo, "high")
    again = ask_detail(tiling_vlm, photo, "low")
    high_again = ask_detail(tiling_vlm, photo, "high")
    assert again.images[0].identity != high_again.images[0].identity
    assert high_again.images[0].cache_hit


def test_budget_tokens_follow_max_tiles(photo, tiling_vlm):
    info = tiling_vlm.info
    assert info.tokens_per_tile == 16  # (64/8)^2 / 2^2
    assert info.image_token_budget("auto", None, 4) == 64
    assert info.image_token_budget("auto", 100, 4) == 64  # four tiles are fewer tokens
    assert info.image_token_budget("auto", 40, 4) == 40  # 40 tokens are fewer than 4 tiles
    assert info.image_token_budget("high", 40, 4) == 0


def test_a_one_tile_budget_decodes_the_image_small(tiling_vlm, photo):
    auto = ask_detail(tiling_vlm, photo, "auto")
    high = ask_detail(tiling_vlm, photo, "high")
    assert max(auto.images[0].width, auto.images[0].height) <= 64  # one 64-px tile
    assert max(high.images[0].width, high.images[0].height) == 256  # the preproc edge


def test_low_detail_runs_the_encoder_once(tiling_vlm, photo):
    """libmtmd makes an overview and one slice at a one-tile budget; edge-vlm hands it
    an image of exactly one tile, so the slice is the overview and is not encoded again."""
    tiling_vlm.engine.cache.clear()
    tiling_vlm.engine.reset()  # nothing from earlier tests in the KV cache
    low = ask_detail(tiling_vlm, photo, "low")
    im = low.images[0]
    assert (im.width, im.height) == (64, 64)
    assert im.tiles == 2 and im.encoded == 1
    assert im.tokens == 2 * tiling_vlm.info.tokens_per_tile
    high = ask_detail(tiling_vlm, photo, "high")
    assert high.images[0].encoded == high.images[0].tiles == 13


def test_the_slice_of_a_one_tile_image_is_the_overview(tiling_vlm):
    """What the single pass relies on, checked against libmtmd itself: both chunks of a
    tile-sized image encode to the same embeddings."""
    rng = np.random.default_rng(5)
    backend = tiling_vlm.engine.backend
    img = RGBImage(64, 64, rng.integers(0, 255, (64, 64, 3), dtype=np.uint8).tobytes(), "sq")
    budget = tiling_vlm.info.tokens_per_tile
    with backend.tokenize_prompt(f"look {backend.marker} here", [img], budget) as chunks:
        tiles = [c for c in chunks.items if isinstance(c, ImageChunk)]
        assert len(tiles) == 2
        assert tiles[0].identity == tiles[1].identity
        a, b = (backend.encode_image(chunks, t).copy() for t in tiles)
    assert a.shape == b.shape and np.array_equal(a, b)
