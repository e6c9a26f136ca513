"""The model store: models installed by name, content-addressed, checked before use.

:func:`lookup` is what name resolution (``run -m NAME``, ``edge_vlm.load("NAME")``) calls.
Importing this package is cheap: no llama_cpp, no huggingface_hub, no rich.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["lookup"]


def lookup(name: str) -> tuple[Path, Path] | None:
    """(model, mmproj) paths of an installed model, marking it used; None if not installed.

    Raises:
        ModelNotFoundError: the name is in the catalog but not installed (says how to get
            it), or a file of the installed model went missing.
    """
    from edge_vlm.store.store import Store

    return Store.default().lookup(name)
