"""Writing a family's model pair with gguf-py's ``GGUFWriter`` (seeded random weights).

Tensors are generated one at a time while the file is written (a full-size 3B model never
sits in memory as float32), into a temporary file renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_vlm.gguf.constants import TokenType
from edge_vlm.gguf.vocab import SPACE, Vocab, build_spm_vocab
from edge_vlm.testing._gguf import require_gguf
from edge_vlm.testing.families import Family
from edge_vlm.testing.specs import Shape, TextSpec, VisionSpec

_LETTERS = "abcdefghijklmnopqrstuvwxyz"

_WORDS = """
a an the this that it is are there what which where how many describe image picture photo
shows show of in on at to and with left right top bottom middle center red green blue yellow
orange purple black white gray pink brown circle square triangle star shape shapes color colors
object objects one two three four five six zero yes no big small large
What Which Where How Describe Is Are There The A
"""
TINY_WORDS: tuple[str, ...] = (*(SPACE + w for w in _WORDS.split()), ".", "?", ",")
"""The words of the tiny vocabulary (each one token, "▁"-prefixed where it follows a space);
a tiny pair's output layer scores only these, so answers read as words."""


def family_vocab(fam: Family, n_vocab: int | None = None) -> Vocab:
    """The family's vocabulary: tiny words (or filler words up to ``n_vocab``) plus its
    special tokens, with BOS/EOS/EOT set to the family's."""
    words: list[str] = list(TINY_WORDS)
    if n_vocab is not None:
        base = build_spm_vocab(words, fam.special_tokens, chars=_LETTERS, newline_tokens=True)
        need = n_vocab - len(base)
        if need < 0:
            raise ValueError(f"n_vocab {n_vocab} is smaller than the {len(base)} fixed tokens")
        known = set(base.tokens)
        extra: list[str] = []
        # every lowercase word in breadth-first order ("▁a" ... "▁zz" ...): each word's
        # prefixes come before it, so each adds exactly one token
        for length in itertools.count(1):
            for letters in itertools.product(_LETTERS, repeat=length):
                word = SPACE + "".join(letters)
                if word not in known:
                    extra.append(word)
                    if len(extra) == need:
                        break
            if len(extra) == need:
                break
        words += extra[:need]
    vocab = build_spm_vocab(words, fam.special_tokens, chars=_LETTERS if n_vocab else (),
                            newline_tokens=True)
    return dataclasses.replace(vocab, bos_id=vocab.token_id(fam.bos),
                               eos_id=vocab.token_id(fam.eos),
                               eot_id=vocab.token_id(fam.eot) if fam.eot else None)


def _normal(rng: np.random.Generator, shape: Shape, std: float) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _text_arrays(rng: np.random.Generator, spec: TextSpec, vocab: Vocab,
                 tiny: bool) -> Iterator[tuple[str, np.ndarray]]:
    """The text model's tensors in file order.

    Tiny: small token embeddings and strong attention outputs (image positions dominate
    what follows them), and an untied output layer that scores only whole words (answers
    read as words; generation never stops by itself). Full size: a tied output layer with
    zero rows for every non-word token, so greedy decoding never ends early and always
    emits visible text; tensors are
    drawn one at a time in float32 (a 3B model never sits in memory).
    """
    shapes = spec.tensor_shapes(len(vocab))
    if not tiny:
        # never the argmax: control, byte and whitespace-only tokens (a stream of spaces
        # arrives as nothing, and benchmarks time the text as it arrives)
        special = [i for i, (t, text) in enumerate(zip(vocab.token_types, vocab.tokens,
                                                       strict=True))
                   if t != TokenType.NORMAL or not text.strip(SPACE + " \n")]
        for name, shape in shapes.items():
            if len(shape) == 1:
                yield name, (np.zeros if name.endswith(".bias") else np.ones)(shape, np.float32)
                continue
            std = 0.02 if name == "token_embd.weight" else 1.0 / np.sqrt(shape[-1])
            arr = rng.standard_normal(shape, dtype=np.float32)
            arr *= std
            if name == "token_embd.weight":
                arr[special] = 0.0
            yield name, arr
        return
    arrays: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name == "output.weight":
            continue
        if len(shape) == 1:
            arrays[name] = (np.zeros if name.endswith(".bias") else np.ones)(shape, np.float32)
        elif "shortconv.conv" in name:
            arrays[name] = _normal(rng, shape, 0.5)
        else:
            arrays[name] = _normal(rng, shape, 1.0 / np.sqrt(shape[-1]))
    n_vocab = len(vocab)
    arrays["token_embd.weight"] = _normal(rng, (n_vocab, spec.n_embd), 0.02)
    for name in arrays:
        if name.endswith("attn_output.weight"):
            arrays[name] *= 4.0
    for name in shapes:
        if name == "output.weight":
            out = _normal(rng, (n_vocab, spec.n_embd), 1.0)
            words = set(TINY_WORDS)
            out[[i for i, t in enumerate(vocab.tokens) if t not in words]] = 0.0
            yield name, out
        else:
            yield name, arrays.pop(name)


def _vision_arrays(rng: np.random.Generator,
                   spec: VisionSpec) -> Iterator[tuple[str, np.ndarray]]:
    for name, shape in spec.tensor_shapes().items():
        if len(shape) == 1 and not name.startswith(("v.class_embd", "v.token_embd")):
            fill = np.zeros if name.endswith(".bias") else np.ones
            yield name, fill(shape, np.float32)
        elif name.startswith(("v.position_embd", "v.class_embd", "v.token_embd")):
            yield name, _normal(rng, shape, 0.02)
        else:
            arr = _normal(rng, shape, 1.0 / np.sqrt(int(np.prod(shape[1:]))))
            if name in ("mm.2.weight", "mm.model.mlp.3.weight", "mm.input_projection.weight"):
                arr *= 4.0  # projector gain: image embeddings larger than token embeddings
            yield name, arr


def _f32_names(projector: str) -> tuple[str, ...]:
    # As the upstream converters write them: embeddings the graph adds, not multiplies.
    if projector == "idefics3":
        return ("v.patch_embd.weight", "v.position_embd.weight")
    return ("v.position_embd.weight", "v.class_embd", "v.token_embd.img_break")


def _write(path: Path, arch: str, keys: Callable[[Any], None],
           arrays: Callable[[], Iterator[tuple[str, np.ndarray]]],
           shapes: dict[str, Shape], f32: tuple[str, ...]) -> Path:
    """Stream tensors into ``path`` atomically: header from ``shapes``, then data.

    Matrices are F16; vectors and names ending in one of ``f32`` are F32 (llama.cpp's
    convolution kernels and the embeddings the graph adds need F32).
    """
    g = require_gguf()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        w = g.GGUFWriter(tmp, arch)
        keys(w)

        def dtype(name: str, shape: Shape) -> type:
            return np.float32 if len(shape) == 1 or name.endswith(f32) else np.float16

        for name, shape in shapes.items():
            dt = np.dtype(dtype(name, shape))
            w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, arr in arrays():
            w.write_tensor_data(np.ascontiguousarray(arr, dtype=dtype(name, shapes[name])))
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_text_model(path: Path, fam: Family, vocab: Vocab, *, rng: np.random.Generator,
                     tiny: bool) -> Path:
    """Write the family's language model (weights drawn from ``rng``)."""
    g = require_gguf()
    spec = fam.text

    def keys(w: Any) -> None:
        w.add_name(f"{fam.name} shape-alike (random weights)")
        w.add_file_type(g.LlamaFileType.MOSTLY_F16)
        spec.add_keys(w, len(vocab))
        w.add_tokenizer_model("llama")
        w.add_token_list(vocab.tokens)
        w.add_token_scores(vocab.scores)
        w.add_token_types(vocab.token_types)
        w.add_bos_token_id(vocab.bos_id)
        w.add_eos_token_id(vocab.eos_id)
        w.add_unk_token_id(vocab.unk_id)
        if vocab.eot_id is not None:
            w.add_eot_token_id(vocab.eot_id)
        w.add_add_bos_token(fam.add_bos)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(vocab.add_space_prefix)
        w.add_chat_template(fam.chat_template)

    return _write(path, spec.arch, keys, lambda: _text_arrays(rng, spec, vocab, tiny),
                  spec.tensor_shapes(len(vocab)), ("shortconv.conv.weight",))


def write_mmproj(path: Path, fam: Family, *, rng: np.random.Generator) -> Path:
    """Write the family's mmproj (vision encoder + projector; weights drawn from ``rng``)."""
    g = require_gguf()
    spec = fam.vision

    def keys(w: Any) -> None:
        w.add_name(f"{fam.name} mmproj shape-alike (random weights)")
        w.add_file_type(g.LlamaFileType.MOSTLY_F16)
        spec.add_keys(w)

    return _write(path, "clip", keys, lambda: _vision_arrays(rng, spec),
                  spec.tensor_shapes(), _f32_names(spec.projector))
