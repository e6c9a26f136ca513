"""Turn what a user names (``default``, a store name, a GGUF path) into a model file pair."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_vlm.errors import ModelNotFoundError

#: The shipped model's folder name under ``models/`` (repo) or ``edge_vlm/_models`` (wheel).
SHIPPED_MODEL = "shapes-vlm"
SHIPPED_MODEL_FILE = "model-q8_0.gguf"
SHIPPED_MMPROJ_FILE = "mmproj-f16.gguf"
DEFAULT_NAMES = {"default", SHIPPED_MODEL}


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: a display name and its two files."""

    name: str
    model: Path
    mmproj: Path


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


def _shipped(quant_file: str = SHIPPED_MODEL_FILE) -> ModelRef:
    folder = shipped_model_dir()
    model, mmproj = folder / quant_file, folder / SHIPPED_MMPROJ_FILE
    if not model.is_file() or not mmproj.is_file():
        raise ModelNotFoundError(
            f"the shipped default model is missing from {folder} (expected {model.name} and "
            f"{mmproj.name}); reinstall edge-vlm, or name a model with --model PATH --mmproj PATH"
        )
    return ModelRef(SHIPPED_MODEL, model, mmproj)


def find_mmproj(model: Path) -> Path:
    """The mmproj beside a model file: the one GGUF in its folder named ``*mmproj*``."""
    candidates = sorted(p for p in model.parent.glob("*.gguf") if "mmproj" in p.name.lower())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ModelNotFoundError(
            f"no mmproj given for '{model}' and none found beside it: pass --mmproj PATH "
            "(the vision projector GGUF that belongs to this model)"
        )
    names = ", ".join(p.name for p in candidates)
    raise ModelNotFoundError(
        f"several mmproj files beside '{model}' ({names}): choose one with --mmproj PATH"
    )


def resolve_model(name: str | Path | None, mmproj: str | Path | None = None) -> ModelRef:
    """Resolve a model name or path to its files.

    Args:
        name: ``None``/``default`` for the shipped model, a GGUF path, or a model name.
        mmproj: The mmproj path (required for a path unless one lies beside it).

    Raises:
        ModelNotFoundError: with what to do instead.
    """
    text = str(name) if name is not None else "default"
    if text in DEFAULT_NAMES and mmproj is None:
        return _shipped()
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf" or path.exists():
        if path.is_dir():
            raise ModelNotFoundError(
                f"'{path}' is a folder: pass the language-model GGUF file inside it as --model"
            )
        if not path.is_file():
            raise ModelNotFoundError(f"model file '{path}' does not exist")
        proj = Path(mmproj).expanduser() if mmproj is not None else find_mmproj(path)
        if not proj.is_file():
            raise ModelNotFoundError(f"mmproj file '{proj}' does not exist")
        return ModelRef(path.stem, path, proj)
    store_ref = _resolve_from_store(text)
    if store_ref is not None:
        return store_ref
    raise ModelNotFoundError(
        f"unknown model '{text}': give a GGUF path with --mmproj, 'default' for the shipped "
        "model, or an installed model name (edge-vlm models list)"
    )


def _resolve_from_store(name: str) -> ModelRef | None:
    """Look a name up in the model store, when the store module is present."""
    try:
        from edge_vlm.store import lookup  # the store resolves its own names
    except ImportError:
        return None
    found = lookup(name)
    if found is None:
        return None
    model, mmproj = found
    return ModelRef(name, model, mmproj)
