"""Model names a client may send: store names, and hub repo ids the catalog knows.

Programs written for the Hugging Face Inference API name models by hub repo id
(``HuggingFaceTB/SmolVLM-256M-Instruct``). The catalog (``models/catalog.toml``) lists
the GGUF conversion of such a model (``ggml-org/SmolVLM-256M-Instruct-GGUF``) under a
store name (``smolvlm-256m``); a hub id matching an entry's repository, its upstream name
(the repository name without ``-GGUF``) or its title is answered by that store model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_vlm.errors import EdgeVLMError


@dataclass(frozen=True)
class InstalledModel:
    """An installed model's store name and files."""

    name: str
    model: Path
    mmproj: Path


def catalog_name_for_hub_id(repo_id: str) -> str | None:
    """The catalog name of a hub repo id, or None when no single entry matches."""
    text = repo_id.strip().lower()
    if text.count("/") != 1:
        return None
    try:
        from edge_vlm.store.catalog import load_catalog

        entries = load_catalog().entries.values()
    except (ImportError, EdgeVLMError):
        return None
    wanted = text.split("/")[1]
    found = {
        e.name for e in entries
        if text == e.repo.lower()
        or wanted in (e.repo.lower().split("/")[-1].removesuffix("-gguf"), e.title.lower())
    }
    return found.pop() if len(found) == 1 else None


def lookup_installed(name: str) -> InstalledModel | None:
    """An installed model by store name (marking it used), or None.

    Raises:
        ModelNotFoundError: the name is in the catalog but not installed (saying how to
            pull or import it), or one of its files went missing.
    """
    try:
        from edge_vlm.store import lookup
    except ImportError:  # an install without the store
        return None
    found = lookup(name)
    if found is None:
        return None
    return InstalledModel(name.strip().lower(), found[0], found[1])


def installed_models() -> list[InstalledModel]:
    """Every installed model whose files are present (without marking any as used)."""
    try:
        from edge_vlm.store.store import Store
    except ImportError:
        return []
    store = Store.default()
    out: list[InstalledModel] = []
    try:
        manifests, _ = store.installed()
    except (OSError, EdgeVLMError):
        return []
    for m in manifests:
        try:
            model, mmproj = store.paths(m)
        except EdgeVLMError:
            continue
        out.append(InstalledModel(m.name, model, mmproj))
    return out
