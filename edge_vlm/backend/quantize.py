"""Quantizing a language-model GGUF with llama.cpp (used by model builders, not answering)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from edge_vlm.backend._lib import init_once, llama_cpp
from edge_vlm.errors import ModelLoadError

QUANT_TYPES = {
    "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q4_K_S": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
}


def quantize_model(src: Path | str, dst: Path | str, qtype: str, threads: int = 0) -> None:
    """Quantize a language-model GGUF with llama.cpp (``Q8_0``, ``Q4_K_M``, ...).

    Writes to a temporary file and renames it, so ``dst`` is never half written.
    """
    init_once()
    if qtype not in QUANT_TYPES:
        raise ModelLoadError(f"unknown quantization '{qtype}'; choose one of {sorted(QUANT_TYPES)}")
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(f"llama.cpp could not quantize '{src}' to {qtype} (error {rc})")
    os.replace(tmp, dst)
