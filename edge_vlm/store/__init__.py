"""The model store: models installed by name, content-addressed, checked before use.

:func:`lookup` is what name resolution (``run -m NAME``, ``edge_vlm.load("NAME")``) calls.
Importing this package is cheap: no llama_cpp, no huggingface_hub, no rich.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_vlm.store.store import Store

__all__ = ["lookup"]


def lookup(name: str, store: Store | None = None) -> tuple[Path, Path] | None:
    """(model, mmproj) paths of an installed model, marking it used; None if not installed.

    Args:
        name: The model's store name.
        store: The store to look in (front ends pass the one
            :func:`edge_vlm.preflight.open_store` made from their settings; None: the
            default store with default options).

    Raises:
        ModelNotFoundError: the name is in the catalog but not installed (says how to get
            it), or a file of the installed model went missing.
    """
    from edge_vlm.store.store import Store

    return (store or Store.default()).lookup(name)
