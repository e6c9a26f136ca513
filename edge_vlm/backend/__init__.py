"""The one package that imports ``llama_cpp``: thin, typed wrappers over llama.cpp and libmtmd.

Everything above it (engine, API, CLI, TUI, server) talks to :class:`Backend`. One module
per job:

- :mod:`~edge_vlm.backend._lib`: the ``llama_cpp`` import, one-time init, the log callback;
- :mod:`~edge_vlm.backend.model`: :class:`Backend`, loading the model pair, its context
  and vision context, threads;
- :mod:`~edge_vlm.backend.vocab`: metadata and the vocabulary (a part of ``Backend``);
- :mod:`~edge_vlm.backend.tokenizer`: prompt and images into chunks (:class:`PromptChunks`),
  message text kept apart from control tokens;
- :mod:`~edge_vlm.backend.kv`: the KV cache and evaluation (a part of ``Backend``);
- :mod:`~edge_vlm.backend.sampler`: :class:`Sampler`, logit bias and JSON-schema grammars;
- :mod:`~edge_vlm.backend.system` and :mod:`~edge_vlm.backend.quantize`: process-wide
  facts about the build, and quantizing a GGUF.
"""

from __future__ import annotations

from edge_vlm.backend._lib import OMP_SPINCOUNT
from edge_vlm.backend.model import Backend
from edge_vlm.backend.quantize import QUANT_TYPES, quantize_model
from edge_vlm.backend.sampler import Sampler, check_logit_bias, json_schema_grammar
from edge_vlm.backend.system import supports_gpu_offload, system_info
from edge_vlm.backend.tokenizer import PromptChunks
from edge_vlm.chunks import BackendConfig, ImageChunk, RGBImage, SamplerParams, TextChunk

__all__ = [
    "OMP_SPINCOUNT",
    "QUANT_TYPES",
    "Backend",
    "BackendConfig",
    "ImageChunk",
    "PromptChunks",
    "RGBImage",
    "Sampler",
    "SamplerParams",
    "TextChunk",
    "check_logit_bias",
    "json_schema_grammar",
    "quantize_model",
    "supports_gpu_offload",
    "system_info",
]
