"""Training data for ``shapes-vlm`` (numpy + Pillow, no torch).

* :func:`letterbox`: the image preprocessing the runtime + clip.cpp apply (Pillow downscale
  so the longest side is at most ``image_size``, then clip.cpp's ``PAD_CEIL`` letterbox:
  Pillow-style bicubic resize to fit, centred on the (122, 116, 104) pad colour).
* :func:`make_bank`: a bank of pre-rendered, letterboxed scenes with dense per-patch labels
  (rendering with Pillow once is much cheaper than rendering every training step).
* :func:`encode_conversation`: the exact token sequence libmtmd builds for a conversation,
  with the loss mask (assistant answers and their ``<|end|>``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from shapes_vlm import render, vocab, world

PAD_COLOR = (122, 116, 104)
"""clip.cpp's letterbox colour for ``mlp`` projectors."""


def fit_size(w: int, h: int, s: int) -> tuple[int, int]:
    """Size after the runtime's downscale (longest side ``s``, aspect kept)."""
    if max(w, h) <= s:
        return w, h
    k = s / max(w, h)
    return max(1, round(w * k)), max(1, round(h * k))


def letterbox(img: Image.Image, s: int) -> Image.Image:
    """Return the ``s``x``s`` image clip.cpp encodes for ``img`` (see module docstring)."""
    img = img.convert("RGB")
    w, h = fit_size(img.width, img.height, s)
    if (w, h) != img.size:  # edge_vlm.images._downscale
        img = img.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if img.size == (s, s):
        return img
    scale = min(s / w, s / h)
    nw, nh = min(math.ceil(w * scale), s), min(math.ceil(h * scale), s)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (s, s), PAD_COLOR)
    canvas.paste(img, ((s - nw) // 2, (s - nh) // 2))
    return canvas


def pixels(img: Image.Image) -> np.ndarray:
    """Letterboxed uint8 image → float32 CHW with clip.cpp's ``(x/255 - 0.5)/0.5``."""
    a = np.asarray(img, dtype=np.float32) / 255.0
    return ((a - 0.5) / 0.5).transpose(2, 0, 1).copy()


# ---------------------------------------------------------------------------------------
# The bank


def _labels(scene: world.Scene, s: int, p: int, w: int, h: int) -> dict[str, np.ndarray]:
    """Dense per-patch labels for a scene shown letterboxed at ``(w, h)`` in ``s``x``s``."""
    ox, oy = (s - w) // 2, (s - h) // 2
    sup = 2
    mask = Image.new("L", (s * sup, s * sup), 0)
    d = ImageDraw.Draw(mask)
    short = min(w, h) * sup
    for i, sh in enumerate(scene.shapes):
        cx, cy, r = (ox + sh.x * w) * sup, (oy + sh.y * h) * sup, sh.size * short / 2
        if sh.kind == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=i + 1)
        else:
            d.polygon(render.polygon(sh.kind, cx, cy, r, sh.angle), fill=i + 1)
    m = np.asarray(mask)
    g = s // p
    ps = p * sup
    blocks = m.reshape(g, ps, g, ps).transpose(0, 2, 1, 3).reshape(g * g, ps * ps)
    n = len(scene.shapes)
    counts = np.stack([(blocks == i + 1).sum(1) for i in range(n)], 1)  # [P, n]
    pad = np.zeros((s * sup, s * sup), bool)
    pad[:, :] = True
    pad[oy * sup : (oy + h) * sup, ox * sup : (ox + w) * sup] = False
    padfrac = pad.reshape(g, ps, g, ps).transpose(0, 2, 1, 3).reshape(g * g, -1).mean(1)
    shape_cls = np.where(padfrac > 0.5, 1, 0).astype(np.int64)
    owner = np.full(g * g, -1, np.int64)
    best = counts.argmax(1)
    # At least 6 pixels of a 16-pixel patch (the same fraction of larger patches).
    hit = counts.max(1) >= 6 * sup * sup * (p / 16) ** 2
    owner[hit] = best[hit]
    for i, sh in enumerate(scene.shapes):  # a tiny shape still owns its centre patch
        px = min(g - 1, int((ox + sh.x * w) / p))
        py = min(g - 1, int((oy + sh.y * h) / p))
        if owner[py * g + px] < 0:
            owner[py * g + px] = i
    color = np.full(g * g, -100, np.int64)
    pos = np.full(g * g, -100, np.int64)
    rank = np.full(g * g, -100, np.int64)
    colors = list(world.COLORS)
    for i, sh in enumerate(scene.shapes):
        sel = owner == i
        shape_cls[sel] = 2 + world.SHAPES.index(sh.kind)
        color[sel] = colors.index(sh.color)
        pos[sel] = world.position_class(sh.x, sh.y)
        rank[sel] = i
    present = np.zeros(len(world.SHAPES), np.float32)
    for sh in scene.shapes:
        present[world.SHAPES.index(sh.kind)] = 1
    return {
        "shape": shape_cls,
        "color": color,
        "pos": pos,
        "rank": rank,
        "count": np.array(n - 1, dtype=np.int64),
        "bg": np.array(world.BACKGROUND_CLASSES.index(scene.background.label), dtype=np.int64),
        "present": present,
    }


def render_example(rng: random.Random, s: int, p: int) -> tuple[world.Scene, np.ndarray, dict]:
    """One bank example: scene, letterboxed uint8 image, labels."""
    aspect = (0.75, 4 / 3) if rng.random() < 0.6 else (0.5, 2.0)
    scene = world.sample_scene(rng, aspect=aspect)
    w, h = fit_size(scene.width, scene.height, s)
    r = rng.random()
    if r < 0.3:
        # The real path: full-size render (maybe JPEG), downscaled by the runtime.
        img = render.render(scene, supersample=2)
        if rng.random() < 0.5:
            img = render.to_jpeg(img, rng.randint(50, 95))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    else:
        img = render.render(scene, size=(w, h), supersample=3)
        if r < 0.4:
            img = render.to_jpeg(img, rng.randint(60, 95))
    canvas = Image.new("RGB", (s, s), PAD_COLOR)
    canvas.paste(img, ((s - w) // 2, (s - h) // 2))
    return scene, np.asarray(canvas, dtype=np.uint8), _labels(scene, s, p, w, h)


def _bank_part(args: tuple[int, int, int, int, int]) -> tuple[list, np.ndarray, dict]:
    seed, start, n, s, p = args
    scenes, imgs, labs = [], [], []
    for i in range(start, start + n):
        rng = random.Random(seed * 1_000_003 + i)
        sc, im, lb = render_example(rng, s, p)
        scenes.append(sc)
        imgs.append(im)
        labs.append(lb)
    return scenes, np.stack(imgs), {k: np.stack([lb[k] for lb in labs]) for k in labs[0]}


@dataclass
class Bank:
    """Pre-rendered examples: ``images`` [N, S, S, 3] uint8, ``labels``, ``scenes``."""

    images: np.ndarray
    labels: dict[str, np.ndarray]
    scenes: list[world.Scene]


def make_bank(n: int, seed: int, s: int, p: int, workers: int = 2) -> Bank:
    """Render ``n`` examples (example ``i`` depends only on ``seed`` and ``i``)."""
    chunk = 500
    jobs = [(seed, a, min(chunk, n - a), s, p) for a in range(0, n, chunk)]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_bank_part, jobs)
    else:
        parts = [_bank_part(j) for j in jobs]
    scenes = [sc for part in parts for sc in part[0]]
    images = np.concatenate([part[1] for part in parts])
    labels = {k: np.concatenate([part[2][k] for part in parts]) for k in parts[0][2]}
    return Bank(images, labels, scenes)


# ---------------------------------------------------------------------------------------
# Token sequences


def encode_conversation(
    messages: list[dict], n_img: int, *, add_generation_prompt: bool = False
) -> tuple[list[int], list[int], list[int]]:
    """The token sequence libmtmd evaluates for ``messages`` rendered with the chat template.

    Special tokens split the text into fragments that llama.cpp tokenizes separately (each
    with a space prefix), and so does the media marker (libmtmd tokenizes the text around
    it as separate chunks); BOS is added once at the start.

    Returns:
        ``(ids, loss_mask, image_starts)``: ids with ``-1`` at image positions, a 0/1 mask
        marking the tokens the model is trained to produce (assistant answer tokens and
        their ``<|end|>``), and the index of each image's first position.
    """
    voc = vocab.shapes_vocab()
    end = voc.token_id(vocab.END)
    ids: list[int] = [voc.bos_id]
    mask: list[int] = [0]
    starts: list[int] = []

    def text(t: str, train: bool) -> None:
        if t:
            toks = vocab._tok(t, False)
            ids.extend(toks)
            mask.extend([int(train)] * len(toks))

    for m in messages:
        train = m["role"] == "assistant"
        ids.append(voc.token_id(vocab.ROLE_TOKENS[m["role"]]))
        mask.append(0)
        c = m["content"]
        parts = [{"type": "text", "text": c}] if isinstance(c, str) else c
        buf = ""
        for part in parts:
            if part["type"] == "image_url":
                text(buf, train)
                buf = ""
                starts.append(len(ids))
                ids.extend([-1] * n_img)
                mask.extend([0] * n_img)
            else:
                buf += part["text"]
        text(buf, train)
        ids.append(end)
        mask.append(int(train))
    if add_generation_prompt:
        ids.append(voc.token_id(vocab.ASSISTANT))
        mask.append(0)
    return ids, mask, starts
