"""The shipped ``shapes-vlm`` model answers through the public API and real llama.cpp."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from shapes_vlm import evaluate, render, world

MODEL_DIR = evaluate.MODEL_DIR
SAMPLES = MODEL_DIR / "samples"

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "model-f16.gguf").exists(), reason="shipped model files are missing"
)


@pytest.fixture(scope="module")
def vlm():  # type: ignore[no-untyped-def]
    import edge_vlm

    m = edge_vlm.load(
        model=str(MODEL_DIR / "model-q8_0.gguf"),
        mmproj=str(MODEL_DIR / "mmproj-f16.gguf"),
        threads=1,
    )
    yield m
    m.close()


def test_fifty_generated_questions(vlm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ok = total = 0
    failures = []
    for i in range(9):
        scene = evaluate.scene_for(2024, i, "png")
        image = evaluate.save_image(scene, "png", tmp_path / f"s{i}")
        for qa in evaluate.questions_for(2024, i, scene):
            got = evaluate.ask(vlm, image, qa.question)
            ok += got == qa.answer
            total += 1
            if got != qa.answer:
                failures.append((qa.question, qa.answer, got))
    assert total >= 50
    assert ok / total >= 0.9, failures


def test_readme_sample(vlm) -> None:  # type: ignore[no-untyped-def]
    reply = vlm.chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(SAMPLES / "red-circle-blue-square.png")}},
        {"type": "text", "text": "Describe the image."}]}], max_tokens=48, temperature=0)
    # exactly, unstripped: no leading space from the tokenizer's word boundary
    assert reply.choices[0].message.content == (
        "A red circle on the left and a blue square on the right, on a white background.")
    assert reply.choices[0].finish_reason == "stop"


def test_multi_turn_and_system_message(vlm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(99)
    ok = total = 0
    # 16 conversations x 3 turns: with fewer questions one miss decides the 90% bar.
    for i in range(16):
        scene = world.sample_scene(rng)
        path = str(tmp_path / f"c{i}.png")
        render.render(scene).save(path)
        system = world.SYSTEM_PROMPTS[i % len(world.SYSTEM_PROMPTS)] if i % 2 else None
        msgs, qas = world.conversation(rng, scene, path, turns=3, system=system)
        start = 1 if system else 0
        for t, qa in enumerate(qas):
            upto = msgs[: start + 2 * t + 1]  # ... the t-th user message
            reply = vlm.chat(upto, max_tokens=48, temperature=0)
            ok += (reply.choices[0].message.content or "").strip() == qa.answer
            total += 1
    assert total == 48
    assert ok / total >= 0.9


def test_untrained_question_gets_a_short_answer(vlm) -> None:  # type: ignore[no-untyped-def]
    msgs = [
        {
            "role": "user",
            "content": [
                {
                    "type": "image_url",
                    "image_url": {"url": str(SAMPLES / "red-circle-blue-square.png")},
                },
                {"type": "text", "text": "Why is the sky blue? Tell me a long story."},
            ],
        }
    ]
    reply = vlm.chat(msgs, max_tokens=64, temperature=0)
    assert reply.choices[0].finish_reason == "stop"
    assert len(reply.choices[0].message.content or "") < 200
