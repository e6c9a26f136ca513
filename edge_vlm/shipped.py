"""The model shipped with edge-vlm: its names and where its files are.

A leaf module (standard library only), so that name resolution, the store and the front
ends can all ask about the shipped model without importing one another.
"""

from __future__ import annotations

from pathlib import Path

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
