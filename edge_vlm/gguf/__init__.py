"""Reading and validating GGUF files (language models and mmproj vision projectors).

Nothing in this package imports llama_cpp or PyPI's ``gguf``: the bounded reader checks
untrusted files before llama.cpp sees them. Test models are written by
:mod:`edge_vlm.testing` (with llama.cpp's own ``gguf`` writer), not here. Names are
imported lazily so that ``edge_vlm.gguf.reader`` (used on every model load) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_vlm.gguf.constants import GGMLType, GGUFValueType, TokenType
    from edge_vlm.gguf.reader import ArraySummary, GGUFInfo, TensorInfo, read_gguf
    from edge_vlm.gguf.validate import (
        mmproj_output_width,
        text_embedding_width,
        validate_mmproj,
        validate_text_model,
    )
    from edge_vlm.gguf.vocab import SPACE, Vocab, build_spm_vocab

_LAZY = {
    "GGMLType": "constants",
    "GGUFValueType": "constants",
    "TokenType": "constants",
    "ArraySummary": "reader",
    "GGUFInfo": "reader",
    "TensorInfo": "reader",
    "read_gguf": "reader",
    "mmproj_output_width": "validate",
    "text_embedding_width": "validate",
    "validate_mmproj": "validate",
    "validate_text_model": "validate",
    "SPACE": "vocab",
    "Vocab": "vocab",
    "build_spm_vocab": "vocab",
}

__all__ = [
    "SPACE",
    "ArraySummary",
    "GGMLType",
    "GGUFInfo",
    "GGUFValueType",
    "TensorInfo",
    "TokenType",
    "Vocab",
    "build_spm_vocab",
    "mmproj_output_width",
    "read_gguf",
    "text_embedding_width",
    "validate_mmproj",
    "validate_text_model",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_vlm.gguf' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edge_vlm.gguf.{module}"), name)
