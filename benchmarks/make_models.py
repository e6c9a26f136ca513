"""Write random-weight "shape-alike" models: a real VLM's exact shapes, metadata and token
layout, seeded random weights (speed depends on shapes, not on weight values, and real
weights cannot be downloaded on the build machines). Written by ``edge_vlm.testing``
(gguf-py's ``GGUFWriter``). ::

    python benchmarks/make_models.py --list
    python benchmarks/make_models.py --like qwen2.5-vl --tiny --out DIR      # a few MB
    python benchmarks/make_models.py --like smolvlm-256m --quant Q8_0 --out DIR

``DIR/model.gguf`` is the language model (full size: written F16, then quantized by
llama.cpp), ``DIR/mmproj.gguf`` the vision encoder and projector (F16 matrices, as the
upstream converters write them).

Full-size presets copy the text and vision shapes of SmolVLM-256M/500M-Instruct,
Qwen2.5-VL-3B-Instruct and Gemma-3-4B-it, with the family's image tokens, chat tokens and
chat template (see ``edge_vlm/testing/families.py``). What differs on purpose: the
tokenizer is SentencePiece-style with filler words up to the real vocabulary size, and
the output layer is tied to embeddings whose special, control and byte rows are zero, so
greedy decoding never ends early and every system generates exactly ``max_tokens``.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import sys
import tempfile
import time
from pathlib import Path

from edge_vlm.testing import FAMILIES, FULL_SIZE, tiny_pair, write_pair

QUANTS = ("F16", "Q8_0", "Q4_0", "Q4_K")


def quantize(src: Path, dst: Path, quant: str) -> None:
    """Quantize a language model with llama.cpp (through edge-vlm where it knows the type)."""
    from edge_vlm.backend import QUANT_TYPES, quantize_model

    qtype = "Q4_K_M" if quant == "Q4_K" else quant
    if qtype in QUANT_TYPES:
        quantize_model(src, dst, qtype)
        return
    import llama_cpp  # Q4_0 is not in edge-vlm's list (yet)

    ftypes = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}
    tmp = dst.with_name(dst.name + ".part")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[qtype]
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {src} to {qtype} (error {rc})")
    tmp.replace(dst)


def make_models(like: str, quant: str, out: Path, *, seed: int = 0,
                log: bool = True) -> tuple[Path, Path]:
    """Write ``out/model.gguf`` and ``out/mmproj.gguf`` for a full-size preset."""
    fam, n_vocab = FULL_SIZE[like]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        if log:
            print(f"[{time.perf_counter() - t0:5.1f}s] {msg}", flush=True)

    model, mmproj = out / "model.gguf", out / "mmproj.gguf"
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        f16, proj = write_pair(fam, tmp, seed=seed, n_vocab=n_vocab)
        say(f"{like}: text model F16 {f16.stat().st_size / 1e6:.1f} MB, "
            f"mmproj {proj.stat().st_size / 1e6:.1f} MB")
        if quant == "F16":
            shutil.move(f16, model)
        else:
            say(f"quantizing the text model to {quant}")
            quantize(f16, model, quant)
        shutil.move(proj, mmproj)
    say(f"text model {quant}: {model.stat().st_size / 1e6:.1f} MB -> {model}")
    say(f"mmproj F16: {mmproj.stat().st_size / 1e6:.1f} MB -> {mmproj}")
    return model, mmproj


def listing() -> str:
    """The names ``--like`` accepts, with what each is."""
    lines = ["tiny pairs (--like NAME --tiny):"]
    lines += [f"  {name:14} {fam.projector:18} {fam.text.arch:8} {fam.note}"
              for name, fam in FAMILIES.items()]
    lines.append("full-size shape-alikes (--like NAME [--quant Q]):")
    for name, (fam, n_vocab) in FULL_SIZE.items():
        t = fam.text
        lines.append(f"  {name:14} {fam.projector:18} {t.arch:8} {t.n_layer} blocks x "
                     f"{t.n_embd}, vocabulary {n_vocab}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Write a random-weight model pair with a real VLM's exact shapes.")
    ap.add_argument("--list", action="store_true", help="print the family and preset names")
    ap.add_argument("--like", help="family (with --tiny) or full-size preset name")
    ap.add_argument("--tiny", action="store_true", help="a tiny pair of the family (a few MB)")
    ap.add_argument("--quant", default="Q8_0", choices=QUANTS,
                    help="full size: text model type (Q4_K: Q4_K_M; tensors whose rows are "
                         "not a multiple of 256 fall back to other types, as llama.cpp "
                         "decides)")
    ap.add_argument("--out", type=Path, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.list:
        print(listing())
        return 0
    if not args.like or not args.out:
        ap.error("give --list, or --like NAME and --out DIR")
    if args.tiny:
        if args.like not in FAMILIES:
            ap.error(f"--tiny: unknown family {args.like!r}; choose from {', '.join(FAMILIES)}")
        args.out.mkdir(parents=True, exist_ok=True)
        model, mmproj = tiny_pair(args.like, args.out, seed=args.seed)
        print(f"{model}\n{mmproj}")
        return 0
    if args.like not in FULL_SIZE:
        ap.error(f"unknown preset {args.like!r}; choose from {', '.join(FULL_SIZE)} "
                 "(or a family with --tiny)")
    make_models(args.like, args.quant, args.out, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
