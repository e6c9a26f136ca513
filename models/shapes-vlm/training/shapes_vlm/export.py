"""Export a ``shapes-vlm`` checkpoint to GGUF, with the ``gguf`` library (llama.cpp's own).

``python -m shapes_vlm.export --ckpt checkpoints/run1/last.pt --out models/shapes-vlm/``
writes ``model-f16.gguf`` and ``mmproj-f16.gguf`` (matrices F16, norms and biases F32), then
``model-q8_0.gguf`` and ``model-q4_k_m.gguf`` through llama.cpp's quantizer. ``--f32`` writes
``model-f32.gguf`` / ``mmproj-f32.gguf`` instead (for parity checks; not shipped).

The language model is a ``llama``-architecture GGUF; the mmproj an ``mlp`` (LLaVA-style)
projector for libmtmd. Weights are written in PyTorch layout (``[out, in]``): GGUF records
the shape reversed (ggml's ``ne``), so the bytes go out unchanged. The model was trained
with llama.cpp's adjacent-pair RoPE (``LLAMA_ROPE_TYPE_NORM``), so q/k are not permuted.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch

from shapes_vlm import vocab
from shapes_vlm.model import Config, ShapesVLM

WeightDType = Literal["F16", "F32"]


def load_checkpoint(path: str | Path) -> ShapesVLM:
    """Load a training checkpoint into a :class:`ShapesVLM` in eval mode."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    model = ShapesVLM(Config(**ck["config"]))
    model.load_state_dict(ck["model"])
    return model.eval()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def text_weights(m: ShapesVLM) -> dict[str, np.ndarray]:
    t = m.text
    w = {"token_embd.weight": _np(t.embed.weight), "output_norm.weight": _np(t.norm.weight)}
    for i, b in enumerate(t.blocks):
        p = f"blk.{i}."
        w |= {
            p + "attn_norm.weight": _np(b.attn_norm.weight),
            p + "attn_q.weight": _np(b.q.weight),
            p + "attn_k.weight": _np(b.k.weight),
            p + "attn_v.weight": _np(b.v.weight),
            p + "attn_output.weight": _np(b.o.weight),
            p + "ffn_norm.weight": _np(b.ffn_norm.weight),
            p + "ffn_gate.weight": _np(b.gate.weight),
            p + "ffn_up.weight": _np(b.up.weight),
            p + "ffn_down.weight": _np(b.down.weight),
        }
    return w


def mmproj_weights(m: ShapesVLM) -> dict[str, np.ndarray]:
    v = m.vision
    w = {
        "v.patch_embd.weight": _np(v.patch.weight),
        "v.patch_embd.bias": _np(v.patch.bias),
        "v.position_embd.weight": _np(v.pos),
        "v.post_ln.weight": _np(v.post_ln.weight),
        "v.post_ln.bias": _np(v.post_ln.bias),
        "mm.0.weight": _np(m.proj.mm0.weight),
        "mm.0.bias": _np(m.proj.mm0.bias),
        "mm.2.weight": _np(m.proj.mm2.weight),
        "mm.2.bias": _np(m.proj.mm2.bias),
    }
    for i, b in enumerate(v.blocks):
        p = f"v.blk.{i}."
        for name, mod in (
            ("ln1", b.ln1),
            ("ln2", b.ln2),
            ("attn_q", b.q),
            ("attn_k", b.k),
            ("attn_v", b.v),
            ("attn_out", b.o),
            ("ffn_up", b.up),
            ("ffn_down", b.down),
        ):
            w[p + name + ".weight"] = _np(mod.weight)
            w[p + name + ".bias"] = _np(mod.bias)
    return w


def text_shapes(c: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the language model with its PyTorch-layout shape."""
    e = c.n_embd
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (c.n_vocab, e),
                                          "output_norm.weight": (e,)}
    for i in range(c.n_layer):
        p = f"blk.{i}."
        shapes |= {p + "attn_norm.weight": (e,), p + "ffn_norm.weight": (e,)}
        shapes |= {p + f"attn_{x}.weight": (e, e) for x in ("q", "k", "v", "output")}
        shapes |= {p + "ffn_gate.weight": (c.n_ff, e), p + "ffn_up.weight": (c.n_ff, e),
                   p + "ffn_down.weight": (e, c.n_ff)}
    return shapes


def mmproj_shapes(c: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the mmproj with its PyTorch-layout shape."""
    e, p = c.v_embd, c.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "v.patch_embd.weight": (e, 3, p, p), "v.patch_embd.bias": (e,),
        "v.position_embd.weight": (c.n_patches, e),
        "v.post_ln.weight": (e,), "v.post_ln.bias": (e,),
        "mm.0.weight": (c.n_embd, e), "mm.0.bias": (c.n_embd,),
        "mm.2.weight": (c.n_embd, c.n_embd), "mm.2.bias": (c.n_embd,),
    }
    for i in range(c.v_layer):
        b = f"v.blk.{i}."
        for name in ("ln1", "ln2"):
            shapes |= {b + name + ".weight": (e,), b + name + ".bias": (e,)}
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            shapes |= {b + name + ".weight": (e, e), b + name + ".bias": (e,)}
        shapes |= {b + "ffn_up.weight": (c.v_ff, e), b + "ffn_up.bias": (c.v_ff,),
                   b + "ffn_down.weight": (e, c.v_ff), b + "ffn_down.bias": (e,)}
    return shapes


def _check(weights: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]],
           what: str) -> None:
    """Refuse to write an incomplete or mis-shaped file: llama.cpp aborts (or, for a
    missing mmproj tensor, crashes) on one."""
    missing = sorted(set(shapes) - set(weights))
    extra = sorted(set(weights) - set(shapes))
    wrong = sorted(f"{n} {weights[n].shape} (want {s})" for n, s in shapes.items()
                   if n in weights and tuple(weights[n].shape) != s)
    if missing or extra or wrong:
        raise ValueError(f"{what}: missing {missing}, unexpected {extra}, mis-shaped {wrong}")


def _write(writer: gguf.GGUFWriter, path: Path, weights: Mapping[str, np.ndarray],
           dtype: WeightDType, f32_names: frozenset[str] = frozenset()) -> Path:
    """Add the tensors (vectors and ``f32_names`` in F32, matrices in ``dtype``) and write
    the file atomically (a temporary file renamed into place)."""
    for name, arr in weights.items():
        keep_f32 = dtype == "F32" or arr.ndim == 1 or name in f32_names
        writer.add_tensor(name, arr.astype(np.float32 if keep_f32 else np.float16))
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _file_type(dtype: WeightDType) -> int:
    return int(gguf.LlamaFileType.MOSTLY_F16 if dtype == "F16" else gguf.LlamaFileType.ALL_F32)


def write_text_model(model: ShapesVLM, path: Path, dtype: WeightDType = "F16") -> Path:
    """The language model as a ``llama`` GGUF, with the shapes vocabulary and template."""
    c = model.c
    weights = text_weights(model)
    _check(weights, text_shapes(c), f"language model {path}")
    v = vocab.shapes_vocab()
    w = gguf.GGUFWriter(None, "llama")
    w.add_name("shapes-vlm")
    w.add_file_type(_file_type(dtype))
    w.add_vocab_size(len(v))
    w.add_context_length(2048)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.n_ff)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_head)
    w.add_layer_norm_rms_eps(c.rms_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.n_embd // c.n_head)
    w.add_tokenizer_model("llama")
    w.add_token_list(list(v.tokens))
    w.add_token_scores(list(v.scores))
    w.add_token_types(list(v.token_types))
    w.add_bos_token_id(v.bos_id)
    w.add_eos_token_id(v.eos_id)
    w.add_unk_token_id(v.unk_id)
    if v.pad_id is not None:
        w.add_pad_token_id(v.pad_id)
    if v.eot_id is not None:
        w.add_eot_token_id(v.eot_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(v.add_space_prefix)
    w.add_chat_template(vocab.CHAT_TEMPLATE)
    return _write(w, path, weights, dtype)


def write_mmproj(model: ShapesVLM, path: Path, dtype: WeightDType = "F16") -> Path:
    """The vision encoder and projector as an ``mlp`` mmproj GGUF for libmtmd."""
    c = model.c
    weights = mmproj_weights(model)
    _check(weights, mmproj_shapes(c), f"mmproj {path}")
    w = gguf.GGUFWriter(None, "clip")
    w.add_name("shapes-vlm-mmproj")
    w.add_file_type(_file_type(dtype))
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "mlp")
    # clip.cpp reads these with gguf_get_val_u32/f32, which abort on any other type.
    for key, value in (("image_size", c.image_size), ("patch_size", c.patch_size),
                       ("embedding_length", c.v_embd), ("feed_forward_length", c.v_ff),
                       ("block_count", c.v_layer), ("attention.head_count", c.v_head),
                       ("projection_dim", c.n_embd)):
        w.add_uint32(f"clip.vision.{key}", value)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", c.v_eps)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    w.add_bool("clip.use_gelu", False)  # quick GELU in the vision MLP
    # Every block runs (without it llama.cpp would stop one block early, as for LLaVA).
    w.add_array("clip.vision.feature_layer", [c.v_layer])
    return _write(w, path, weights, dtype, frozenset({"v.position_embd.weight"}))


def quantize(src: Path, dst: Path, qtype: str) -> None:
    """Quantize through the runtime (``edge_vlm.backend.quantize_model``, llama.cpp's)."""
    from edge_vlm.backend import quantize_model

    quantize_model(src, dst, qtype)


def export(
    model: ShapesVLM, out: Path, *, f32: bool = False, quants: tuple[str, ...] = ("Q8_0", "Q4_K_M")
) -> dict[str, Path]:
    """Write the GGUF files of ``model`` into ``out``; returns them by kind."""
    out.mkdir(parents=True, exist_ok=True)
    dtype: WeightDType = "F32" if f32 else "F16"
    suffix = dtype.lower()
    files = {
        "model": write_text_model(model, out / f"model-{suffix}.gguf", dtype),
        "mmproj": write_mmproj(model, out / f"mmproj-{suffix}.gguf", dtype),
    }
    for q in quants:
        dst = out / f"model-{q.lower()}.gguf"
        quantize(files["model"], dst, q)
        files[q] = dst
    return files


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--f32", action="store_true", help="write F32 files (parity checks)")
    p.add_argument("--no-quant", action="store_true")
    args = p.parse_args(argv)
    model = load_checkpoint(args.ckpt)
    files = export(
        model,
        args.out,
        f32=args.f32,
        quants=() if (args.no_quant or args.f32) else ("Q8_0", "Q4_K_M"),
    )
    for k, f in files.items():
        print(f"{k}: {f} ({f.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
