"""The synthetic world of the shipped model: answers, grammar, token sequences, labels."""

from __future__ import annotations

import random

import pytest
from shapes_vlm import data, render, vocab, world


def scene(*shapes: tuple[str, str, float, float], bg: str = "white") -> world.Scene:
    color = world.BACKGROUND_COLORS[bg]
    background = world.Background("plain", bg, color, color)
    return world.Scene(
        200,
        200,
        background,
        tuple(
            world.Shape(k, c, x, y, 0.2, 0.0, world.COLORS[c])
            for k, c, x, y in sorted(shapes, key=lambda s: s[2])
        ),
    )


def test_answers_match_the_issue_table() -> None:
    one = scene(("circle", "red", 0.2, 0.5))
    two = scene(("square", "blue", 0.8, 0.5), ("circle", "red", 0.2, 0.5))
    three = scene(
        ("circle", "red", 0.15, 0.5), ("square", "blue", 0.5, 0.5), ("star", "green", 0.85, 0.5)
    )
    assert world.answer(one, "shape") == "A red circle."
    assert world.answer(two, "shapes") == "A red circle and a blue square."
    assert world.answer(three, "shapes") == "A red circle, a blue square and a green star."
    assert world.answer(two, "color", "square") == "Blue."
    assert world.answer(two, "color", "star") == "There is no star."
    assert [world.answer(s, "count") for s in (one, two, three)] == ["One.", "Two.", "Three."]
    assert world.answer(two, "where", "circle") == "On the left."
    assert world.answer(two, "where", "cross") == "There is no cross."
    assert world.answer(two, "is_there", "square") == "Yes."
    assert world.answer(two, "is_there", "triangle") == "No."
    assert world.answer(two, "describe") == (
        "A red circle on the left and a blue square on the right, on a white background."
    )
    with pytest.raises(ValueError):
        world.answer(two, "shape")


def test_describe_grammar_articles_and_backgrounds() -> None:
    s = scene(("star", "orange", 0.5, 0.5), bg="black")
    assert world.describe(s) == "An orange star in the center, on a black background."
    assert world.answer(s, "shape") == "An orange star."
    grad = world.Scene(
        100, 100, world.Background("gradient", None, (200, 200, 200), (90, 90, 90)), s.shapes
    )
    assert world.describe(grad).endswith(", on a gradient background.")
    noisy = world.Scene(
        100, 100, world.Background("noisy", None, (200, 200, 200), (200, 200, 200), noise=9),
        s.shapes
    )
    assert world.describe(noisy).endswith(", on a noisy background.")
    three = scene(
        ("circle", "red", 0.15, 0.5), ("square", "blue", 0.5, 0.85), ("cross", "green", 0.85, 0.2)
    )
    assert world.describe(three) == (
        "A red circle on the left, a blue square at the bottom and "
        "a green cross on the right, on a white background."
    )


@pytest.mark.parametrize(
    ("x", "y", "where"),
    [
        (0.5, 0.5, "in the center"),
        (0.6, 0.4, "in the center"),
        (0.1, 0.5, "on the left"),
        (0.9, 0.3, "on the right"),
        (0.5, 0.1, "at the top"),
        (0.4, 0.9, "at the bottom"),
        (0.2, 0.25, "on the left"),
        (0.25, 0.2, "at the top"),
    ],
)
def test_position_rule(x: float, y: float, where: str) -> None:
    assert world.WHERE[world.position_class(x, y)] == where


def test_sampled_scenes_obey_the_rules() -> None:
    rng = random.Random(3)
    for _ in range(300):
        s = world.sample_scene(rng, aspect=(0.5, 2.0))
        assert 1 <= len(s.shapes) <= 3
        assert len({sh.kind for sh in s.shapes}) == len(s.shapes)
        xs = [sh.x for sh in s.shapes]
        assert xs == sorted(xs)
        for sh in s.shapes:
            assert world.MIN_SIZE <= sh.size <= world.MAX_SIZE
            assert not world._ambiguous(sh.x, sh.y)
            assert sh.color in world.allowed_colors(s.background)
        for a, b in zip(s.shapes, s.shapes[1:], strict=False):
            assert b.x - a.x >= world.ORDER_MARGIN
        assert world.answer(s, "count") == world.NUMBERS[len(s.shapes) - 1] + "."


def test_every_answer_word_is_one_token() -> None:
    voc = vocab.shapes_vocab()
    rng = random.Random(5)
    for _ in range(200):
        s = world.sample_scene(rng)
        for t in world.QUESTION_TYPES:
            if t == "shape" and len(s.shapes) != 1:
                continue
            qa = world.sample_question(rng, s, t)
            for text in (qa.question, qa.answer):
                ids = voc.tokenize(text)
                n_words = len(text.split()) + sum(text.count(p) for p in vocab.PUNCTUATION)
                assert len(ids) == n_words, (text, [voc.tokens[i] for i in ids])


def test_conversation_tokens_and_loss_mask() -> None:
    voc = vocab.shapes_vocab()
    s = scene(("circle", "red", 0.2, 0.5))
    msgs = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "x.png"}},
                {"type": "text", "text": "What shape is in the image?"},
            ],
        },
        {"role": "assistant", "content": world.answer(s, "shape")},
        {"role": "user", "content": "Is there a star?"},
    ]
    ids, mask, starts = data.encode_conversation(msgs, 4, add_generation_prompt=True)
    toks = ["IMG" if i < 0 else voc.tokens[i] for i in ids]
    assert toks == [
        "<s>",
        "<|system|>",
        "▁Answer",
        "▁briefly",
        ".",
        "<|end|>",
        "<|user|>",
        "IMG",
        "IMG",
        "IMG",
        "IMG",
        "▁What",
        "▁shape",
        "▁is",
        "▁in",
        "▁the",
        "▁image",
        "?",
        "<|end|>",
        "<|assistant|>",
        "▁A",
        "▁red",
        "▁circle",
        ".",
        "<|end|>",
        "<|user|>",
        "▁Is",
        "▁there",
        "▁a",
        "▁star",
        "?",
        "<|end|>",
        "<|assistant|>",
    ]
    assert starts == [7]
    assert [t for t, m in zip(toks, mask, strict=True) if m] == [
        "▁A",
        "▁red",
        "▁circle",
        ".",
        "<|end|>",
    ]
    # The same sequence as rendering with the chat template and splitting at the marker.
    rendered = vocab.render_messages(msgs, add_generation_prompt=True)
    flat = [i for kind, v in vocab.prompt_chunks(rendered)
            for i in (v if kind == "text" else [-1] * 4)]
    assert flat == ids


def test_chat_template_renders_like_the_fast_path() -> None:
    import jinja2

    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": vocab.MEDIA_MARKER},
                {"type": "text", "text": "How many shapes are there?"},
            ],
        },
        {"role": "assistant", "content": "Two."},
        {"role": "user", "content": "Is there a star?"},
    ]
    out = jinja2.Template(vocab.CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=True)
    fast = [
        {
            **m,
            "content": m["content"]
            if isinstance(m["content"], str)
            else [
                {"type": "image_url"} if p["text"] == vocab.MEDIA_MARKER else p
                for p in m["content"]
            ],
        }
        for m in msgs
    ]
    assert out == vocab.render_messages(fast, add_generation_prompt=True)
    assert out == (
        "<|user|><__media__>How many shapes are there?<|end|><|assistant|>Two.<|end|>"
        "<|user|>Is there a star?<|end|><|assistant|>"
    )


def test_patch_labels_align_with_the_scene() -> None:
    rng = random.Random(11)
    for _ in range(50):
        sc, img, lab = data.render_example(rng, 112, 16)
        assert img.shape == (112, 112, 3)
        shapes = {int(v) - 2 for v in lab["shape"] if v >= 2}
        assert shapes == {world.SHAPES.index(s.kind) for s in sc.shapes}
        for i, s in enumerate(sc.shapes):
            sel = lab["rank"] == i
            assert sel.any()
            assert set(lab["shape"][sel]) == {2 + world.SHAPES.index(s.kind)}
            assert set(lab["pos"][sel]) == {world.position_class(s.x, s.y)}
            assert set(lab["color"][sel]) == {list(world.COLORS).index(s.color)}
        assert int(lab["count"]) == len(sc.shapes) - 1


def test_letterbox_matches_clip_geometry() -> None:
    from PIL import Image

    img = Image.new("RGB", (640, 360), (255, 255, 255))
    out = data.letterbox(img, 112)
    assert out.size == (112, 112)
    assert out.getpixel((0, 0)) == data.PAD_COLOR
    assert out.getpixel((56, 56)) == (255, 255, 255)
    # 640x360 → 112x63, pasted at y = (112 - 63) // 2 = 24
    assert out.getpixel((56, 23)) == data.PAD_COLOR and out.getpixel((56, 24)) == (255, 255, 255)
    assert out.getpixel((56, 86)) == (255, 255, 255) and out.getpixel((56, 87)) == data.PAD_COLOR


def test_a_noisy_scene_renders_to_the_same_pixels_every_time() -> None:
    """Evaluation and training scenes are pure functions of their seed: the noise pattern of a
    noisy background comes from the scene's own seed (it once came from Pillow's unseeded
    generator, so an evaluation's score depended on what had been rendered before it)."""
    import numpy as np

    base = scene(("star", "orange", 0.5, 0.5))

    def noisy(seed: int) -> world.Scene:
        bg = world.Background("noisy", None, (120, 120, 120), (120, 120, 120), noise=15, seed=seed)
        return world.Scene(160, 120, bg, base.shapes)

    first = np.asarray(render.render(noisy(3)))
    render.render(noisy(4))
    assert np.array_equal(first, np.asarray(render.render(noisy(3))))
    other = np.asarray(render.render(noisy(4)))
    assert not np.array_equal(first, other)
    corner = first[:20, :20].astype(float)  # background only: base 120, std ~15
    assert abs(corner.mean() - 120) < 5 and 8 < corner.std() < 22
