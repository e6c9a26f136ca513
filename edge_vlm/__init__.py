"""edge-vlm: an offline runtime for vision-language models on top of llama.cpp.

Heavy parts (llama.cpp, Textual, the HTTP server) are imported only when used:
``import edge_vlm`` is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from edge_vlm.api import VLM as VLM
    from edge_vlm.api import load as load
    from edge_vlm.config import Settings as Settings
    from edge_vlm.config import load_settings as load_settings
    from edge_vlm.errors import ContextOverflowError as ContextOverflowError
    from edge_vlm.errors import EdgeVLMError as EdgeVLMError
    from edge_vlm.errors import ImageError as ImageError
    from edge_vlm.errors import ModelLoadError as ModelLoadError
    from edge_vlm.errors import RequestError as RequestError
    from edge_vlm.schema import ChatCompletion as ChatCompletion
    from edge_vlm.schema import ChatCompletionChunk as ChatCompletionChunk
    from edge_vlm.schema import ChatCompletionRequest as ChatCompletionRequest

_LAZY = {
    "load": "edge_vlm.api",
    "VLM": "edge_vlm.api",
    "Settings": "edge_vlm.config",
    "load_settings": "edge_vlm.config",
    "EdgeVLMError": "edge_vlm.errors",
    "RequestError": "edge_vlm.errors",
    "ImageError": "edge_vlm.errors",
    "ModelLoadError": "edge_vlm.errors",
    "ContextOverflowError": "edge_vlm.errors",
    "ChatCompletion": "edge_vlm.schema",
    "ChatCompletionChunk": "edge_vlm.schema",
    "ChatCompletionRequest": "edge_vlm.schema",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_vlm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
