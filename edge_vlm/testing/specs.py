"""Shapes of a language model and of a vision projector, and the tensors each one holds.

A family is a table of these (:mod:`edge_vlm.testing.families`); the tensor lists follow
what llama.cpp's loaders create for each text architecture (``src/models/*.cpp``) and what
libmtmd's graphs use for each projector (``tools/mtmd/clip.cpp``, ``tools/mtmd/models``).
Tensor names come from gguf-py's ``TENSOR_NAMES`` so they cannot drift from llama.cpp's.
Shapes are PyTorch layout (``[out, in]``); the writer reverses them into ggml order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeAlias

from edge_vlm.testing._gguf import require_gguf

Shape: TypeAlias = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class TextSpec:
    """A decoder-only language model.

    Attributes:
        arch: llama.cpp architecture (``llama``, ``qwen2``, ``qwen2vl``, ``qwen3vl``,
            ``gemma3``, ``lfm2``, ``phi2``).
        n_embd: Hidden width.
        n_layer: Blocks.
        n_head: Attention heads.
        n_head_kv: Key/value heads.
        n_ff: Feed-forward width.
        n_ctx: Training context length.
        head_dim: Per-head width (default ``n_embd // n_head``).
        rope_theta: RoPE base.
        rms_eps: RMSNorm epsilon (LayerNorm epsilon for ``phi2``).
        rope_sections: M-RoPE sections (Qwen-VL: temporal, height, width, extra).
        sliding_window: Gemma 3's local-attention window (0: none).
        conv_layers: LFM2's short-convolution blocks (the others are attention).
        tied_output: No ``output.weight`` (the output layer is the token embedding).
    """

    arch: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int = 4096
    head_dim: int = 0
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    rope_sections: tuple[int, ...] = ()
    sliding_window: int = 0
    conv_layers: tuple[int, ...] = ()
    tied_output: bool = False

    @property
    def d_head(self) -> int:
        """Per-head width."""
        return self.head_dim or self.n_embd // self.n_head

    def tensor_shapes(self, n_vocab: int) -> dict[str, Shape]:
        """Every tensor of the model, in file order."""
        g = require_gguf()
        T, names = g.MODEL_TENSOR, g.TENSOR_NAMES
        e, hd = self.n_embd, self.d_head
        q, kv = self.n_head * hd, self.n_head_kv * hd
        out_norm = T.TOKEN_EMBD_NORM if self.arch == "lfm2" else T.OUTPUT_NORM
        shapes: dict[str, Shape] = {
            names[T.TOKEN_EMBD] + ".weight": (n_vocab, e),
            names[out_norm] + ".weight": (e,),
        }
        if not self.tied_output:
            shapes[names[T.OUTPUT] + ".weight"] = (n_vocab, e)

        def blk(t: Any, i: int, suffix: str, shape: Shape) -> None:
            shapes[names[t].format(bid=i) + "." + suffix] = shape

        if self.arch == "phi2":  # LayerNorm with biases, biased output layer
            shapes[names[out_norm] + ".bias"] = (e,)
            if not self.tied_output:
                shapes[names[T.OUTPUT] + ".bias"] = (n_vocab,)
        for i in range(self.n_layer):
            blk(T.ATTN_NORM, i, "weight", (e,))
            if self.arch == "phi2":
                blk(T.ATTN_NORM, i, "bias", (e,))
            if i in self.conv_layers:
                blk(T.SHORTCONV_CONV, i, "weight", (e, 3))
                blk(T.SHORTCONV_INPROJ, i, "weight", (3 * e, e))
                blk(T.SHORTCONV_OUTPROJ, i, "weight", (e, e))
            else:
                blk(T.ATTN_Q, i, "weight", (q, e))
                blk(T.ATTN_K, i, "weight", (kv, e))
                blk(T.ATTN_V, i, "weight", (kv, e))
                if self.arch in ("qwen2", "qwen2vl", "phi2"):
                    blk(T.ATTN_Q, i, "bias", (q,))
                    blk(T.ATTN_K, i, "bias", (kv,))
                    blk(T.ATTN_V, i, "bias", (kv,))
                blk(T.ATTN_OUT, i, "weight", (e, q))
                if self.arch == "phi2":
                    blk(T.ATTN_OUT, i, "bias", (e,))
                if self.arch in ("qwen3vl", "gemma3", "lfm2"):
                    blk(T.ATTN_Q_NORM, i, "weight", (hd,))
                    blk(T.ATTN_K_NORM, i, "weight", (hd,))
                if self.arch == "gemma3":
                    blk(T.ATTN_POST_NORM, i, "weight", (e,))
            if self.arch == "phi2":  # attention and MLP in parallel off one norm; GELU MLP
                blk(T.FFN_DOWN, i, "weight", (e, self.n_ff))
                blk(T.FFN_DOWN, i, "bias", (e,))
                blk(T.FFN_UP, i, "weight", (self.n_ff, e))
                blk(T.FFN_UP, i, "bias", (self.n_ff,))
                continue
            blk(T.FFN_NORM, i, "weight", (e,))
            blk(T.FFN_GATE, i, "weight", (self.n_ff, e))
            blk(T.FFN_UP, i, "weight", (self.n_ff, e))
            blk(T.FFN_DOWN, i, "weight", (e, self.n_ff))
            if self.arch == "gemma3":
                blk(T.FFN_POST_NORM, i, "weight", (e,))
        return shapes

    def add_keys(self, w: Any, n_vocab: int) -> None:
        """Add the architecture's hyper-parameter keys to a ``gguf.GGUFWriter``."""
        w.add_vocab_size(n_vocab)
        w.add_context_length(self.n_ctx)
        w.add_embedding_length(self.n_embd)
        w.add_block_count(self.n_layer)
        w.add_feed_forward_length(self.n_ff)
        w.add_head_count(self.n_head)
        if self.conv_layers:  # LFM2: a block without key/value heads is a convolution
            w.add_head_count_kv(
                [0 if i in self.conv_layers else self.n_head_kv for i in range(self.n_layer)]
            )
            w.add_shortconv_l_cache(3)
        else:
            w.add_head_count_kv(self.n_head_kv)
        if self.arch == "phi2":
            w.add_layer_norm_eps(self.rms_eps)
            w.add_rope_dimension_count(self.d_head // 2)  # partial rotary, as Phi-2
        else:
            w.add_layer_norm_rms_eps(self.rms_eps)
        w.add_rope_freq_base(self.rope_theta)
        if self.head_dim:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        if self.arch == "llama":
            w.add_rope_dimension_count(self.d_head)
        if self.rope_sections:
            w.add_rope_dimension_sections(list(self.rope_sections))
        if self.sliding_window:
            w.add_sliding_window(self.sliding_window)
        if self.arch == "qwen3vl":
            w.add_uint32(f"{self.arch}.n_deepstack_layers", 0)


@dataclass(frozen=True, kw_only=True)
class VisionSpec:
    """A vision encoder and its projector (an ``mmproj`` file).

    Attributes:
        projector: libmtmd projector type (gguf-py ``VisionProjectorType`` value).
        image_size: Encoder input side (fixed-size projectors) or reference size.
        patch_size: Patch side in pixels.
        n_embd: Encoder width.
        n_ff: Encoder MLP width (must differ from ``n_embd``).
        n_layer: Encoder blocks.
        n_head: Encoder heads.
        n_embd_text: The language model's width (the projector's output).
        merge: Spatial merge / pixel-shuffle / pooling factor written for the projector.
        eps: Norm epsilon.
        image_mean: Per-channel mean.
        image_std: Per-channel std.
        preproc_image_size: idefics3: longest edge before tiling.
        max_tiles: internvl: most tiles.
    """

    projector: str
    image_size: int
    patch_size: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_embd_text: int
    merge: int = 1
    eps: float = 1e-6
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    preproc_image_size: int = 0
    max_tiles: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_ff == self.n_embd:
            raise ValueError("n_ff must differ from n_embd (clip.cpp would swap ffn_up/down)")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head {self.n_head} must divide n_embd {self.n_embd}")

    @property
    def grid(self) -> int:
        """Patches per side of one ``image_size`` image."""
        return self.image_size // self.patch_size

    def _layout(self) -> dict[str, bool]:
        p = self.projector
        return {
            # (clip.cpp asserts a patch bias is absent for qwen2/2.5-vl and present for 3-vl)
            "patch_bias": p not in ("qwen2.5vl_merger", "pixtral"),
            "second_patch": p in ("qwen2.5vl_merger", "qwen3vl_merger"),
            "pos_embd": p not in ("qwen2.5vl_merger", "pixtral"),
            "cls": p == "internvl",
            "norm_bias": p not in ("qwen2.5vl_merger", "pixtral"),
            "attn_bias": p != "pixtral",
            "qkv_fused": p == "qwen3vl_merger",
            "gated_ffn": p in ("qwen2.5vl_merger", "pixtral"),
            "ffn_bias": p != "pixtral",
            "pre_ln": p == "pixtral",
            "post_ln": p in ("idefics3", "gemma3", "mlp", "lfm2"),
        }

    def tensor_shapes(self) -> dict[str, Shape]:
        """Every tensor of the mmproj, in file order."""
        g = require_gguf()
        T, names = g.MODEL_TENSOR, g.TENSOR_NAMES
        lay = self._layout()
        e, p, f = self.n_embd, self.patch_size, self.n_ff
        shapes: dict[str, Shape] = {}

        def add(t: Any, suffix: str, shape: Shape, i: int | None = None) -> None:
            name = names[t] if i is None else names[t].format(bid=i)
            shapes[name + ("." + suffix if suffix else "")] = shape

        add(T.V_ENC_EMBD_PATCH, "weight", (e, 3, p, p))
        if lay["second_patch"]:  # Qwen-VL's temporal patch: a second kernel, ".weight.1"
            shapes[names[T.V_ENC_EMBD_PATCH] + ".weight.1"] = (e, 3, p, p)
        if lay["patch_bias"]:
            add(T.V_ENC_EMBD_PATCH, "bias", (e,))
        if lay["cls"]:
            add(T.V_ENC_EMBD_CLS, "", (e,))
        if lay["pos_embd"]:
            add(T.V_ENC_EMBD_POS, "weight", (self.grid**2 + int(lay["cls"]), e))
        if lay["pre_ln"]:
            add(T.V_PRE_NORM, "weight", (e,))
        for i in range(self.n_layer):
            add(T.V_ENC_INPUT_NORM, "weight", (e,), i)
            if lay["norm_bias"]:
                add(T.V_ENC_INPUT_NORM, "bias", (e,), i)
            if lay["qkv_fused"]:
                add(T.V_ENC_ATTN_QKV, "weight", (3 * e, e), i)
                add(T.V_ENC_ATTN_QKV, "bias", (3 * e,), i)
            else:
                for t in (T.V_ENC_ATTN_Q, T.V_ENC_ATTN_K, T.V_ENC_ATTN_V):
                    add(t, "weight", (e, e), i)
                    if lay["attn_bias"]:
                        add(t, "bias", (e,), i)
            add(T.V_ENC_ATTN_O, "weight", (e, e), i)
            if lay["attn_bias"]:
                add(T.V_ENC_ATTN_O, "bias", (e,), i)
            add(T.V_ENC_POST_ATTN_NORM, "weight", (e,), i)
            if lay["norm_bias"]:
                add(T.V_ENC_POST_ATTN_NORM, "bias", (e,), i)
            add(T.V_ENC_FFN_UP, "weight", (f, e), i)
            if lay["ffn_bias"]:
                add(T.V_ENC_FFN_UP, "bias", (f,), i)
            if lay["gated_ffn"]:
                add(T.V_ENC_FFN_GATE, "weight", (f, e), i)
                if lay["ffn_bias"]:
                    add(T.V_ENC_FFN_GATE, "bias", (f,), i)
            add(T.V_ENC_FFN_DOWN, "weight", (e, f), i)
            if lay["ffn_bias"]:
                add(T.V_ENC_FFN_DOWN, "bias", (e,), i)
        if lay["post_ln"]:
            add(T.V_POST_NORM, "weight", (e,))
            add(T.V_POST_NORM, "bias", (e,))
        shapes |= self._projector_shapes(T, names)
        return shapes

    def _projector_shapes(self, T: Any, names: Any) -> dict[str, Shape]:
        e, out, m = self.n_embd, self.n_embd_text, self.merge
        mm = names[T.V_MMPROJ]
        proj = self.projector
        if proj == "mlp":
            return {mm.format(bid=0) + ".weight": (out, e), mm.format(bid=0) + ".bias": (out,),
                    mm.format(bid=2) + ".weight": (out, out), mm.format(bid=2) + ".bias": (out,)}
        if proj == "idefics3":
            return {names[T.V_MMPROJ_FC] + ".weight": (out, e * m * m)}
        if proj in ("qwen2.5vl_merger", "qwen3vl_merger"):
            hidden = e * 4
            return {mm.format(bid=0) + ".weight": (hidden, hidden),
                    mm.format(bid=0) + ".bias": (hidden,),
                    mm.format(bid=2) + ".weight": (out, hidden),
                    mm.format(bid=2) + ".bias": (out,)}
        if proj == "gemma3":
            # used transposed by the graph: stored [n_embd_vision, n_embd_text] in ggml order
            return {names[T.V_MM_INP_PROJ] + ".weight": (e, out),
                    names[T.V_MM_SOFT_EMB_NORM] + ".weight": (e,)}
        if proj == "internvl":
            mlp = names[T.V_MMPROJ_MLP]
            wide = e * m * m
            return {mlp.format(bid=0) + ".weight": (wide,), mlp.format(bid=0) + ".bias": (wide,),
                    mlp.format(bid=1) + ".weight": (out, wide),
                    mlp.format(bid=1) + ".bias": (out,),
                    mlp.format(bid=3) + ".weight": (out, out),
                    mlp.format(bid=3) + ".bias": (out,)}
        if proj == "lfm2":
            wide = e * m * m
            norm = names[T.V_MM_INP_NORM]
            return {norm + ".weight": (wide,), norm + ".bias": (wide,),
                    mm.format(bid=1) + ".weight": (out, wide),
                    mm.format(bid=1) + ".bias": (out,),
                    mm.format(bid=2) + ".weight": (out, out),
                    mm.format(bid=2) + ".bias": (out,)}
        if proj == "pixtral":
            return {mm.format(bid=1) + ".weight": (out, e), mm.format(bid=1) + ".bias": (out,),
                    mm.format(bid=2) + ".weight": (out, out),
                    mm.format(bid=2) + ".bias": (out,),
                    names[T.V_TOK_EMBD_IMG_BREAK]: (out,)}
        raise ValueError(f"no tensor table for projector {proj!r}")

    def add_keys(self, w: Any) -> None:
        """Add the ``clip.*`` keys to a ``gguf.GGUFWriter``."""
        g = require_gguf()
        K = g.Keys
        w.add_bool(K.Clip.HAS_VISION_ENCODER, True)
        w.add_string(K.Clip.PROJECTOR_TYPE, self.projector)
        cv = K.ClipVision
        w.add_uint32(cv.IMAGE_SIZE, self.image_size)
        w.add_uint32(cv.PATCH_SIZE, self.patch_size)
        w.add_uint32(cv.EMBEDDING_LENGTH, self.n_embd)
        w.add_uint32(cv.FEED_FORWARD_LENGTH, self.n_ff)
        w.add_uint32(cv.BLOCK_COUNT, self.n_layer)
        w.add_uint32(cv.Attention.HEAD_COUNT, self.n_head)
        w.add_float32(cv.Attention.LAYERNORM_EPS, self.eps)
        w.add_uint32(cv.PROJECTION_DIM, self.n_embd_text)
        w.add_array(cv.IMAGE_MEAN, list(self.image_mean))
        w.add_array(cv.IMAGE_STD, list(self.image_std))
        lay = self._layout()
        if lay["gated_ffn"]:
            w.add_bool(cv.USE_SILU, True)
        else:  # CLIP (LLaVA) uses quick GELU, SigLIP and the others tanh GELU
            w.add_bool(cv.USE_GELU, self.projector != "mlp")
        proj = self.projector
        if proj in ("qwen2.5vl_merger", "qwen3vl_merger", "pixtral"):
            w.add_uint32(cv.SPATIAL_MERGE_SIZE, self.merge)
        elif self.merge > 1:
            w.add_uint32(cv.Projector.SCALE_FACTOR, self.merge)
        if proj == "mlp":
            w.add_array("clip.vision.feature_layer", [self.n_layer])
        if proj == "qwen2.5vl_merger":
            # full attention every n-th block, window attention in the others
            w.add_uint32(cv.N_WA_PATTERN, self.extra.get("n_wa_pattern", 2))
        if self.preproc_image_size:
            w.add_uint32(cv.PREPROC_IMAGE_SIZE, self.preproc_image_size)
        if self.max_tiles:
            w.add_uint32(cv.PREPROC_MIN_TILES, 1)
            w.add_uint32(cv.PREPROC_MAX_TILES, self.max_tiles)
