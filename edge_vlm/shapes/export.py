"""Export a ``shapes-vlm`` checkpoint to GGUF.

``python -m edge_vlm.shapes.export --ckpt checkpoints/run1/last.pt --out models/shapes-vlm/``
writes ``model-f16.gguf`` and ``mmproj-f16.gguf`` (matrices F16, norms and biases F32), then
``model-q8_0.gguf`` and ``model-q4_k_m.gguf`` through llama.cpp's quantizer. ``--f32`` writes
``model-f32.gguf`` / ``mmproj-f32.gguf`` instead (for parity checks; not shipped).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from edge_vlm.gguf.builders import TextModelSpec, write_llama_model
from edge_vlm.gguf.projectors import MLPProjectorSpec, write_mlp_mmproj
from edge_vlm.shapes import vocab as V
from edge_vlm.shapes.model import Config, ShapesVLM


def load_checkpoint(path: str | Path) -> ShapesVLM:
    """Load a training checkpoint into a :class:`ShapesVLM` in eval mode."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    model = ShapesVLM(Config(**ck["config"]))
    model.load_state_dict(ck["model"])
    return model.eval()


def specs(c: Config) -> tuple[TextModelSpec, MLPProjectorSpec]:
    text = TextModelSpec(
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_head_kv=c.n_head,
        n_ff=c.n_ff,
        n_ctx=2048,
        rms_eps=c.rms_eps,
        rope_theta=c.rope_theta,
        name="shapes-vlm",
        chat_template=V.CHAT_TEMPLATE,
    )
    vision = MLPProjectorSpec(
        image_size=c.image_size,
        patch_size=c.patch_size,
        n_embd=c.v_embd,
        n_ff=c.v_ff,
        n_layer=c.v_layer,
        n_head=c.v_head,
        n_embd_text=c.n_embd,
        eps=c.v_eps,
        post_ln=True,
        feature_layer=c.v_layer,
        patch_bias=True,
        name="shapes-vlm-mmproj",
    )
    return text, vision


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


def quantize(src: Path, dst: Path, qtype: str) -> None:
    """Quantize through the runtime (``edge_vlm.backend.quantize_model``)."""
    from edge_vlm.backend import quantize_model

    quantize_model(src, dst, qtype)


def export(
    model: ShapesVLM, out: Path, *, f32: bool = False, quants: tuple[str, ...] = ("Q8_0", "Q4_K_M")
) -> dict[str, Path]:
    """Write the GGUF files of ``model`` into ``out``; returns them by kind."""
    out.mkdir(parents=True, exist_ok=True)
    tspec, vspec = specs(model.c)
    dtype: Literal["F16", "F32"] = "F32" if f32 else "F16"
    suffix = dtype.lower()
    files = {
        "model": write_llama_model(
            out / f"model-{suffix}.gguf", tspec, V.shapes_vocab(), text_weights(model), dtype
        ),
        "mmproj": write_mlp_mmproj(
            out / f"mmproj-{suffix}.gguf", vspec, mmproj_weights(model), dtype
        ),
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
