"""KV prefix reuse and the image-embedding cache: follow-ups are cheap and exactly right."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edge_vlm.errors import ContextOverflowError
from tests.conftest import ask, draw


def scratch_logits(vlm, messages):  # type: ignore[no-untyped-def]
    vlm.engine.reset()
    return vlm.debug_last_logits(messages)


def reused_logits(vlm, first, second):  # type: ignore[no-untyped-def]
    vlm.engine.reset()
    vlm.debug_last_logits(first)
    return vlm.debug_last_logits(second)


def common_prefix_tokens(vlm, a, b) -> int:  # type: ignore[no-untyped-def]
    """Prompt tokens two conversations share from the start (images count whole)."""
    ca, cb = vlm.debug_prompt_chunks(a), vlm.debug_prompt_chunks(b)
    n = 0
    for (ka, va), (kb, vb) in zip(ca, cb, strict=False):
        if ka != kb:
            break
        if ka == "image":
            if va != vb:
                break
            n += va
            continue
        for x, y in zip(va, vb, strict=False):
            if x != y:
                return n
            n += 1
        if len(va) != len(vb):
            break
    return n


def follow_up(first, reply: str, question: str):  # type: ignore[no-untyped-def]
    return [*first, {"role": "assistant", "content": reply},
            {"role": "user", "content": question}]


def test_follow_up_evaluates_only_the_new_turn(tiny_vlm, images):
    tiny_vlm.engine.reset()
    turn1 = ask(images["red"])
    r1 = tiny_vlm.chat(turn1, max_tokens=6, temperature=0)
    assert r1.timings.prompt_tokens_reused == 0
    turn2 = follow_up(turn1, r1.choices[0].message.content, "And the color?")
    r2 = tiny_vlm.chat(turn2, max_tokens=6, temperature=0)
    t = r2.timings
    assert t.prompt_tokens_reused >= r1.usage.prompt_tokens
    assert t.prompt_tokens_evaluated == t.prompt_tokens - t.prompt_tokens_reused
    assert t.image_encode_ms == 0.0 and t.images[0].cache_hit
    assert t.prompt_tokens_evaluated < 20


def test_follow_up_logits_equal_a_from_scratch_evaluation(tiny_vlm, images):
    turn1 = ask(images["blue"])
    turn2 = follow_up(turn1, " what color", "Is there a square?")
    diff = np.abs(reused_logits(tiny_vlm, turn1, turn2) - scratch_logits(tiny_vlm, turn2)).max()
    assert diff <= 1e-4


def test_editing_an_earlier_message_shrinks_the_prefix(tiny_vlm, images):
    first = follow_up(ask(images["red"], "What is this?"), " color", "Is there a square?")
    edited = follow_up(ask(images["red"], "What color?"), " color", "Is there a square?")
    tiny_vlm.engine.reset()
    tiny_vlm.chat(first, max_tokens=2, temperature=0)
    r = tiny_vlm.chat(edited, max_tokens=2, temperature=0)
    assert r.timings.prompt_tokens_reused == common_prefix_tokens(tiny_vlm, first, edited)
    diff = np.abs(reused_logits(tiny_vlm, first, edited) - scratch_logits(tiny_vlm, edited)).max()
    assert diff <= 1e-4


def test_a_different_image_at_the_same_position_is_not_reused(tiny_vlm, images, tmp_path):
    a, b = ask(images["red"]), ask(draw(tmp_path / "new.png", (90, 10, 120), (0, 255, 255)))
    tiny_vlm.engine.reset()
    tiny_vlm.chat(a, max_tokens=2, temperature=0)
    r = tiny_vlm.chat(b, max_tokens=2, temperature=0)
    before_image = tiny_vlm.debug_prompt_chunks(b)[0][1]
    assert r.timings.prompt_tokens_reused == len(before_image)
    assert not r.timings.images[0].cache_hit
    assert np.abs(reused_logits(tiny_vlm, a, b) - scratch_logits(tiny_vlm, b)).max() <= 1e-4


def test_a_system_prompt_change_reuses_nothing_after_it(tiny_vlm, images):
    a = [{"role": "system", "content": "Be brief."}, *ask(images["red"])]
    b = [{"role": "system", "content": "Be careful."}, *ask(images["red"])]
    tiny_vlm.engine.reset()
    tiny_vlm.chat(a, max_tokens=2, temperature=0)
    r = tiny_vlm.chat(b, max_tokens=2, temperature=0)
    shared = common_prefix_tokens(tiny_vlm, a, b)
    system_turn = tiny_vlm.debug_prompt_chunks(b)[0][1]  # text up to the image
    assert r.timings.prompt_tokens_reused == shared < len(system_turn)
    # The image itself still comes from the embedding cache: no second encode.
    assert r.timings.image_encode_ms == 0.0 and r.timings.embedding_cache_hits == 1


def test_a_changed_file_at_the_same_path_is_not_served_stale(tiny_vlm, images, tmp_path):
    path = tmp_path / "photo.png"
    shutil.copy(images["red"], path)
    tiny_vlm.engine.reset()
    r1 = tiny_vlm.chat(ask(path), max_tokens=10, temperature=0)
    shutil.copy(images["blue"], path)
    second = tiny_vlm.chat(ask(path), max_tokens=10, temperature=0)
    fresh = tiny_vlm.chat(ask(images["blue"]), max_tokens=10, temperature=0)
    first = r1.choices[0].message.content
    assert second.choices[0].message.content == fresh.choices[0].message.content != first
    assert second.timings.images[0].identity == fresh.timings.images[0].identity
    assert second.timings.images[0].identity != r1.timings.images[0].identity


def test_a_new_conversation_about_a_seen_image_skips_the_encoder(tiny_vlm, images):
    tiny_vlm.chat(ask(images["green"]), max_tokens=2)
    tiny_vlm.engine.reset()  # the KV cache is gone; the embedding cache is not
    r = tiny_vlm.chat(ask(images["green"], "Describe the image."), max_tokens=2)
    assert r.timings.embedding_cache_hits == 1 and r.timings.image_encode_ms == 0.0


def test_a_conversation_longer_than_the_context_is_a_clear_error(tiny_vlm, images):
    long = ask(images["red"], "What is this? " * 400)
    with pytest.raises(ContextOverflowError, match="shorten the conversation"):
        tiny_vlm.chat(long, max_tokens=8)
    assert tiny_vlm.chat(ask(images["red"]), max_tokens=3).usage.completion_tokens == 3


def test_embedding_cache_is_bounded_by_bytes():
    from edge_vlm.embcache import EmbeddingCache

    cache = EmbeddingCache(max_bytes=3 * 16 * 256 * 4)
    for i in range(5):
        cache.put(("fp", str(i), "16"), np.zeros((16, 256), np.float32))
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes
    assert cache.get(("fp", "0", "16")) is None and cache.get(("fp", "4", "16")) is not None
