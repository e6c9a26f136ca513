"""Small random-weight model pairs of real VLM families, for your own tests and CI.

::

    from edge_vlm.testing import tiny_pair

    model, mmproj = tiny_pair("qwen2.5-vl", tmp_path)      # a few MB, under a second
    with edge_vlm.load(model, mmproj) as vlm: ...

Each pair has its family's text architecture, projector, image tokens and the structure of
its chat template, with seeded random weights: answers are random words, but every code
path (M-RoPE positions, non-causal image attention, tiling, dynamic resolution) is the
family's own. Writing needs llama.cpp's ``gguf`` package (``pip install
'edge-vlm[testing]'``); nothing here is imported by the runtime.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from edge_vlm.testing.families import FAMILIES, FULL_SIZE, Family
from edge_vlm.testing.families import family as _family

if TYPE_CHECKING:
    from edge_vlm.gguf.vocab import Vocab

__all__ = ["FAMILIES", "FULL_SIZE", "Family", "Pair", "family_names", "family_vocab",
           "tiny_pair", "variant", "write_pair"]


class Pair(NamedTuple):
    """A written model pair (a tuple: ``model, mmproj = tiny_pair(...)`` works too).

    Attributes:
        model: The language model GGUF.
        mmproj: The vision projector GGUF.
    """

    model: Path
    mmproj: Path


def family_names() -> list[str]:
    """Names accepted by :func:`tiny_pair`."""
    return list(FAMILIES)


def write_pair(fam: Family, out_dir: str | os.PathLike[str], *, seed: int = 0,
               n_vocab: int | None = None, prefix: str = "") -> Pair:
    """Write ``{prefix}model.gguf`` and ``{prefix}mmproj.gguf`` for a family spec.

    Args:
        fam: A family (``FAMILIES[name]``, ``FULL_SIZE[name][0]`` or a modified copy).
        out_dir: Existing directory.
        seed: Seed of every weight; the same seed writes the same tensors.
        n_vocab: Vocabulary size (default: the tiny vocabulary); full-size presets pass
            their real size. Above the tiny size, weights follow the benchmark recipe
            (tied output layer, generation never ends early).
        prefix: File-name prefix.

    Returns:
        ``Pair(model, mmproj)``.

    Raises:
        FileNotFoundError: ``out_dir`` does not exist.
        ImportError: ``gguf`` is not installed (names the extra to install).
    """
    import numpy as np

    from edge_vlm.testing.writer import family_vocab, write_mmproj, write_text_model

    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"output directory '{out}' does not exist")
    vocab = family_vocab(fam, n_vocab)
    rng = np.random.default_rng(seed)
    model = write_text_model(out / f"{prefix}model.gguf", fam, vocab, rng=rng,
                             tiny=n_vocab is None)
    mmproj = write_mmproj(out / f"{prefix}mmproj.gguf", fam, rng=rng)
    return Pair(model, mmproj)


def tiny_pair(family: str, out_dir: str | os.PathLike[str], seed: int = 0) -> Pair:
    """Write a tiny random model pair of a VLM family into ``out_dir``.

    Args:
        family: One of :func:`family_names` (``smolvlm``, ``llava``, ``qwen2.5-vl``,
            ``qwen3-vl``, ``gemma-3``, ``internvl``, ``lfm2-vl``, ``moondream``, ``pixtral``,
            ``generic``).
        out_dir: Existing directory; the files are ``model.gguf`` and ``mmproj.gguf``.
        seed: Weight seed.

    Returns:
        ``Pair(model, mmproj)``.

    Raises:
        KeyError: Unknown family (the message lists the known ones).
        ImportError: ``gguf`` is not installed.
    """
    return write_pair(_family(family), out_dir, seed=seed)


def variant(fam: Family | str, *, text: Mapping[str, Any] | None = None,
            vision: Mapping[str, Any] | None = None, **fields: Any) -> Family:
    """A copy of a family with some shapes, keys or fields changed (still only data).

    ::

        wide = variant("generic", vision={"n_embd_text": 512})   # a mismatched mmproj
        tools = variant("generic", chat_template=HERMES)          # another chat template
        big = variant("generic", text={"n_layer": 12, "n_ff": 2048})

    Args:
        fam: A family or the name of a tiny one.
        text: :class:`~edge_vlm.testing.specs.TextSpec` fields to change.
        vision: :class:`~edge_vlm.testing.specs.VisionSpec` fields to change.
        **fields: :class:`Family` fields to change (``chat_template``, ``name``, ...).

    Returns:
        The changed family.

    Raises:
        KeyError: Unknown family name.
        TypeError: A field that the spec or family does not have.
    """
    base = _family(fam) if isinstance(fam, str) else fam
    changed = dataclasses.replace(base.text, **(text or {}))
    projector = dataclasses.replace(base.vision, **(vision or {}))
    return dataclasses.replace(base, text=changed, vision=projector, **fields)


def family_vocab(fam: Family | str) -> Vocab:
    """The tiny vocabulary a family's pair is written with (to compare token ids).

    Args:
        fam: A family or the name of a tiny one.

    Returns:
        The vocabulary: the tiny words, byte tokens and the family's special tokens.
    """
    from edge_vlm.testing.writer import family_vocab as _vocab

    return _vocab(_family(fam) if isinstance(fam, str) else fam)
