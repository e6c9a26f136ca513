"""Model names a client may send: store names, and hub repo ids the catalog knows.

Programs written for the Hugging Face Inference API name models by hub repo id
(``HuggingFaceTB/SmolVLM-256M-Instruct``). The catalog (``models/catalog.toml``) lists
the GGUF conversion of such a model (``ggml-org/SmolVLM-256M-Instruct-GGUF``) under a
store name (``smolvlm-256m``); a hub id matching an entry's repository, its upstream name
(the repository name without ``-GGUF``) or its title is answered by that store model.
"""

from __future__ import annotations

from edge_vlm.errors import EdgeVLMError


def catalog_name_for_hub_id(repo_id: str, catalog_file: str | None) -> str | None:
    """The catalog name of a hub repo id, or None when no single entry matches.

    Args:
        repo_id: What the client sent (``owner/name``).
        catalog_file: The extra catalog of the server's settings (``store.catalog_file``).
    """
    text = repo_id.strip().lower()
    if text.count("/") != 1:
        return None
    from edge_vlm.store.catalog import load_catalog

    try:
        entries = load_catalog(catalog_file).entries.values()
    except EdgeVLMError:
        return None
    wanted = text.split("/")[1]
    found = {
        e.name for e in entries
        if text == e.repo.lower()
        or wanted in (e.repo.lower().split("/")[-1].removesuffix("-gguf"), e.title.lower())
    }
    return found.pop() if len(found) == 1 else None
