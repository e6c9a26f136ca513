"""Write llama.cpp-loadable GGUF files: a ``llama`` text model and its mmproj.

Each writer checks the weights against its spec *before* writing: llama.cpp aborts or
crashes (SIGSEGV for a missing mmproj tensor) on files that are only slightly wrong, so a
file that reaches disk is complete and consistently shaped.

Weights are numpy arrays in PyTorch layout (``[out, in]`` for linear layers,
``[out_ch, in_ch, kh, kw]`` for the patch convolution); see :mod:`edge_vlm.gguf.writer`.
The mmproj writers live in :mod:`edge_vlm.gguf.projectors` and are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

import numpy as np

from edge_vlm.gguf.constants import FileType, GGUFValueType
from edge_vlm.gguf.projectors import (
    Idefics3ProjectorSpec,
    MLPProjectorSpec,
    write_idefics3_mmproj,
    write_mlp_mmproj,
)
from edge_vlm.gguf.shapes import Shape, check_weights
from edge_vlm.gguf.vocab import Vocab
from edge_vlm.gguf.writer import GGUFWriter

__all__ = [
    "CHAT_SPECIAL_TOKENS",
    "DEFAULT_CHAT_TEMPLATE",
    "Idefics3ProjectorSpec",
    "MLPProjectorSpec",
    "TextModelSpec",
    "WeightDType",
    "llama_tensor_shapes",
    "write_idefics3_mmproj",
    "write_llama_model",
    "write_mlp_mmproj",
]

WeightDType: TypeAlias = Literal["F16", "F32"]

CHAT_SPECIAL_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
"""The control tokens :data:`DEFAULT_CHAT_TEMPLATE` prints; put them in the vocabulary."""

# No newlines around the role tokens, on purpose: llama.cpp's SPM tokenizer prefixes a space
# to text that follows a special token, so "<|user|>What" tokenizes as <|user|> "▁What" and
# every word keeps its single "▁word" token. With "<|user|>\nWhat", "What" would follow a
# newline instead of a "▁" and fall apart into characters.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""Chat template: ``<|user|>text<|end|>`` per message, then ``<|assistant|>``. Content may
be a string or a list of ``{"type": "text", "text": ...}`` parts (image parts arrive as text
parts holding llama.cpp's ``<__media__>`` marker). No BOS: libmtmd adds it."""


@dataclass(frozen=True)
class TextModelSpec:
    """Hyper-parameters of a ``llama``-architecture language model.

    The vocabulary size is not part of the spec: it is ``len(vocab)`` at write time.

    Attributes:
        n_embd: Hidden width.
        n_layer: Number of transformer blocks.
        n_head: Attention heads (``n_embd`` must be divisible by it; head size even).
        n_head_kv: Key/value heads (GQA); must divide ``n_head``.
        n_ff: SwiGLU hidden width.
        n_ctx: Training context length (``llama.context_length``).
        rms_eps: RMSNorm epsilon.
        rope_theta: RoPE frequency base.
        name: ``general.name``.
        chat_template: ``tokenizer.chat_template`` (Jinja).
    """

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int = 2048
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    name: str = "edge-vlm"
    chat_template: str = DEFAULT_CHAT_TEMPLATE

    def __post_init__(self) -> None:
        for field_name in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_ctx"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"{field_name} must be positive, got {getattr(self, field_name)}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd {self.n_embd} / n_head {self.n_head} must be an even integer")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head_kv {self.n_head_kv} must divide n_head {self.n_head}")
        if not self.chat_template:
            raise ValueError("chat_template is required (llama-cpp-python refuses models without)")

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.n_embd // self.n_head


def llama_tensor_shapes(spec: TextModelSpec, n_vocab: int) -> dict[str, Shape]:
    """The tensors :func:`write_llama_model` requires, with their PyTorch-layout shapes.

    ``output.weight`` (``[n_vocab, n_embd]``) is optional and not listed.
    """
    e, kv = spec.n_embd, spec.n_head_kv * spec.head_dim
    shapes: dict[str, Shape] = {"token_embd.weight": (n_vocab, e), "output_norm.weight": (e,)}
    for i in range(spec.n_layer):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_norm.weight": (e,),
            b + "attn_q.weight": (e, e),
            b + "attn_k.weight": (kv, e),
            b + "attn_v.weight": (kv, e),
            b + "attn_output.weight": (e, e),
            b + "ffn_norm.weight": (e,),
            b + "ffn_gate.weight": (spec.n_ff, e),
            b + "ffn_up.weight": (spec.n_ff, e),
            b + "ffn_down.weight": (e, spec.n_ff),
        }
    return shapes


def write_llama_model(
    path: str | os.PathLike[str],
    spec: TextModelSpec,
    vocab: Vocab,
    weights: Mapping[str, np.ndarray],
    dtype: WeightDType = "F16",
) -> Path:
    """Write a ``llama``-architecture GGUF language model.

    Tensor names (PyTorch layout ``[out, in]``): ``token_embd.weight [n_vocab, n_embd]``;
    per block ``blk.N.attn_norm.weight``, ``blk.N.attn_q/attn_k/attn_v/attn_output.weight``,
    ``blk.N.ffn_norm.weight``, ``blk.N.ffn_gate/ffn_up/ffn_down.weight``;
    ``output_norm.weight``; optional ``output.weight [n_vocab, n_embd]`` (absent: tied to
    ``token_embd``). Norm vectors are always written F32, matrices in ``dtype``.

    RoPE layout: llama.cpp runs the ``llama`` architecture with ``LLAMA_ROPE_TYPE_NORM``,
    which rotates *adjacent* pairs (dims 2i, 2i+1) of each head. Hugging Face's converter
    permutes q/k rows because HF Llama rotates the two *halves* of a head (NEOX layout).
    Weights from a model trained with the adjacent-pair layout are written here as they
    are, without any permutation; weights from an HF-layout model must be permuted first.

    Args:
        path: Destination ``.gguf`` file (written atomically).
        spec: Hyper-parameters.
        vocab: The SPM vocabulary; ``n_vocab = len(vocab)``.
        weights: Tensor name to numpy array.
        dtype: ``"F16"`` or ``"F32"`` for the matrices.

    Returns:
        The path written.

    Raises:
        ValueError: A tensor is missing, unexpected or mis-shaped (nothing is written).
    """
    expected = llama_tensor_shapes(spec, len(vocab))
    check_weights(
        expected, weights, optional={"output.weight": (len(vocab), spec.n_embd)}, what="llama model"
    )
    w = GGUFWriter(path)
    arch = "llama"
    w.add_string("general.architecture", arch)
    w.add_string("general.name", spec.name)
    w.add_uint32("general.file_type", FileType.MOSTLY_F16 if dtype == "F16" else FileType.ALL_F32)
    w.add_uint32(f"{arch}.vocab_size", len(vocab))
    w.add_uint32(f"{arch}.context_length", spec.n_ctx)
    w.add_uint32(f"{arch}.embedding_length", spec.n_embd)
    w.add_uint32(f"{arch}.block_count", spec.n_layer)
    w.add_uint32(f"{arch}.feed_forward_length", spec.n_ff)
    w.add_uint32(f"{arch}.attention.head_count", spec.n_head)
    w.add_uint32(f"{arch}.attention.head_count_kv", spec.n_head_kv)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", spec.rms_eps)
    w.add_float32(f"{arch}.rope.freq_base", spec.rope_theta)
    w.add_uint32(f"{arch}.rope.dimension_count", spec.head_dim)
    add_tokenizer(w, vocab)
    w.add_string("tokenizer.chat_template", spec.chat_template)
    names = [*expected, *(["output.weight"] if "output.weight" in weights else [])]
    for name in names:
        arr = weights[name]
        w.add_tensor(name, arr, "F32" if arr.ndim == 1 else dtype)
    return w.write()


def add_tokenizer(w: GGUFWriter, vocab: Vocab) -> None:
    """Add the ``tokenizer.ggml.*`` keys of an SPM vocabulary to ``w``."""
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", vocab.tokens, GGUFValueType.STRING)
    w.add_array("tokenizer.ggml.scores", vocab.scores, GGUFValueType.FLOAT32)
    w.add_array("tokenizer.ggml.token_type", vocab.token_types, GGUFValueType.INT32)
    w.add_uint32("tokenizer.ggml.bos_token_id", vocab.bos_id)
    w.add_uint32("tokenizer.ggml.eos_token_id", vocab.eos_id)
    w.add_uint32("tokenizer.ggml.unknown_token_id", vocab.unk_id)
    if vocab.pad_id is not None:
        w.add_uint32("tokenizer.ggml.padding_token_id", vocab.pad_id)
    if vocab.eot_id is not None:
        w.add_uint32("tokenizer.ggml.eot_token_id", vocab.eot_id)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    w.add_bool("tokenizer.ggml.add_space_prefix", vocab.add_space_prefix)
