"""mmproj (vision encoder + projector) writers for libmtmd's ``mlp`` and ``idefics3`` types.

Tensor names and hyper-parameter keys follow ``tools/mtmd/clip-impl.h`` and ``clip.cpp``.
clip.cpp loads most vision tensors as optional and dereferences them later, so a missing
one is a SIGSEGV rather than an error: both writers refuse incomplete weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from edge_vlm.gguf.constants import FileType, GGUFValueType
from edge_vlm.gguf.shapes import Shape, check_weights
from edge_vlm.gguf.writer import GGUFWriter

_DType = Literal["F16", "F32"]
_HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True, kw_only=True)
class VisionSpec:
    """Hyper-parameters shared by the ViT towers of both projector types.

    Attributes:
        image_size: Input side in pixels (images are resized/letterboxed to it).
        patch_size: Patch side in pixels; must divide ``image_size``.
        n_embd: Vision width.
        n_ff: Vision MLP width; must differ from ``n_embd`` (clip.cpp otherwise assumes a
            legacy naming and silently swaps ``ffn_up``/``ffn_down``).
        n_layer: Vision blocks in the file.
        n_head: Vision attention heads.
        n_embd_text: Output width: the language model's ``n_embd``.
        eps: LayerNorm epsilon.
        image_mean: Per-channel mean applied to ``x / 255``.
        image_std: Per-channel std applied after the mean.
        use_gelu: Vision MLP activation: True = tanh GELU, False = quick GELU.
        post_ln: Whether ``v.post_ln.weight/bias`` exist.
        name: ``general.name``.
    """

    image_size: int
    patch_size: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_embd_text: int
    eps: float = 1e-6
    image_mean: tuple[float, float, float] = _HALF
    image_std: tuple[float, float, float] = _HALF
    use_gelu: bool = False
    post_ln: bool = False
    name: str = "edge-vlm-mmproj"

    def __post_init__(self) -> None:
        for f in ("image_size", "patch_size", "n_embd", "n_ff", "n_layer", "n_head", "n_embd_text"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be positive, got {getattr(self, f)}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size {self.patch_size} must divide image_size {self.image_size}"
            )
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head {self.n_head} must divide n_embd {self.n_embd}")
        if self.n_ff == self.n_embd:
            raise ValueError("n_ff must differ from n_embd (clip.cpp would swap ffn_up/ffn_down)")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need 3 values each")

    @property
    def n_patches(self) -> int:
        """Patches per image (no class token)."""
        return (self.image_size // self.patch_size) ** 2

    def _tower_shapes(
        self, *, attn_bias: bool, ffn_bias: bool, patch_bias: bool, pre_ln: bool
    ) -> dict[str, Shape]:
        e, p = self.n_embd, self.patch_size
        shapes: dict[str, Shape] = {
            "v.patch_embd.weight": (e, 3, p, p),
            "v.position_embd.weight": (self.n_patches, e),
        }
        if patch_bias:
            shapes["v.patch_embd.bias"] = (e,)
        if pre_ln:
            shapes |= {"v.pre_ln.weight": (e,), "v.pre_ln.bias": (e,)}
        for i in range(self.n_layer):
            b = f"v.blk.{i}."
            shapes |= {b + "ln1.weight": (e,), b + "ln1.bias": (e,)}
            for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
                shapes[b + proj + ".weight"] = (e, e)
                if attn_bias:
                    shapes[b + proj + ".bias"] = (e,)
            shapes |= {b + "ln2.weight": (e,), b + "ln2.bias": (e,)}
            shapes[b + "ffn_up.weight"] = (self.n_ff, e)
            shapes[b + "ffn_down.weight"] = (e, self.n_ff)
            if ffn_bias:
                shapes[b + "ffn_up.bias"] = (self.n_ff,)
                shapes[b + "ffn_down.bias"] = (e,)
        if self.post_ln:
            shapes |= {"v.post_ln.weight": (e,), "v.post_ln.bias": (e,)}
        return shapes

    def _start(self, path: str | os.PathLike[str], projector: str, dtype: _DType) -> GGUFWriter:
        w = GGUFWriter(path)
        w.add_string("general.architecture", "clip")
        w.add_string("general.name", self.name)
        w.add_uint32(
            "general.file_type", FileType.MOSTLY_F16 if dtype == "F16" else FileType.ALL_F32
        )
        w.add_bool("clip.has_vision_encoder", True)
        w.add_string("clip.projector_type", projector)
        # clip.cpp reads these with gguf_get_val_u32/f32, which abort on any other type.
        w.add_uint32("clip.vision.image_size", self.image_size)
        w.add_uint32("clip.vision.patch_size", self.patch_size)
        w.add_uint32("clip.vision.embedding_length", self.n_embd)
        w.add_uint32("clip.vision.feed_forward_length", self.n_ff)
        w.add_uint32("clip.vision.block_count", self.n_layer)
        w.add_uint32("clip.vision.attention.head_count", self.n_head)
        w.add_float32("clip.vision.attention.layer_norm_epsilon", self.eps)
        w.add_uint32("clip.vision.projection_dim", self.n_embd_text)
        w.add_array("clip.vision.image_mean", list(self.image_mean), GGUFValueType.FLOAT32)
        w.add_array("clip.vision.image_std", list(self.image_std), GGUFValueType.FLOAT32)
        w.add_bool("clip.use_gelu", self.use_gelu)
        return w


def _add_tensors(
    w: GGUFWriter,
    shapes: Mapping[str, Shape],
    weights: Mapping[str, np.ndarray],
    dtype: _DType,
    f32_names: set[str],
) -> None:
    for name in shapes:
        arr = weights[name]
        w.add_tensor(name, arr, "F32" if arr.ndim == 1 or name in f32_names else dtype)


@dataclass(frozen=True, kw_only=True)
class MLPProjectorSpec(VisionSpec):
    """A LLaVA-style mmproj: ViT, then ``mm.0`` → GELU (tanh) → ``mm.2``.

    Without ``feature_layer`` llama.cpp runs only the first ``n_layer - 1`` blocks (LLaVA's
    second-to-last-layer convention); ``feature_layer=n_layer`` runs all of them. Either
    way ``post_ln`` (if present) follows the last block run, then the projector.

    Attributes:
        n_mm_hidden: Width of ``mm.0``'s output (default ``n_embd_text``).
        feature_layer: Written as ``clip.vision.feature_layer = [k]`` when set (1..n_layer).
        pre_ln: Whether ``v.pre_ln.weight/bias`` exist.
        patch_bias: Whether ``v.patch_embd.bias`` exists.
        attn_bias: Whether the attention projections have biases.
        ffn_bias: Whether the vision MLP has biases.
    """

    eps: float = 1e-5
    n_mm_hidden: int | None = None
    feature_layer: int | None = None
    pre_ln: bool = False
    patch_bias: bool = False
    attn_bias: bool = True
    ffn_bias: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feature_layer is not None and not 1 <= self.feature_layer <= self.n_layer:
            raise ValueError(f"feature_layer {self.feature_layer} must be in 1..{self.n_layer}")
        if self.n_mm_hidden is not None and self.n_mm_hidden <= 0:
            raise ValueError(f"n_mm_hidden must be positive, got {self.n_mm_hidden}")

    def tensor_shapes(self) -> dict[str, Shape]:
        """Every tensor the file holds, with its PyTorch-layout shape."""
        hidden = self.n_mm_hidden or self.n_embd_text
        shapes = self._tower_shapes(
            attn_bias=self.attn_bias,
            ffn_bias=self.ffn_bias,
            patch_bias=self.patch_bias,
            pre_ln=self.pre_ln,
        )
        return shapes | {
            "mm.0.weight": (hidden, self.n_embd),
            "mm.0.bias": (hidden,),
            "mm.2.weight": (self.n_embd_text, hidden),
            "mm.2.bias": (self.n_embd_text,),
        }


def write_mlp_mmproj(
    path: str | os.PathLike[str],
    spec: MLPProjectorSpec,
    weights: Mapping[str, np.ndarray],
    dtype: _DType = "F16",
) -> Path:
    """Write an ``mlp`` (LLaVA) mmproj.

    Matrices and the patch convolution are written in ``dtype``; position embeddings,
    norms and biases in F32. Names: see :meth:`MLPProjectorSpec.tensor_shapes`.

    Args:
        path: Destination ``.gguf`` (written atomically).
        spec: Hyper-parameters.
        weights: Tensor name to numpy array, PyTorch layout.
        dtype: ``"F16"`` or ``"F32"``.

    Returns:
        The path written.

    Raises:
        ValueError: A tensor is missing, unexpected or mis-shaped (nothing is written).
    """
    shapes = spec.tensor_shapes()
    check_weights(shapes, weights, what=f"mlp mmproj {os.fspath(path)!r}")
    w = spec._start(path, "mlp", dtype)
    if spec.feature_layer is not None:
        w.add_array("clip.vision.feature_layer", [spec.feature_layer], GGUFValueType.INT32)
    _add_tensors(w, shapes, weights, dtype, {"v.position_embd.weight"})
    return w.write()


@dataclass(frozen=True, kw_only=True)
class Idefics3ProjectorSpec(VisionSpec):
    """A SmolVLM-style mmproj: SigLIP ViT, pixel shuffle, ``mm.model.fc`` (no bias).

    Defaults are SigLIP-B/16 at 512 px as in SmolVLM-256M/500M; only ``n_embd_text`` is
    required.

    Attributes:
        scale_factor: Pixel-shuffle factor (``clip.vision.projector.scale_factor``); must
            divide the patch grid side. Absent in a file, llama.cpp uses 1 silently.
        preproc_image_size: Longest image edge before tiling
            (``clip.vision.preproc_image_size``).
    """

    image_size: int = 512
    patch_size: int = 16
    n_embd: int = 768
    n_ff: int = 3072
    n_layer: int = 12
    n_head: int = 12
    use_gelu: bool = True
    post_ln: bool = True
    scale_factor: int = 4
    preproc_image_size: int = 2048

    def __post_init__(self) -> None:
        super().__post_init__()
        side = self.image_size // self.patch_size
        if self.scale_factor <= 0 or side % self.scale_factor:
            raise ValueError(f"scale_factor {self.scale_factor} must divide the grid side {side}")

    def tensor_shapes(self) -> dict[str, Shape]:
        """Every tensor the file holds, with its PyTorch-layout shape."""
        shapes = self._tower_shapes(attn_bias=True, ffn_bias=True, patch_bias=True, pre_ln=False)
        fc_in = self.n_embd * self.scale_factor**2
        return shapes | {"mm.model.fc.weight": (self.n_embd_text, fc_in)}


def write_idefics3_mmproj(
    path: str | os.PathLike[str],
    spec: Idefics3ProjectorSpec,
    weights: Mapping[str, np.ndarray],
    dtype: _DType = "F16",
) -> Path:
    """Write an ``idefics3`` (SmolVLM) mmproj.

    As the upstream converter does: patch and position embeddings F32, matrices in
    ``dtype``, norms and biases F32.

    Args:
        path: Destination ``.gguf`` (written atomically).
        spec: Hyper-parameters.
        weights: Tensor name to numpy array, PyTorch layout; see
            :meth:`Idefics3ProjectorSpec.tensor_shapes`.
        dtype: ``"F16"`` or ``"F32"``.

    Returns:
        The path written.

    Raises:
        ValueError: A tensor is missing, unexpected or mis-shaped (nothing is written).
    """
    shapes = spec.tensor_shapes()
    check_weights(shapes, weights, what=f"idefics3 mmproj {os.fspath(path)!r}")
    w = spec._start(path, "idefics3", dtype)
    w.add_uint32("clip.vision.projector.scale_factor", spec.scale_factor)
    w.add_uint32("clip.vision.preproc_image_size", spec.preproc_image_size)
    _add_tensors(w, shapes, weights, dtype, {"v.patch_embd.weight", "v.position_embd.weight"})
    return w.write()
