"""Write random-weight "shape-alike" models for benchmarking: exact shapes, metadata and
token layout of a real vision-language model, seeded random weights.

Speed depends on shapes, not on weight values, and real weights cannot be downloaded on
the build machines. ::

    python benchmarks/make_models.py --like smolvlm-256m --quant Q8_0 \\
        --out benchmarks/models/smolvlm-256m-Q8_0

writes ``DIR/model.gguf`` (the language model: written F16, then quantized) and
``DIR/mmproj.gguf`` (SigLIP-B/16 + ``idefics3`` projector, F16 matrices as the upstream
converter writes them).

What is copied from SmolVLM-256M/500M-Instruct:

- text: ``llama`` architecture, widths/blocks/heads/KV heads/FFN as in the issue, RMS eps
  1e-5, RoPE base 100000, context 8192, tied output (no ``output.weight``), vocabulary
  of 49152 tokens including every token libmtmd's idefics3 path looks up
  (``<fake_token_around_image>``, ``<global-img>``, ``<row_R_col_C>`` for R, C in 1..6,
  ``"\\n"``, ``"\\n\\n"``) and SmolVLM's chat tokens and chat template;
- vision: SigLIP-B/16 at 512 px (768 wide, 12 blocks, 12 heads, FFN 3072, eps 1e-6,
  tanh GELU, post-LN), pixel-shuffle scale factor 4 (64 tokens per 512-px tile), longest
  edge 2048 before tiling (16 tiles + 1 overview for any image that is not tiny).

What differs, on purpose: the tokenizer is SentencePiece-style (the real one is a GPT-2
BPE; tokenization cost is negligible next to the model), and the embedding rows of the
special, control and byte tokens are zero. The output layer is tied to the embeddings, so
those tokens always score 0 while ~49k random rows compete for the maximum: greedy decoding
never picks an end-of-generation token and every system generates exactly ``max_tokens``
(llama-cpp-python's ``MTMDChatHandler`` has no ``ignore_eos``; this makes all three systems
comparable without it).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_vlm.gguf.builders import TextModelSpec, llama_tensor_shapes, write_llama_model
from edge_vlm.gguf.constants import TokenType
from edge_vlm.gguf.projectors import Idefics3ProjectorSpec, write_idefics3_mmproj
from edge_vlm.gguf.vocab import SPACE, Vocab, build_spm_vocab

#: SmolVLM-Instruct's chat template (``chat_template.json`` of the HF checkpoints).
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

#: Special tokens of SmolVLM's tokenizer that matter here: chat control tokens, then the
#: image tokens libmtmd's idefics3 path looks up (a missing one silently becomes -1).
SMOLVLM_SPECIAL_TOKENS: dict[str, TokenType] = {
    "<|endoftext|>": TokenType.CONTROL,
    "<|im_start|>": TokenType.CONTROL,
    "<|im_end|>": TokenType.CONTROL,
    "<end_of_utterance>": TokenType.USER_DEFINED,
    "<fake_token_around_image>": TokenType.USER_DEFINED,
    "<image>": TokenType.USER_DEFINED,
    "<global-img>": TokenType.USER_DEFINED,
    **{f"<row_{r}_col_{c}>": TokenType.USER_DEFINED for r in range(1, 7) for c in range(1, 7)},
}

N_VOCAB = 49152


@dataclass(frozen=True)
class Preset:
    """The shapes of one model family member."""

    text: TextModelSpec
    vision: Idefics3ProjectorSpec
    n_vocab: int = N_VOCAB


def _smolvlm(name: str, n_embd: int, n_layer: int, n_head: int, n_head_kv: int,
             n_ff: int) -> Preset:
    text = TextModelSpec(
        n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
        n_ctx=8192, rms_eps=1e-5, rope_theta=100000.0, name=f"{name} (random weights)",
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    vision = Idefics3ProjectorSpec(n_embd_text=n_embd, name=f"{name} mmproj (random weights)")
    return Preset(text, vision)


PRESETS: dict[str, Preset] = {
    "smolvlm-256m": _smolvlm("SmolVLM-256M-Instruct shape-alike", 576, 30, 9, 3, 1536),
    "smolvlm-500m": _smolvlm("SmolVLM-500M-Instruct shape-alike", 960, 32, 15, 5, 2560),
    # For developing and testing the suite: the same idefics3 tiling and token layout,
    # tiny towers (seconds for a whole suite run).
    "tiny-idefics3": Preset(
        TextModelSpec(n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=256, n_ctx=8192,
                      name="tiny idefics3 shape-alike", chat_template=SMOLVLM_CHAT_TEMPLATE),
        Idefics3ProjectorSpec(n_embd_text=128, n_embd=64, n_ff=128, n_layer=1, n_head=4,
                              name="tiny idefics3 mmproj"),
        n_vocab=4096,
    ),
}

QUANTS = ("F16", "Q8_0", "Q4_0", "Q4_K")


def smolvlm_vocab(n_vocab: int = N_VOCAB) -> Vocab:
    """A SentencePiece-style vocabulary of exactly ``n_vocab`` tokens with SmolVLM's specials.

    Filler words are every lowercase string in breadth-first order (``▁a``, ..., ``▁zz``,
    ...): each word's prefixes come before it, so each adds exactly one token.
    """
    letters = "abcdefghijklmnopqrstuvwxyz"
    base = build_spm_vocab([], SMOLVLM_SPECIAL_TOKENS, chars=letters, newline_tokens=True,
                           eot="<end_of_utterance>")
    need = n_vocab - len(base)
    if need < 0:
        raise ValueError(f"n_vocab {n_vocab} is smaller than the {len(base)} fixed tokens")
    words: list[str] = []
    level = [SPACE + c for c in letters]
    while len(words) < need:
        words.extend(level[: need - len(words)])
        level = [w + c for w in level for c in letters]
    vocab = build_spm_vocab(words, SMOLVLM_SPECIAL_TOKENS, chars=letters, newline_tokens=True,
                            eot="<end_of_utterance>")
    if len(vocab) != n_vocab:
        raise AssertionError(f"built {len(vocab)} tokens, wanted {n_vocab}")
    # SmolVLM-Instruct ends its turns with <end_of_utterance>: make it the EOS too.
    return dataclasses.replace(vocab, eos_id=vocab.token_id("<end_of_utterance>"))


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    out = rng.standard_normal(shape, dtype=np.float32)
    out *= std
    return out


def text_weights(rng: np.random.Generator, spec: TextModelSpec,
                 vocab: Vocab) -> dict[str, np.ndarray]:
    """Random weights for a ``llama`` model with a tied output layer (see the module doc)."""
    weights: dict[str, np.ndarray] = {}
    for name, shape in llama_tensor_shapes(spec, len(vocab)).items():
        if len(shape) == 1:
            weights[name] = np.ones(shape, np.float32)
        else:
            weights[name] = _normal(rng, shape, 1.0 / np.sqrt(shape[1])).astype(np.float16)
    emb = _normal(rng, (len(vocab), spec.n_embd), 0.02)
    zero = [i for i, t in enumerate(vocab.token_types) if t != TokenType.NORMAL]
    emb[zero] = 0.0  # never the argmax: no end of generation, no control or byte tokens
    weights["token_embd.weight"] = emb.astype(np.float16)
    return weights


def vision_weights(rng: np.random.Generator,
                   spec: Idefics3ProjectorSpec) -> dict[str, np.ndarray]:
    """Random SigLIP + idefics3 projector weights (norm weights 1, biases 0)."""
    weights: dict[str, np.ndarray] = {}
    for name, shape in spec.tensor_shapes().items():
        if len(shape) == 1:
            weights[name] = (np.ones if name.endswith(".weight") else np.zeros)(shape, np.float32)
        elif name == "v.position_embd.weight":
            weights[name] = _normal(rng, shape, 0.02)
        else:
            fan_in = int(np.prod(shape[1:]))
            weights[name] = _normal(rng, shape, 1.0 / np.sqrt(fan_in))
    return weights


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
    """Write ``out/model.gguf`` and ``out/mmproj.gguf``; returns their paths."""
    preset = PRESETS[like]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        if log:
            print(f"[{time.perf_counter() - t0:5.1f}s] {msg}", flush=True)

    rng = np.random.default_rng(seed)
    vocab = smolvlm_vocab(preset.n_vocab)
    say(f"vocabulary: {len(vocab)} tokens")
    weights = text_weights(rng, preset.text, vocab)
    model = out / "model.gguf"
    if quant == "F16":
        write_llama_model(model, preset.text, vocab, weights, "F16")
    else:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            f16 = Path(tmp) / "model-f16.gguf"
            write_llama_model(f16, preset.text, vocab, weights, "F16")
            say(f"text model F16: {f16.stat().st_size / 1e6:.1f} MB; quantizing to {quant}")
            del weights
            quantize(f16, model, quant)
    say(f"text model {quant}: {model.stat().st_size / 1e6:.1f} MB -> {model}")
    mmproj = write_idefics3_mmproj(out / "mmproj.gguf", preset.vision,
                                   vision_weights(rng, preset.vision), "F16")
    say(f"mmproj F16: {mmproj.stat().st_size / 1e6:.1f} MB -> {mmproj}")
    return model, mmproj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Write a random-weight model pair with a real VLM's exact shapes.")
    ap.add_argument("--like", required=True, choices=sorted(PRESETS))
    ap.add_argument("--quant", default="Q8_0", choices=QUANTS,
                    help="text model type (Q4_K: Q4_K_M; tensors whose rows are not a "
                         "multiple of 256 fall back to other types, as llama.cpp decides)")
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    make_models(args.like, args.quant, args.out, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
