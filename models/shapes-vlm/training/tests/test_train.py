"""The shipped model's trainer: batches and the lookup attention supervision.

Needs PyTorch (the ``train`` extra); skipped without it.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shapes_vlm import data, vocab, world  # noqa: E402
from shapes_vlm.lmdata import LOOKUPS, lm_batch, lookup_attention_loss  # noqa: E402
from shapes_vlm.model import Config, ShapesVLM, apply_rope, init_weights  # noqa: E402


@pytest.fixture(scope="module")
def bank() -> data.Bank:
    return data.make_bank(16, 7, 112, 16, workers=1)


@pytest.fixture(scope="module")
def model() -> ShapesVLM:
    torch.manual_seed(0)
    m = ShapesVLM(Config(n_vocab=len(vocab.shapes_vocab()), n_layer=3))
    init_weights(m)
    return m.eval()


def test_lookup_positions_point_at_the_shape_word_and_the_answer(bank: data.Bank) -> None:
    weights = {t: (1.0 if t in LOOKUPS else 0.0) for t in world.QUESTION_TYPES}
    batch = lm_batch(random.Random(1), bank, np.arange(16), 49, weights)
    voc = vocab.shapes_vocab()
    assert len(batch.look_rows) >= 16  # every turn is a lookup
    for r, col, word, kind in zip(*(t.tolist() for t in (batch.look_rows, batch.look_cols,
                                                          batch.look_word, batch.look_kind)),
                                  strict=True):
        assert batch.tok[r, col] == voc.token_id(vocab.ASSISTANT)
        assert batch.tgt[r, col] != -100  # the answer's first token is predicted there
        name = voc.tokens[int(batch.tok[r, word])].lstrip("▁")
        assert name in world.SHAPES and word < col
        scene = bank.scenes[int(np.arange(16)[r])]
        assert (kind >= 0) == (scene.find(name) is not None)
        if kind >= 0:
            assert world.SHAPES[kind] == name


def test_head_attention_is_the_blocks_own_attention(bank: data.Bank, model: ShapesVLM) -> None:
    batch = lm_batch(random.Random(2), bank, np.arange(8), 49)
    with torch.no_grad():
        feats = model.vision(torch.zeros(8, 3, 112, 112))
        model(batch.tok, feats, batch.starts, keep=(1,))
        rows, cols = batch.look_rows, batch.look_cols
        p = model.text.head_attention(1, 0, rows, cols)
        blk = model.text.blocks[1]
        x = blk.attn_norm(model.text.kept[1])
        b, t, _ = x.shape
        q, k = (m(x).view(b, t, 4, -1).transpose(1, 2) for m in (blk.q, blk.k))
        q, k = (apply_rope(z, model.text.cos[:t], model.text.sin[:t]) for z in (q, k))
        a = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        ref = a.masked_fill(causal, float("-inf")).softmax(-1)[rows, 0, cols]
    assert torch.allclose(p, ref, atol=1e-5)


def test_the_lookup_loss_trains_the_two_hops(bank: data.Bank) -> None:
    """A few steps on the supervision alone lower it: the hops are learnable from scratch."""
    torch.manual_seed(1)
    m = ShapesVLM(Config(n_vocab=len(vocab.shapes_vocab()), n_layer=3))
    init_weights(m)
    weights = {t: (1.0 if t in LOOKUPS else 0.0) for t in world.QUESTION_TYPES}
    batch = lm_batch(random.Random(3), bank, np.arange(16), 49, weights)
    feats = m.vision(torch.zeros(16, 3, 112, 112)).detach() + torch.randn(16, 49, 192)
    labels = torch.from_numpy(bank.labels["shape"][:16])
    opt = torch.optim.Adam(list(m.proj.parameters()) + list(m.text.parameters()), lr=3e-3)
    losses = []
    for _ in range(30):
        m(batch.tok, feats, batch.starts, keep=(0, 1))
        loss = lookup_attention_loss(m, batch, labels, 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_a_larger_patch_starts_where_the_smaller_model_stood(bank: data.Bank) -> None:
    """A 224-px / 32-px-patch encoder initialised from a 112-px / 16-px one computes on a
    224-px image what the small one computes on its 2x2 area average (so the resolution can
    grow without retraining from scratch), and the labels mark the same object patches."""
    from shapes_vlm.model import load_resampled

    torch.manual_seed(2)
    small = ShapesVLM(Config(n_vocab=len(vocab.shapes_vocab()), n_layer=3))
    init_weights(small)
    big = ShapesVLM(Config(n_vocab=len(vocab.shapes_vocab()), n_layer=3, image_size=224,
                           patch_size=32))
    load_resampled(big, small.state_dict())
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        want = small.vision(torch.nn.functional.avg_pool2d(x, 2))
        got = big.vision(x)
    assert got.shape == want.shape == (2, 49, 192)
    assert (got - want).abs().max().item() < 1e-4

    sc, _, lab_small = data.render_example(random.Random(5), 112, 16)
    sc2, img, lab_big = data.render_example(random.Random(5), 224, 32)
    assert sc2 == sc and img.shape == (224, 224, 3)
    assert (lab_big["rank"] >= 0).sum() == pytest.approx((lab_small["rank"] >= 0).sum(), abs=2)

    wrong = ShapesVLM(Config(n_vocab=len(vocab.shapes_vocab()), n_layer=3, patch_size=24))
    with pytest.raises(ValueError, match="cannot resample"):
        load_resampled(wrong, small.state_dict())
