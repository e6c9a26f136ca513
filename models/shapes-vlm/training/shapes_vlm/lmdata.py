"""Batches of the ``lm`` and ``tune`` phases, and the lookup attention supervision.

Conversations are sampled about bank scenes, encoded exactly as libmtmd tokenizes them
(:func:`shapes_vlm.data.encode_conversation`), with the positions the
supervision needs.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np
import torch

from shapes_vlm import data, vocab, world
from shapes_vlm.model import ShapesVLM

QTYPE_WEIGHTS = {
    "shape": 1.0,
    "shapes": 1.5,
    "color": 1.5,
    "count": 1.0,
    "where": 2.0,
    "is_there": 1.5,
    "describe": 2.5,
}


def sample_conversation(
    rng: random.Random, scene: world.Scene, turns: int, qweights: dict[str, float] | None = None
) -> tuple[list[dict], list[world.QA]]:
    system = rng.choice(world.SYSTEM_PROMPTS) if rng.random() < 0.2 else None
    types = [t for t in world.QUESTION_TYPES if t != "shape" or len(scene.shapes) == 1]
    weights = [(qweights or QTYPE_WEIGHTS)[t] for t in types]
    qtypes = rng.choices(types, weights=weights, k=turns)
    return world.conversation(
        rng,
        scene,
        "img",
        turns=turns,
        system=system,
        image_first=rng.random() < 0.85,
        qtypes=qtypes,
    )


LOOKUPS = ("is_there", "color", "where")
"""Question types whose answer depends on finding the named shape in the image."""


class Batch(NamedTuple):
    """One lm batch: tokens, next-token targets, image starts, and the lookup answers.

    ``look_rows``/``look_cols``: sequence and position of each lookup answer's first
    prediction (the ``<|assistant|>`` token); ``look_word``: position of the question's
    shape word; ``look_kind``: the asked shape's index in ``world.SHAPES`` if it is in the
    image, else -1.
    """

    tok: torch.Tensor
    tgt: torch.Tensor
    starts: torch.Tensor
    look_rows: torch.Tensor
    look_cols: torch.Tensor
    look_word: torch.Tensor
    look_kind: torch.Tensor


def lm_batch(
    rng: random.Random,
    bank: data.Bank,
    idx: np.ndarray,
    n_img: int,
    qweights: dict[str, float] | None = None,
) -> Batch:
    seqs, masks, starts = [], [], []
    look: list[tuple[int, int, int, int]] = []
    turns = rng.choices((1, 2, 3, 4), weights=(2, 2, 3, 3))[0]  # one count per batch: less padding
    for b, i in enumerate(idx):
        scene = bank.scenes[i]
        msgs, qas = sample_conversation(rng, scene, turns, qweights)
        ids, mask, st = data.encode_conversation(msgs, n_img)
        seqs.append(ids)
        masks.append(mask)
        starts.append(st[0])
        firsts = [j - 1 for j in range(1, len(mask)) if mask[j] and not mask[j - 1]]
        for col, qa in zip(firsts, qas, strict=True):
            if qa.qtype in LOOKUPS:
                kind = qa.question.rstrip("?").split()[-1]
                word_id = vocab._tok(f" {kind}", False)[-1]
                word = max(j for j in range(col) if ids[j] == word_id)
                present = scene.find(kind) is not None
                look.append((b, col, word, world.SHAPES.index(kind) if present else -1))
    T = max(len(s) for s in seqs)
    tok = torch.zeros(len(seqs), T, dtype=torch.long)
    tgt = torch.full((len(seqs), T), -100, dtype=torch.long)
    for b, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        st = torch.tensor([max(0, x) for x in s])
        tok[b, : len(s)] = st
        # position t predicts token t+1; train only where token t+1 is an answer token.
        mt = torch.tensor(m[1:], dtype=torch.bool)
        tt = st[1:].clone()
        tt[~mt] = -100
        tgt[b, : len(s) - 1] = tt
    lk = torch.tensor(look, dtype=torch.long).reshape(-1, 4)
    return Batch(tok, tgt, torch.tensor(starts), lk[:, 0], lk[:, 1], lk[:, 2], lk[:, 3])


def _attention_nll(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    valid = target.any(-1)  # a present shape that owns no patch is not scored
    if not valid.any():
        return torch.zeros(())
    return -torch.log((p * target).sum(-1)[valid] + 1e-6).mean()


def lookup_attention_loss(
    model: ShapesVLM, batch: Batch, shape_labels: torch.Tensor, layer: int
) -> torch.Tensor:
    """Supervise the two attention hops of a named-shape lookup (head 0 of two blocks).

    1. Block ``layer - 1``, at the question's shape word ("star" in "Is there a star?"):
       attend to that shape's image patches, or to BOS when it is not in the image. The
       query is the word's own embedding, so this is learnable from the first step.
    2. Block ``layer``, at the answer's first prediction (the ``<|assistant|>`` token):
       attend to the shape word, which now carries what was found.

    Without it the text model sits on a plateau for thousands of steps: the answer needs
    the question word and the image to meet in one attention product, and neither alone
    says anything about the answer, so there is no gradient toward the circuit until it
    half exists (measured: named-shape questions stayed at chance through 3,000 lm steps
    and an 800-step tune). Training-only; the exported model is the same architecture.

    Args:
        shape_labels: ``[B, n_patches]`` per-patch class (``2 + shape index`` on objects).
    """
    if len(batch.look_rows) == 0:
        return torch.zeros(())
    rows, word, kind = batch.look_rows, batch.look_word, batch.look_kind
    # Hop 1 (only where the image precedes the word: attention is causal).
    p = model.text.head_attention(layer - 1, 0, rows, word)  # [N, T]
    n_img = shape_labels.shape[1]
    start = batch.starts[rows]
    target = torch.zeros_like(p, dtype=torch.bool)
    absent = kind < 0
    target[absent, 0] = True
    on = (shape_labels[rows] == (2 + kind)[:, None]) & ~absent[:, None]
    target.scatter_(1, start[:, None] + torch.arange(n_img)[None, :], on)
    target[start > word] = False
    hop1 = _attention_nll(p, target)
    # Hop 2.
    p = model.text.head_attention(layer, 0, rows, batch.look_cols)
    target = torch.zeros_like(p, dtype=torch.bool)
    target[torch.arange(len(rows)), word] = True
    return hop1 + _attention_nll(p, target)
