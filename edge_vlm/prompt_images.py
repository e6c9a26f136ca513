"""A conversation's images made ready for a model: read under an image policy, decoded no
larger than the model can use at each image's detail level, and given their cache identity.

:class:`~edge_vlm.api.VLM` uses it (``image_policy``, ``image_budget``, ``max_side``,
``load_images``); reading and decoding one image is :mod:`edge_vlm.images`'s job.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from PIL import Image

from edge_vlm.chunks import RGBImage
from edge_vlm.config import ImageSettings
from edge_vlm.engine import PromptImage
from edge_vlm.errors import RequestError
from edge_vlm.image_source import ImagePolicy
from edge_vlm.images import decode_image, load_image
from edge_vlm.loader import ModelInfo
from edge_vlm.schema import ChatMessage, ImagePart


def image_budget(info: ModelInfo, s: ImageSettings, details: Sequence[str]) -> int:
    """A request's image-token budget for its images' detail levels: the highest detail
    any of them asks for (libmtmd preprocesses all images of a prompt alike)."""
    budgets = [info.image_token_budget(d, s.max_image_tokens, s.max_tiles) for d in details]
    if not budgets:
        return 0
    return 0 if 0 in budgets else max(budgets)


def max_side(info: ModelInfo, s: ImageSettings, detail: str) -> int:
    """The longest image side worth handing to the vision encoder."""
    side = info.max_image_side(detail)
    budget = info.image_token_budget(detail, s.max_image_tokens, s.max_tiles)
    if budget and info.tokens_per_tile and info.image_size:
        # A token budget caps the pixels libmtmd keeps: decode no larger than that.
        tiles_per_side = math.ceil(math.sqrt(budget / info.tokens_per_tile))
        side = min(side, info.image_size * tiles_per_side)
    if s.max_side:
        side = min(side, s.max_side)
    return side


def load_images(
    info: ModelInfo, s: ImageSettings, messages: list[ChatMessage],
    policy: ImagePolicy | None = None, image_data: Sequence[bytes] | None = None,
) -> list[PromptImage]:
    """Read, decode and downscale every image of a conversation, in order (from
    ``image_data``, the images' bytes already read, when given).

    Args:
        info: The model the images are for.
        s: The image settings (default detail, budgets, largest side).
        messages: The conversation.
        policy: Where images may come from (default: :func:`image_policy` of ``s``).
        image_data: Each image part's encoded bytes, in the order of the parts.

    Raises:
        RequestError: ``image_data`` does not hold one entry per image part.
        ImageError: an image could not be read or is not allowed.
    """
    policy = policy or ImagePolicy.from_settings(s)
    parts = [(f"messages[{i}].content[{j}].image_url.url", part.image_url.url,
              part.image_url.detail or s.detail)
             for i, msg in enumerate(messages) if isinstance(msg.content, list)
             for j, part in enumerate(msg.content) if isinstance(part, ImagePart)]
    square = info.one_tile_side(image_budget(info, s, [d for _, _, d in parts]))
    out: list[PromptImage] = []
    if image_data is not None and len(image_data) != len(parts):
        raise RequestError(f"{len(image_data)} images read for {len(parts)} image parts")
    for k, (field, url, detail) in enumerate(parts):
        img = (load_image(url, policy, max_side=max_side(info, s, detail), field=field)
               if image_data is None else
               decode_image(image_data[k], max_pixels=policy.max_pixels,
                            max_side=max_side(info, s, detail), field=field))
        t0 = time.perf_counter()
        pixels, identity = img.image, f"{img.identity}:{detail}"
        if square and pixels.size != (square, square):
            # Stretched, as libmtmd stretches the overview: then the overview and the
            # only slice are one picture, encoded once (see ModelInfo.one_tile_side).
            pixels = pixels.resize((square, square), Image.Resampling.BICUBIC)
            identity += f":sq{square}"
        ms = img.decode_ms + (time.perf_counter() - t0) * 1000.0
        rgb = RGBImage(pixels.width, pixels.height, pixels.tobytes(), identity)
        out.append(PromptImage(rgb=rgb, detail=detail, decode_ms=ms))
    return out
