"""Writing, reading and validating GGUF files (language models and mmproj vision projectors).

Nothing in this package imports llama_cpp: the reader checks untrusted files before
llama.cpp sees them, and the writers produce files llama.cpp loads. Names are imported
lazily so that ``edge_vlm.gguf.reader`` (used on every model load) does not pull in numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_vlm.gguf.builders import (
        CHAT_SPECIAL_TOKENS,
        DEFAULT_CHAT_TEMPLATE,
        TextModelSpec,
        llama_tensor_shapes,
        write_llama_model,
    )
    from edge_vlm.gguf.constants import GGMLType, GGUFValueType, TokenType
    from edge_vlm.gguf.projectors import (
        Idefics3ProjectorSpec,
        MLPProjectorSpec,
        write_idefics3_mmproj,
        write_mlp_mmproj,
    )
    from edge_vlm.gguf.reader import ArraySummary, GGUFInfo, TensorInfo, read_gguf
    from edge_vlm.gguf.testmodels import TinyVLMPaths, make_tiny_vlm, tiny_vocab
    from edge_vlm.gguf.validate import (
        mmproj_output_width,
        text_embedding_width,
        validate_mmproj,
        validate_text_model,
    )
    from edge_vlm.gguf.vocab import SPACE, Vocab, build_spm_vocab
    from edge_vlm.gguf.writer import GGUFWriter

_LAZY = {
    "CHAT_SPECIAL_TOKENS": "builders",
    "DEFAULT_CHAT_TEMPLATE": "builders",
    "TextModelSpec": "builders",
    "llama_tensor_shapes": "builders",
    "write_llama_model": "builders",
    "GGMLType": "constants",
    "GGUFValueType": "constants",
    "TokenType": "constants",
    "Idefics3ProjectorSpec": "projectors",
    "MLPProjectorSpec": "projectors",
    "write_idefics3_mmproj": "projectors",
    "write_mlp_mmproj": "projectors",
    "ArraySummary": "reader",
    "GGUFInfo": "reader",
    "TensorInfo": "reader",
    "read_gguf": "reader",
    "TinyVLMPaths": "testmodels",
    "make_tiny_vlm": "testmodels",
    "tiny_vocab": "testmodels",
    "mmproj_output_width": "validate",
    "text_embedding_width": "validate",
    "validate_mmproj": "validate",
    "validate_text_model": "validate",
    "SPACE": "vocab",
    "Vocab": "vocab",
    "build_spm_vocab": "vocab",
    "GGUFWriter": "writer",
}

__all__ = [
    "CHAT_SPECIAL_TOKENS",
    "DEFAULT_CHAT_TEMPLATE",
    "SPACE",
    "ArraySummary",
    "GGMLType",
    "GGUFInfo",
    "GGUFValueType",
    "GGUFWriter",
    "Idefics3ProjectorSpec",
    "MLPProjectorSpec",
    "TensorInfo",
    "TextModelSpec",
    "TinyVLMPaths",
    "TokenType",
    "Vocab",
    "build_spm_vocab",
    "llama_tensor_shapes",
    "make_tiny_vlm",
    "mmproj_output_width",
    "read_gguf",
    "text_embedding_width",
    "tiny_vocab",
    "validate_mmproj",
    "validate_text_model",
    "write_idefics3_mmproj",
    "write_llama_model",
    "write_mlp_mmproj",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_vlm.gguf' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edge_vlm.gguf.{module}"), name)
