"""The lazy import of PyPI's ``gguf`` package (llama.cpp's own GGUF writer).

``gguf`` is not a runtime dependency of edge-vlm: only writing test models needs it.
"""

from __future__ import annotations

from types import ModuleType

INSTALL_HINT = "pip install 'edge-vlm[testing]'  (or pip install gguf)"


def require_gguf() -> ModuleType:
    """Import ``gguf`` or say which extra installs it.

    Raises:
        ImportError: ``gguf`` is not installed.
    """
    try:
        import gguf
    except ImportError as err:
        raise ImportError(
            "edge_vlm.testing writes GGUF files with llama.cpp's `gguf` package, which is not "
            f"installed: {INSTALL_HINT}"
        ) from err
    return gguf
