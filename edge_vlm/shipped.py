"""The model shipped with edge-vlm: its names and where its files are.

A leaf module (standard library and :mod:`edge_vlm.errors` only), so that name resolution,
the store and the front ends can all ask about the shipped model without importing one
another.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

from edge_vlm.errors import EdgeVLMError

SHIPPED_MODEL = "shapes-vlm"
"""The shipped model's name and its folder under ``models/`` (checkout) or
``edge_vlm/_models`` (wheel)."""
SHIPPED_MODEL_FILE = "model-q8_0.gguf"
"""The language-model file the runtime loads (the wheel ships only this quantization)."""
SHIPPED_MMPROJ_FILE = "mmproj-f16.gguf"
"""The vision projector file."""
DEFAULT_NAMES = frozenset({"default", SHIPPED_MODEL})
"""Names that mean the shipped model."""


def models_root() -> Path:
    """Where the shipped models are: inside the wheel, or ``models/`` of a source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_models", package.parent / "models"):
        if (candidate / SHIPPED_MODEL).is_dir():
            return candidate
    return package.parent / "models"


def shipped_model_dir() -> Path:
    """The shipped default model's folder."""
    return models_root() / SHIPPED_MODEL


def samples_dir() -> Path:
    """Sample images that come with the shipped model."""
    return shipped_model_dir() / "samples"


def training_dir() -> Path:
    """The shipped model's training code (``models/shapes-vlm/training`` of a checkout; the
    wheel does not carry it)."""
    return shipped_model_dir() / "training"


def import_training(module: str) -> ModuleType:
    """Import ``shapes_vlm.<module>`` from the shipped model's training code.

    The synthetic shapes world, the trainer and the evaluation live beside the model they
    made, not in the runtime; ``edge-vlm eval`` and the batch benchmark borrow them from a
    source checkout.

    Raises:
        EdgeVLMError: not a source checkout (the wheel ships no training code).
    """
    folder = training_dir()
    if not (folder / "shapes_vlm").is_dir():
        raise EdgeVLMError(
            f"the shapes-vlm training code is not installed (looked in {folder}): it lives in "
            "models/shapes-vlm/training of a source checkout of edge-vlm; run this from one")
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    return importlib.import_module(f"shapes_vlm.{module}")
