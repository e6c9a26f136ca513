"""The optional on-disk embedding cache: survives a restart, never feeds a bad entry."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import edge_vlm
from edge_vlm.config import load_settings
from edge_vlm.diskcache import SUFFIX, DiskEmbeddingCache
from tests.conftest import ask


def load_with_disk_cache(tiny_paths, folder: Path):  # type: ignore[no-untyped-def]
    settings = load_settings({"cache.disk_cache_mb": 8, "cache.disk_cache_dir": str(folder),
                              "runtime.threads": 1})
    return edge_vlm.load(tiny_paths.model, tiny_paths.mmproj, settings=settings)


def test_a_restarted_process_skips_the_encoder(tiny_paths, images, tmp_path):
    with load_with_disk_cache(tiny_paths, tmp_path) as vlm:
        first = vlm.chat(ask(images["red"]), max_tokens=8, temperature=0)
    assert first.timings.image_encode_ms > 0 and len(list(tmp_path.glob("*" + SUFFIX))) == 1
    with load_with_disk_cache(tiny_paths, tmp_path) as vlm:
        again = vlm.chat(ask(images["red"]), max_tokens=8, temperature=0)
    assert again.timings.image_encode_ms == 0.0 and again.timings.embedding_cache_hits == 1
    assert again.choices[0].message.content == first.choices[0].message.content


def test_a_corrupt_entry_is_discarded_and_the_answer_stays_right(tiny_paths, images, tmp_path):
    with load_with_disk_cache(tiny_paths, tmp_path) as vlm:
        good = vlm.chat(ask(images["blue"]), max_tokens=8, temperature=0)
    (entry,) = tmp_path.glob("*" + SUFFIX)
    raw = bytearray(entry.read_bytes())
    raw[200] ^= 0xFF  # flip bits inside the embeddings
    entry.write_bytes(bytes(raw))
    with load_with_disk_cache(tiny_paths, tmp_path) as vlm:
        reply = vlm.chat(ask(images["blue"]), max_tokens=8, temperature=0)
    assert reply.timings.image_encode_ms > 0  # re-encoded, not read from the bad entry
    assert reply.choices[0].message.content == good.choices[0].message.content


def test_foreign_and_truncated_entries_are_misses(tmp_path):
    cache = DiskEmbeddingCache(tmp_path, 1 << 20)
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    cache.put("a", value)
    assert np.array_equal(cache.get("a", (3, 4)), value)
    assert cache.get("a", (4, 3)) is None  # a different shape: refused and removed
    cache.put("b", value)
    path = next(tmp_path.glob("*" + SUFFIX))
    path.write_bytes(path.read_bytes()[:40])
    assert cache.get("b", (3, 4)) is None and not path.exists()


def test_the_folder_stays_within_its_budget(tmp_path):
    value = np.zeros((16, 256), np.float32)  # 16 KiB each
    cache = DiskEmbeddingCache(tmp_path, 3 * 17 * 1024)
    for i in range(6):
        cache.put(f"k{i}", value)
    sizes = [p.stat().st_size for p in tmp_path.glob("*" + SUFFIX)]
    assert sum(sizes) <= cache.max_bytes and len(sizes) == 3
    assert cache.get("k5", (16, 256)) is not None and cache.get("k0", (16, 256)) is None
