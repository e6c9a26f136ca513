"""Tiny random-weight vision-language models for tests: a few MB, loaded in milliseconds.

The weights are random but seeded, and scaled so the pipeline is observably real: with
greedy decoding two clearly different images give different answers within a few tokens
and the same image gives the same answer. The output layer only scores whole-word tokens
(byte, control and partial-word rows are zero), so answers read as words; a side effect is
that generation never stops by itself, so tests bound it with ``max_tokens``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_vlm.gguf.builders import (
    CHAT_SPECIAL_TOKENS,
    TextModelSpec,
    WeightDType,
    llama_tensor_shapes,
    write_llama_model,
)
from edge_vlm.gguf.projectors import MLPProjectorSpec, write_mlp_mmproj
from edge_vlm.gguf.vocab import SPACE, Vocab, build_spm_vocab

_WORDS = """
a an the this that it is are there what which where how many describe image picture photo
shows show of in on at to and with left right top bottom middle center red green blue yellow
orange purple black white gray pink brown circle square triangle star shape shapes color colors
object objects one two three four five six zero yes no big small large
What Which Where How Describe Is Are There The A
"""
TINY_WORDS: tuple[str, ...] = (*(SPACE + w for w in _WORDS.split()), ".", "?", ",")
"""The words of the tiny vocabulary (each one token, "▁"-prefixed where it follows a space);
the tiny models' output layer scores only these, so answers read as words."""


@dataclass(frozen=True)
class TinyVLMPaths:
    """Files written by :func:`make_tiny_vlm`.

    Attributes:
        model: The ``llama`` language model GGUF.
        mmproj: The ``mlp`` vision projector GGUF.
    """

    model: Path
    mmproj: Path


def tiny_vocab() -> Vocab:
    """The vocabulary of the tiny models: :data:`TINY_WORDS` plus the chat tokens."""
    return build_spm_vocab(TINY_WORDS, CHAT_SPECIAL_TOKENS, newline_tokens=True, eot="<|end|>")


def make_tiny_vlm(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_embd: int = 256,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 512,
    n_ctx: int = 1024,
    image_size: int = 64,
    patch_size: int = 16,
    vision_width: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 4,
    vision_ff: int = 128,
    projection_width: int | None = None,
    dtype: WeightDType = "F16",
    prefix: str = "tiny",
    chat_template: str | None = None,
) -> TinyVLMPaths:
    """Write a seeded random ``llama`` model and a matching ``mlp`` mmproj.

    Args:
        out_dir: Existing directory; files are ``{prefix}-model.gguf`` and
            ``{prefix}-mmproj.gguf``.
        seed: Seed of all weights; the same seed gives byte-identical files.
        n_embd: Language model width (k-quants need multiples of 256).
        n_layer: Language model blocks.
        n_head: Attention heads.
        n_head_kv: Key/value heads.
        n_ff: SwiGLU width.
        n_ctx: Training context (``llama.context_length``).
        image_size: Vision input side in pixels.
        patch_size: Patch side; image tokens per image = ``(image_size / patch_size)**2``.
        vision_width: ViT width.
        vision_layers: ViT blocks (all run: ``feature_layer = vision_layers``).
        vision_heads: ViT heads.
        vision_ff: ViT MLP width (must differ from ``vision_width``).
        projection_width: mmproj output width; default ``n_embd``. Another value gives a
            *mismatched* mmproj that llama.cpp refuses to pair with the model.
        dtype: ``"F16"`` or ``"F32"`` for the matrices.
        prefix: File name prefix.
        chat_template: ``tokenizer.chat_template`` (default: the builders' generic one).

    Returns:
        The two paths.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    vocab = tiny_vocab()
    spec = TextModelSpec(
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        n_ctx=n_ctx,
        name=f"{prefix}-vlm",
    )
    if chat_template:
        spec = dataclasses.replace(spec, chat_template=chat_template)
    weights = _text_weights(rng, spec, vocab)
    model = write_llama_model(out / f"{prefix}-model.gguf", spec, vocab, weights, dtype)

    proj = MLPProjectorSpec(
        image_size=image_size,
        patch_size=patch_size,
        n_embd=vision_width,
        n_ff=vision_ff,
        n_layer=vision_layers,
        n_head=vision_heads,
        n_embd_text=projection_width or n_embd,
        feature_layer=vision_layers,
        post_ln=True,
        patch_bias=True,
        name=f"{prefix}-mmproj",
    )
    mmproj = write_mlp_mmproj(
        out / f"{prefix}-mmproj.gguf", proj, _vision_weights(rng, proj), dtype
    )
    return TinyVLMPaths(model=model, mmproj=mmproj)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _text_weights(
    rng: np.random.Generator, spec: TextModelSpec, vocab: Vocab
) -> dict[str, np.ndarray]:
    weights: dict[str, np.ndarray] = {}
    for name, shape in llama_tensor_shapes(spec, len(vocab)).items():
        if len(shape) == 1:
            weights[name] = np.ones(shape, np.float32)
        else:
            weights[name] = _normal(rng, shape, 1.0 / np.sqrt(shape[1]))
    # Small token embeddings next to large attention outputs: the residual stream of a text
    # position is then dominated by what attention brings from the image positions.
    weights["token_embd.weight"] = _normal(rng, (len(vocab), spec.n_embd), 0.02)
    for i in range(spec.n_layer):
        weights[f"blk.{i}.attn_output.weight"] *= 4.0
    # An untied output layer that only scores whole words: a tied one mostly repeats the
    # last token, and byte/control/partial-word tokens would make unreadable answers.
    out = _normal(rng, (len(vocab), spec.n_embd), 1.0)
    whole_words = set(TINY_WORDS)
    for tid, text in enumerate(vocab.tokens):
        if text not in whole_words:
            out[tid] = 0.0
    weights["output.weight"] = out
    return weights


def _vision_weights(rng: np.random.Generator, spec: MLPProjectorSpec) -> dict[str, np.ndarray]:
    weights: dict[str, np.ndarray] = {}
    for name, shape in spec.tensor_shapes().items():
        if name.endswith((".bias", "ln1.weight", "ln2.weight", "post_ln.weight")):
            weights[name] = (np.ones if name.endswith("weight") else np.zeros)(shape, np.float32)
        elif name == "v.position_embd.weight":
            weights[name] = _normal(rng, shape, 0.02)
        else:
            fan_in = int(np.prod(shape[1:]))
            weights[name] = _normal(rng, shape, 1.0 / np.sqrt(fan_in))
    # Projector gain: image embeddings several times larger than token embeddings.
    weights["mm.2.weight"] *= 4.0
    return weights
