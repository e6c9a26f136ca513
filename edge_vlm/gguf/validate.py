"""Checks that a parsed GGUF file is the kind of model it is passed as, before llama.cpp
loads it.

llama.cpp reports some problems cleanly but aborts the process on others: a metadata key
of the wrong type (``gguf_get_val_u32`` asserts), a missing mmproj tensor (SIGSEGV in the
graph), a quantized patch embedding (abort in warmup), mismatched shapes (GGML_ASSERT).
These functions catch those first and say what to do.
"""

from __future__ import annotations

import os

from edge_vlm.errors import ModelLoadError
from edge_vlm.gguf.constants import GGMLType, GGUFValueType
from edge_vlm.gguf.reader import ArraySummary, GGUFInfo, TensorInfo, describe_path

_CLIP_U32_KEYS = (
    "clip.vision.image_size",
    "clip.vision.patch_size",
    "clip.vision.embedding_length",
    "clip.vision.feed_forward_length",
    "clip.vision.block_count",
    "clip.vision.attention.head_count",
    "clip.vision.projection_dim",
)
_BLOCK_TENSORS = ("attn_out", "ffn_up", "ffn_down")
_QKV = ("attn_q", "attn_k", "attn_v")
_MERGER = ("mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias")
# Tensors each supported projector's graph (tools/mtmd/models/*.cpp) uses without a null
# check; the vision tower's own tensors are checked for every one of them.
_PROJECTOR_TENSORS: dict[str, tuple[str, ...]] = {
    "mlp": ("mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"),
    "idefics3": ("mm.model.fc.weight",),
    "qwen2vl_merger": (*_MERGER, "v.patch_embd.weight.1"),
    "qwen2.5vl_merger": (*_MERGER, "v.patch_embd.weight.1"),
    "qwen3vl_merger": (*_MERGER, "v.patch_embd.weight.1", "v.patch_embd.bias",
                       "v.position_embd.weight"),
    "gemma3": ("mm.input_projection.weight", "mm.soft_emb_norm.weight",
               "v.position_embd.weight"),
    "internvl": ("mm.model.mlp.0.weight", "mm.model.mlp.0.bias", "mm.model.mlp.1.weight",
                 "mm.model.mlp.1.bias", "mm.model.mlp.3.weight", "mm.model.mlp.3.bias",
                 "v.class_embd", "v.position_embd.weight"),
    "lfm2": ("mm.1.weight", "mm.1.bias", "mm.2.weight", "mm.2.bias", "v.position_embd.weight"),
    "pixtral": ("mm.1.weight", "mm.2.weight", "v.token_embd.img_break"),
}
# Where each projector's output width (the text model's n_embd) is read, as libmtmd does:
# (tensor, ggml dimension).
_OUTPUT_WIDTH: dict[str, tuple[str, int]] = {
    "mlp": ("mm.2.weight", 1),
    "idefics3": ("mm.model.fc.weight", 1),
    "qwen2vl_merger": ("mm.2.weight", 1),
    "qwen2.5vl_merger": ("mm.2.weight", 1),
    "qwen3vl_merger": ("mm.2.weight", 1),
    "gemma3": ("mm.input_projection.weight", 0),
    "internvl": ("mm.model.mlp.3.weight", 1),
    "lfm2": ("mm.2.weight", 1),
    "pixtral": ("mm.2.weight", 1),
}
# Projectors whose position embedding is used as stored (not resized to the image).
_FIXED_POSITIONS = frozenset({"mlp", "idefics3", "gemma3", "internvl"})


def _is_mmproj(info: GGUFInfo) -> bool:
    return info.architecture == "clip" or any(k.startswith("clip.") for k in info.metadata)


def _name(info: GGUFInfo, path: str | os.PathLike[str] | None) -> str:
    return describe_path(info.path if path is None else path)


def validate_text_model(info: GGUFInfo, path: str | os.PathLike[str] | None = None) -> None:
    """Check that ``info`` is a language model llama.cpp can load.

    Args:
        info: From :func:`~edge_vlm.gguf.reader.read_gguf`.
        path: The path to name in messages (default ``info.path``).

    Raises:
        ModelLoadError: It is an mmproj, lacks the architecture, hyper-parameters,
            tokenizer or token embeddings, or (for ``llama``) a block tensor.
    """
    name = _name(info, path)
    if _is_mmproj(info):
        raise ModelLoadError(
            f"{name} is an mmproj (vision projector), not a language model: pass it as --mmproj"
        )
    arch = info.architecture
    if arch is None:
        raise ModelLoadError(f"{name} has no general.architecture: it is not a llama.cpp model")
    for key in ("embedding_length", "block_count", "context_length"):
        if info.get_int(f"{arch}.{key}") is None:
            raise ModelLoadError(f"model {name} (architecture {arch!r}) lacks {arch}.{key}")
    if info.get_str("tokenizer.ggml.model") is None:
        raise ModelLoadError(f"model {name} has no tokenizer (tokenizer.ggml.model)")
    n_vocab = _array_len(info, "tokenizer.ggml.tokens", GGUFValueType.STRING)
    if n_vocab is None or n_vocab == 0:
        raise ModelLoadError(f"model {name} has no token list (tokenizer.ggml.tokens)")
    n_types = _array_len(info, "tokenizer.ggml.token_type", None)
    if n_types is not None and n_types != n_vocab:
        raise ModelLoadError(f"model {name} has {n_vocab} tokens but {n_types} token types")
    emb = info.tensors.get("token_embd.weight")
    if emb is None:
        raise ModelLoadError(f"model {name} lacks tensor 'token_embd.weight'")
    n_embd = info.get_int(f"{arch}.embedding_length")
    if len(emb.shape) != 2 or emb.shape[0] != n_embd or emb.shape[1] < n_vocab:
        raise ModelLoadError(
            f"model {name}: 'token_embd.weight' has shape {list(emb.shape)}, expected "
            f"[{n_embd}, {n_vocab}] (embedding_length, tokens)"
        )
    if arch == "llama":
        n_layer = info.get_int("llama.block_count") or 0
        for i in range(n_layer):
            for t in ("attn_norm", "ffn_norm", "attn_output", "ffn_down", "ffn_up", "ffn_gate"):
                _require(info, f"blk.{i}.{t}.weight", f"model {name}", "the 'llama' architecture")
            if f"blk.{i}.attn_qkv.weight" not in info.tensors:
                for t in ("attn_q", "attn_k", "attn_v"):
                    _require(
                        info, f"blk.{i}.{t}.weight", f"model {name}", "the 'llama' architecture"
                    )


def validate_mmproj(info: GGUFInfo, path: str | os.PathLike[str] | None = None) -> None:
    """Check that ``info`` is a vision mmproj libmtmd can load without crashing.

    Args:
        info: From :func:`~edge_vlm.gguf.reader.read_gguf`.
        path: The path to name in messages (default ``info.path``).

    Raises:
        ModelLoadError: It is a language model, has no vision encoder, lacks a required key
            (or has it with the wrong type), or lacks/mis-shapes a tensor its projector
            type needs.
    """
    name = _name(info, path)
    if not _is_mmproj(info):
        arch = info.architecture
        what = f"a language model (architecture {arch!r})" if arch else "not a llama.cpp mmproj"
        raise ModelLoadError(f"{name} is {what}, not an mmproj: pass it as --model")
    if info.metadata.get("clip.has_vision_encoder") is not True:
        raise ModelLoadError(
            f"mmproj {name} has no vision encoder (clip.has_vision_encoder is not true): "
            "it cannot read images"
        )
    proj = info.get_str("clip.projector_type") or info.get_str("clip.vision.projector_type")
    if not proj:
        raise ModelLoadError(f"mmproj {name} lacks clip.projector_type")
    where = f"mmproj {name}"
    for key in _CLIP_U32_KEYS:
        _require_key(info, key, GGUFValueType.UINT32, where)
    _require_key(info, "clip.vision.attention.layer_norm_epsilon", GGUFValueType.FLOAT32, where)
    for key in ("clip.vision.image_mean", "clip.vision.image_std"):
        value = info.metadata.get(key)
        if (
            info.value_types.get(key) != (GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
            or not isinstance(value, list)
            or len(value) < 3
        ):
            raise ModelLoadError(f"{where}: {key} must be an array of 3 float32 values")
    for key in ("clip.use_gelu", "clip.use_silu"):
        if key in info.metadata:
            _require_key(info, key, GGUFValueType.BOOL, where)
    feature_layers = info.metadata.get("clip.vision.feature_layer", [])
    if "clip.vision.feature_layer" in info.metadata and (
        info.value_types["clip.vision.feature_layer"] != (GGUFValueType.ARRAY, GGUFValueType.INT32)
        or not isinstance(feature_layers, list)
    ):
        raise ModelLoadError(f"{where}: clip.vision.feature_layer must be an int32 array")
    n_feature_layers = len(feature_layers) if isinstance(feature_layers, list) else 0
    # clip.cpp asserts (aborting the process) on these rather than returning an error.
    width = info.get_int("clip.vision.embedding_length") or 0
    heads = info.get_int("clip.vision.attention.head_count") or 0
    if heads <= 0 or width % heads:
        raise ModelLoadError(
            f"{where}: clip.vision.attention.head_count {heads} does not divide the vision "
            f"width {width}: the file is damaged or was written by a broken converter"
        )
    image_size = info.get_int("clip.vision.image_size") or 0
    patch_size = info.get_int("clip.vision.patch_size") or 0
    if patch_size <= 0 or image_size < patch_size:
        raise ModelLoadError(
            f"{where}: clip.vision.image_size {image_size} is smaller than the patch size "
            f"{patch_size}: the file is damaged"
        )

    needs = _PROJECTOR_TENSORS.get(proj)
    if needs is None:
        return  # a projector type this project does not write: leave the rest to libmtmd
    why = f"the {proj!r} projector"
    for t in needs:
        _require(info, t, where, why)
    patch = _require(info, "v.patch_embd.weight", where, why)
    for i in range(info.get_int("clip.vision.block_count") or 0):
        for t in _BLOCK_TENSORS:
            _require(info, f"v.blk.{i}.{t}.weight", where, why)
        if f"v.blk.{i}.attn_qkv.weight" not in info.tensors:
            for t in _QKV:
                _require(info, f"v.blk.{i}.{t}.weight", where, why)
    pos = None
    if proj in _FIXED_POSITIONS:
        pos = _require(info, "v.position_embd.weight", where, why)
    _check_vision_shapes(info, where, proj, patch, pos, n_feature_layers)


def _check_vision_shapes(
    info: GGUFInfo, where: str, proj: str, patch: TensorInfo, pos: TensorInfo | None,
    n_feature_layers: int,
) -> None:
    n_embd = info.get_int("clip.vision.embedding_length") or 0
    p = info.get_int("clip.vision.patch_size") or 0
    image = info.get_int("clip.vision.image_size") or 0
    if patch.ggml_type not in (GGMLType.F16, GGMLType.F32):
        raise ModelLoadError(
            f"{where}: 'v.patch_embd.weight' is {patch.ggml_type.name}; libmtmd needs F16 or F32"
        )
    if patch.shape != (p, p, 3, n_embd):
        raise ModelLoadError(
            f"{where}: 'v.patch_embd.weight' has shape {list(patch.shape)}, "
            f"expected {[p, p, 3, n_embd]} (patch_size, channels, width)"
        )
    n_patches = (image // p) ** 2 if p else 0
    if "v.class_embd" in info.tensors:
        n_patches += 1
    if pos is not None and (
        len(pos.shape) != 2 or pos.shape[0] != n_embd or pos.shape[1] < n_patches
    ):
        raise ModelLoadError(
            f"{where}: 'v.position_embd.weight' has shape {list(pos.shape)}, "
            f"expected [{n_embd}, {n_patches}]"
        )
    if proj == "mlp":
        mm0 = info.tensors["mm.0.weight"]
        n_in = n_embd * max(1, n_feature_layers)
        if mm0.shape[0] != n_in:
            raise ModelLoadError(
                f"{where}: 'mm.0.weight' takes {mm0.shape[0]} inputs but the "
                f"vision encoder gives {n_in}"
            )
        mm2 = info.tensors["mm.2.weight"]
        if len(mm0.shape) != 2 or len(mm2.shape) != 2 or mm2.shape[0] != mm0.shape[1]:
            raise ModelLoadError(
                f"{where}: 'mm.0.weight' {list(mm0.shape)} and 'mm.2.weight' "
                f"{list(mm2.shape)} do not chain"
            )
    elif proj == "idefics3":
        fc = info.tensors["mm.model.fc.weight"]
        scale = info.get_int("clip.vision.projector.scale_factor") or 1
        if len(fc.shape) != 2 or fc.shape[0] != n_embd * scale * scale:
            raise ModelLoadError(
                f"{where}: 'mm.model.fc.weight' has shape {list(fc.shape)}, "
                f"expected [{n_embd * scale * scale}, n] for scale factor {scale}"
            )


def mmproj_output_width(info: GGUFInfo) -> int | None:
    """The width of the embeddings an mmproj produces (must equal the text model's).

    Taken from the projector's last tensor as libmtmd does (``mm.2.weight`` for ``mlp``,
    ``mm.model.fc.weight`` for ``idefics3``, ...); otherwise
    ``clip.vision.projection_dim``. None if unknown.
    """
    proj = info.get_str("clip.projector_type") or info.get_str("clip.vision.projector_type")
    tensor, dim = _OUTPUT_WIDTH.get(proj or "", ("", 0))
    if tensor in info.tensors and len(info.tensors[tensor].shape) == 2:
        return info.tensors[tensor].shape[dim]
    return info.get_int("clip.vision.projection_dim")


def text_embedding_width(info: GGUFInfo) -> int | None:
    """The language model's input embedding width (``{arch}.embedding_length``)."""
    arch = info.architecture
    width = info.get_int(f"{arch}.embedding_length") if arch else None
    if width is None and "token_embd.weight" in info.tensors:
        width = info.tensors["token_embd.weight"].shape[0]
    return width


def _require(info: GGUFInfo, tensor: str, where: str, why: str) -> TensorInfo:
    t = info.tensors.get(tensor)
    if t is None:
        raise ModelLoadError(f"{where} lacks tensor {tensor!r} required by {why}")
    return t


def _require_key(info: GGUFInfo, key: str, vtype: GGUFValueType, where: str) -> None:
    if key not in info.metadata:
        raise ModelLoadError(f"{where} lacks metadata key {key!r}")
    got = info.value_types[key][0]
    if got != vtype:
        # llama.cpp reads these with gguf_get_val_<type>, which aborts on any other type.
        raise ModelLoadError(
            f"{where}: {key} is stored as {got.name.lower()}, llama.cpp needs {vtype.name.lower()}"
        )


def _array_len(info: GGUFInfo, key: str, elem_type: GGUFValueType | None) -> int | None:
    value = info.metadata.get(key)
    if isinstance(value, ArraySummary):
        return value.length if elem_type in (None, value.elem_type) else None
    if isinstance(value, list):
        if elem_type == GGUFValueType.STRING and not all(isinstance(v, str) for v in value):
            return None
        return len(value)
    return None
