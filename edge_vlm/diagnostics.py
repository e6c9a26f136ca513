"""What the model makes of a prompt, for parity checks against llama.cpp's own tools and
for tests: libmtmd's chunks and the vision encoder's output.

:class:`~edge_vlm.api.VLM`'s ``debug_*`` methods build the prompt and images from a
conversation and call these.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from edge_vlm.chunks import ImageChunk, TextChunk
from edge_vlm.engine import Engine, PromptImage
from edge_vlm.prompt import RenderedPrompt


def prompt_chunks(engine: Engine, prompt: RenderedPrompt,
                  images: list[PromptImage]) -> list[tuple[str, list[int] | int]]:
    """The prompt as libmtmd tokenizes it: ``("text", ids)`` and ``("image", n_tokens)``."""
    with engine.lock, engine.tokenize(prompt, images) as ch:
        return [("text", list(c.tokens)) if isinstance(c, TextChunk) else ("image", c.n_tokens)
                for c in ch.items]


def image_embeddings(engine: Engine, images: list[PromptImage]) -> npt.NDArray[np.float32]:
    """The vision encoder's output for the first image: ``[n_tokens, n_embd]``."""
    backend = engine.backend
    with engine.lock, engine.tokenize(backend.marker, images) as chunks:
        ch = next(c for c in chunks.items if isinstance(c, ImageChunk))
        return backend.encode_image(chunks, ch)
