"""Checking a weights dict against the tensors a GGUF builder is about to write."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

import numpy as np

Shape: TypeAlias = tuple[int, ...]


def check_weights(
    expected: Mapping[str, Shape],
    weights: Mapping[str, np.ndarray],
    *,
    optional: Mapping[str, Shape] | None = None,
    what: str,
) -> None:
    """Refuse weights that do not match a builder's spec exactly.

    Args:
        expected: Required tensor names and PyTorch-layout shapes.
        weights: The tensors given.
        optional: Tensors that may be present, with the shape they must have then.
        what: What is being written, for the message (``"mlp mmproj"``).

    Raises:
        ValueError: Listing every missing, unexpected and mis-shaped tensor.
    """
    allowed = dict(optional or {})
    problems: list[str] = []
    missing = [n for n in expected if n not in weights]
    if missing:
        problems.append("missing " + ", ".join(repr(n) for n in missing))
    unexpected = [n for n in weights if n not in expected and n not in allowed]
    if unexpected:
        problems.append("unexpected " + ", ".join(repr(n) for n in unexpected))
    for name, arr in weights.items():
        want = expected.get(name, allowed.get(name))
        if want is None:
            continue
        got = tuple(int(d) for d in np.shape(arr))
        if got != tuple(want):
            problems.append(f"{name!r} has shape {list(got)}, expected {list(want)}")
    if problems:
        raise ValueError(f"refusing to write {what}: " + "; ".join(problems))
