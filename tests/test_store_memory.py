"""The store's memory estimate: verdicts, the largest context that fits, and how close the
estimate comes to a real load's peak RSS (tiny model, real llama.cpp)."""

from __future__ import annotations

import sys

import pytest


def test_estimate_verdicts_and_largest_context() -> None:
    from edge_vlm.preflight.memory import estimate
    from edge_vlm.store.manifest import ModelFacts

    facts = ModelFacts(n_layer=30, n_head=9, n_head_kv=3, head_dim_k=64, head_dim_v=64,
                       n_vocab=49152, embedding_width=576, n_ff=1536, context_length=8192,
                       image_size=512, patch_size=16, vision_width=768, vision_ff=3072,
                       vision_heads=12)
    big = estimate(facts, 144_000_000, 190_000_000, n_ctx=8192, available=10**12)
    assert big.verdict == "fits" and big.max_ctx == 8192
    assert big.kv_cache == 30 * 3 * 128 * 2 * 8192
    tight = estimate(facts, 144_000_000, 190_000_000, n_ctx=8192, available=big.total + 1)
    assert tight.verdict == "tight"
    small = estimate(facts, 144_000_000, 190_000_000, n_ctx=8192,
                     available=big.total - 100 * 2**20)
    assert small.verdict == "won't fit" and 0 < small.max_ctx < 8192
    assert estimate(facts, 144_000_000, 190_000_000, n_ctx=small.max_ctx,
                    available=small.available).total <= small.available
    assert "largest context that fits is" in small.summary()
    none = estimate(facts, 144_000_000, 190_000_000, n_ctx=8192, available=10**8)
    assert none.max_ctx == 0 and "weights alone do not fit" in none.summary()


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS read from /proc/self/status")
def test_estimate_is_within_20_percent_of_measured_peak_rss(home, pair) -> None:
    from edge_vlm.preflight.memcheck import measure

    result = measure(pair.model, pair.mmproj, n_ctx=1024, image_side=64)
    assert abs(result["error_pct"]) <= 20, result


def test_memory_warning_only_when_it_will_not_fit(pair, monkeypatch) -> None:
    from edge_vlm.config import load_settings
    from edge_vlm.preflight import memory

    settings = load_settings()
    assert memory.memory_warning(pair.model, pair.mmproj, settings) is None
    monkeypatch.setattr(memory, "_available", lambda: 50 * 2**20)
    warning = memory.memory_warning(pair.model, pair.mmproj, settings)
    assert warning is not None and "tiny-model.gguf" in warning and "available" in warning
