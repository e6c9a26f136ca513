"""Plain types shared by the backend and the engine (no llama_cpp here).

The engine and its tests can name prompts, chunks and sampler settings without loading
llama.cpp; only :mod:`edge_vlm.backend` turns them into native calls.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class BackendConfig:
    """How to load a model pair (resolved from the settings by the engine)."""

    model_path: Path
    mmproj_path: Path
    n_ctx: int | None
    n_batch: int
    threads: int
    n_gpu_layers: int
    mmproj_use_gpu: bool
    flash_attn: str  # "auto" | "on" | "off"
    verbose: bool = False
    swa_full: bool = False
    image_min_tokens: int = 0
    image_max_tokens: int = 0
    one_tile_side: int = 0
    """For an idefics3 projector, its tile size: an image of exactly this square size at a
    one-tile budget becomes an overview and one slice that are the same pixels."""


@dataclass(frozen=True)
class TextChunk:
    """Text tokens of a tokenized prompt."""

    tokens: tuple[int, ...]


@dataclass(frozen=True)
class ImageChunk:
    """An image of a tokenized prompt: ``n_tokens`` embeddings at ``n_pos`` positions."""

    index: int  # position among the native chunks
    identity: str  # unique per tile: "<image identity>#<tile>"
    image: str  # the image's identity (shared by its tiles)
    tile: int  # 0 for an image's first (or only) chunk
    n_tokens: int
    n_pos: int
    nx: int
    ny: int


Chunk = TextChunk | ImageChunk


def share_copied_slice(items: list[Chunk], one_tile_images: set[str]) -> list[Chunk]:
    """Give the only slice of each image in ``one_tile_images`` its overview's identity.

    Those images are exactly one tile in size; libmtmd's idefics3 preprocessing then makes
    an overview and one slice that are both plain copies of the image, so the slice's
    embeddings are the overview's and the engine encodes the image once. Images with any
    other chunk layout are left alone.
    """
    out = list(items)
    for i, ch in enumerate(out):
        if not (isinstance(ch, ImageChunk) and ch.tile == 1 and ch.image in one_tile_images):
            continue
        tiles = [c for c in out if isinstance(c, ImageChunk) and c.image == ch.image]
        if len(tiles) == 2 and tiles[0].n_tokens == ch.n_tokens:
            out[i] = replace(ch, identity=tiles[0].identity)
    return out


def next_tile(items: list[Chunk], image: str) -> int:
    """The tile number of the next image chunk of ``image`` (0 when a new image starts).

    A tiled image's chunks are interleaved with text chunks (row markers) and follow each
    other; a new image starts after a chunk of a different image or the first of the run.
    """
    for prev in reversed(items):
        if isinstance(prev, ImageChunk):
            return prev.tile + 1 if prev.image == image else 0
    return 0


@dataclass(frozen=True)
class SamplerParams:
    """llama.cpp sampler chain parameters."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    frequency_penalty: float
    presence_penalty: float
    seed: int | None
    grammar: str | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling."""


@dataclass(frozen=True)
class RGBImage:
    """Raw RGB pixels handed to libmtmd (decoded by Pillow, never by llama.cpp)."""

    width: int
    height: int
    data: bytes
    identity: str
