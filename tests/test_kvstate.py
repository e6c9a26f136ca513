"""Coming back to a conversation without paying again (issue 17): KV states kept in host
memory, restored by longest prefix, exactly equal to a from-scratch evaluation."""

from __future__ import annotations

import numpy as np
import pytest

import edge_vlm
from edge_vlm.config import load_settings
from edge_vlm.kvstate import KVStateCache, common_prefix
from tests.conftest import ask


def follow_up(first, reply: str, question: str):  # type: ignore[no-untyped-def]
    return [*first, {"role": "assistant", "content": reply},
            {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def vlm(tiny_paths):  # type: ignore[no-untyped-def]
    settings = load_settings({"runtime.threads": 1, "runtime.gpu": "off",
                              "cache.kv_ram_mb": 64})
    with edge_vlm.load(tiny_paths.model, tiny_paths.mmproj, settings=settings) as v:
        yield v


@pytest.fixture(scope="module")
def scratch(tiny_paths):  # type: ignore[no-untyped-def]
    """The same model with no saved states and no prefix reuse: every prompt from zero."""
    settings = load_settings({"runtime.threads": 1, "runtime.gpu": "off",
                              "cache.kv_ram_mb": 0, "cache.prefix_reuse": False})
    with edge_vlm.load(tiny_paths.model, tiny_paths.mmproj, settings=settings) as v:
        yield v


@pytest.fixture(scope="module")
def live(tiny_paths):  # type: ignore[no-untyped-def]
    """The same model with prefix reuse of the live cache only (no saved states)."""
    settings = load_settings({"runtime.threads": 1, "runtime.gpu": "off",
                              "cache.kv_ram_mb": 0})
    with edge_vlm.load(tiny_paths.model, tiny_paths.mmproj, settings=settings) as v:
        yield v


# -- the cache on its own ------------------------------------------------------------------


def blob(n: int) -> bytearray:
    return bytearray(n)


def test_the_longest_shared_prefix_wins():
    c = KVStateCache(1000)
    c.put([1, 2, 3], 3, blob(10))
    c.put([1, 2, ("img#0", 64), 7], 67, blob(10))
    found = c.best([1, 2, ("img#0", 64), 9])
    assert found is not None and found[1] == 3 and found[0].n_pos == 67
    assert c.best([5, 6]) is None
    assert c.best([1, 2, 3, 4], at_least=3) is None  # not better than what the caller has
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2


def test_the_budget_drops_the_least_recently_used():
    c = KVStateCache(25)
    c.put([1], 1, blob(10))
    c.put([2], 1, blob(10))
    assert c.best([1, 5]) is not None  # [1] is now the most recent
    c.put([3], 1, blob(10))
    assert len(c) == 2 and c.bytes == 20
    assert c.best([2]) is None and c.best([1]) is not None
    assert not c.put([4], 1, blob(26))  # larger than the whole budget: not kept
    assert not KVStateCache(0).put([1], 1, blob(1))  # off


def test_a_longer_state_replaces_its_own_prefix():
    c = KVStateCache(100)
    c.put([1, 2], 2, blob(10))
    c.put([1, 2, 3], 3, blob(12))
    assert len(c) == 1 and c.bytes == 12
    c.put([1, 2], 2, blob(10))  # already inside the longer one
    assert len(c) == 1


# -- with llama.cpp ------------------------------------------------------------------------


def test_alternating_conversations_restore_exactly(vlm, scratch, images):
    """A, B, A with an image each: A's follow-up starts from A's restored state, and its
    logits equal a from-scratch evaluation of the whole conversation."""
    vlm.engine.reset()
    a1, b1 = ask(images["red"], "What is this?"), ask(images["blue"], "Describe it.")
    vlm.debug_last_logits(a1)
    vlm.debug_last_logits(b1)  # the live cache now holds B; A's state was saved
    a2 = follow_up(a1, " what color", "And the color?")
    restores = vlm.engine.kv_states.restores
    got = vlm.debug_last_logits(a2)
    assert vlm.engine.kv_states.restores == restores + 1
    assert np.abs(got - scratch.debug_last_logits(a2)).max() <= 1e-4
    # And B again, from its own saved state.
    b2 = follow_up(b1, " a square", "Anything else?")
    restores = vlm.engine.kv_states.restores
    got = vlm.debug_last_logits(b2)
    assert vlm.engine.kv_states.restores == restores + 1
    assert np.abs(got - scratch.debug_last_logits(b2)).max() <= 1e-4


def test_a_restored_conversation_continues_as_if_never_left(vlm, live, images):
    """With generated answers in the saved state: A, B, then A's follow-up answers exactly
    as a process that never left A (the live cache's prefix reuse), and only the new turn
    is evaluated."""
    vlm.engine.reset()
    live.engine.reset()
    a1, b1 = ask(images["green"], "What is this?"), ask(images["red"], "Is it red?")
    ra = vlm.chat(a1, max_tokens=4, temperature=0)
    rb = vlm.chat(b1, max_tokens=4, temperature=0)
    assert rb.timings.prompt_tokens_reused < ra.usage.prompt_tokens  # B is another prompt
    a2 = follow_up(a1, ra.choices[0].message.content, "Tell me more.")
    warm = vlm.chat(a2, max_tokens=8, temperature=0)
    t = warm.timings
    assert t.prompt_tokens_reused >= ra.usage.prompt_tokens
    assert t.image_encode_ms == 0.0
    assert t.prompt_tokens_evaluated == t.prompt_tokens - t.prompt_tokens_reused
    assert live.chat(a1, max_tokens=4, temperature=0).choices[0].message.content == \
        ra.choices[0].message.content
    never_left = live.chat(a2, max_tokens=8, temperature=0)
    assert warm.choices[0].message.content == never_left.choices[0].message.content
    assert never_left.timings.prompt_tokens_reused == t.prompt_tokens_reused


def test_the_budget_setting_is_honoured(tiny_paths, images):
    settings = load_settings({"runtime.threads": 1, "runtime.gpu": "off", "cache.kv_ram_mb": 0})
    with edge_vlm.load(tiny_paths.model, tiny_paths.mmproj, settings=settings) as v:
        a1, b1 = ask(images["red"]), ask(images["blue"])
        ra = v.chat(a1, max_tokens=3, temperature=0)
        v.chat(b1, max_tokens=3, temperature=0)
        r = v.chat(follow_up(a1, ra.choices[0].message.content, "Why?"), max_tokens=3,
                   temperature=0)
        assert len(v.engine.kv_states) == 0
        assert r.timings.prompt_tokens_reused < ra.usage.prompt_tokens  # re-evaluated


def test_reset_forgets_saved_states(vlm, images):
    vlm.chat(ask(images["red"]), max_tokens=2, temperature=0)
    vlm.chat(ask(images["blue"]), max_tokens=2, temperature=0)
    assert len(vlm.engine.kv_states) >= 1
    vlm.engine.reset()
    assert len(vlm.engine.kv_states) == 0
    r = vlm.chat(ask(images["red"]), max_tokens=2, temperature=0)
    assert r.timings.prompt_tokens_reused == 0
