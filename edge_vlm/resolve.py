"""Turn what a user names (``default``, a store name, a GGUF path) into a model file pair."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_vlm import shipped
from edge_vlm.errors import ModelNotFoundError
from edge_vlm.shipped import (
    DEFAULT_NAMES,
    SHIPPED_MMPROJ_FILE,
    SHIPPED_MODEL,
    SHIPPED_MODEL_FILE,
    models_root,
    samples_dir,
    shipped_model_dir,
)

if TYPE_CHECKING:
    from edge_vlm.store.store import Store


# The shipped model's names and folders live in the leaf module edge_vlm.shipped (the
# store needs them too); they stay importable from here.
__all__ = ["DEFAULT_NAMES", "SHIPPED_MMPROJ_FILE", "SHIPPED_MODEL", "SHIPPED_MODEL_FILE",
           "ModelRef", "find_mmproj", "models_root", "resolve_model", "samples_dir",
           "shipped_model_dir"]


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: a display name and its two files.

    Attributes:
        name: The name shown and reported (``model`` of responses).
        model: The language-model GGUF.
        mmproj: The vision projector GGUF.
        model_sha256: The model file's sha256 when the store holds it as a blob (its
            content cannot change under that name), else "".
        mmproj_sha256: The same for the mmproj.
    """

    name: str
    model: Path
    mmproj: Path
    model_sha256: str = ""
    mmproj_sha256: str = ""


def _shipped(quant_file: str = SHIPPED_MODEL_FILE) -> ModelRef:
    folder = shipped.shipped_model_dir()
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


def resolve_model(name: str | Path | None, mmproj: str | Path | None = None, *,
                  store: Store | None = None) -> ModelRef:
    """Resolve a model name or path to its files.

    Args:
        name: ``None``/``default`` for the shipped model, a GGUF path, or a model name.
        mmproj: The mmproj path (required for a path unless one lies beside it).
        store: Where names are looked up (the front end opens it from its settings with
            :func:`edge_vlm.preflight.open_store`; None: the default store, default options).

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
    store_ref = _resolve_from_store(text, store)
    if store_ref is not None:
        return store_ref
    raise ModelNotFoundError(
        f"unknown model '{text}': give a GGUF path with --mmproj, 'default' for the shipped "
        "model, or an installed model name (edge-vlm models list)"
    )


def _resolve_from_store(name: str, store: Store | None) -> ModelRef | None:
    """Look a name up in the model store, when the store module is present."""
    try:
        from edge_vlm.store.manifest import ROLE_MMPROJ, ROLE_MODEL
        from edge_vlm.store.store import Store
    except ImportError:
        return None
    store = store or Store.default()
    found = store.lookup_manifest(name)
    if found is None:
        return None
    model, mmproj = store.paths(found)
    model_entry, mmproj_entry = found.file(ROLE_MODEL), found.file(ROLE_MMPROJ)
    # A blob's name is its sha256: the identity holds as long as the file does. A file
    # referenced in place may be edited, so it gets no recorded identity.
    return ModelRef(name, model, mmproj,
                    model_sha256="" if model_entry.path else model_entry.sha256,
                    mmproj_sha256="" if mmproj_entry.path else mmproj_entry.sha256)
