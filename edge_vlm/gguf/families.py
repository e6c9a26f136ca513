"""Naming a model pair's family from its GGUF metadata (no llama_cpp, no gguf package)."""

from __future__ import annotations

# libmtmd projector type -> family, for projectors that belong to one family.
_BY_PROJECTOR = {
    "idefics3": "smolvlm",
    "qwen2vl_merger": "qwen2-vl",
    "qwen2.5vl_merger": "qwen2.5-vl",
    "qwen3vl_merger": "qwen3-vl",
    "gemma3": "gemma-3",
    "gemma3nv": "gemma-3n",
    "gemma4v": "gemma-4",
    "internvl": "internvl",
    "lfm2": "lfm2-vl",
    "pixtral": "pixtral",
    "llama4": "llama-4",
    "minicpmv": "minicpm-v",
    "kimivl": "kimi-vl",
    "glm4v": "glm-4v",
    "cogvlm": "cogvlm",
    "janus_pro": "janus-pro",
    "phi4": "phi-4-multimodal",
    "deepseekocr": "deepseek-ocr",
    "lightonocr": "lightonocr",
    "ldp": "mobilevlm",
    "ldpv2": "mobilevlm",
    "resampler": "minicpm-v",
    "adapter": "glm-edge",
}


def family_name(projector_type: str, architecture: str = "") -> str:
    """The family a pair belongs to, named as ``edge_vlm.testing`` names them.

    Args:
        projector_type: ``clip.projector_type`` of the mmproj (``qwen2.5vl_merger``).
        architecture: ``general.architecture`` of the language model (``qwen2vl``).

    Returns:
        ``qwen2.5-vl``, ``gemma-3``, ``smolvlm``, ...; an ``mlp`` projector is ``llava``
        (LLaVA and its descendants; ``moondream`` on a ``phi2`` model); an unknown
        projector is returned as it is, or ``unknown`` if empty.
    """
    if projector_type in ("mlp", "mlp_norm"):
        return "moondream" if architecture == "phi2" else "llava"
    return _BY_PROJECTOR.get(projector_type, projector_type or "unknown")
