"""What the front ends make of a generation's :class:`~edge_vlm.schema.GenerationStats`:
the ``usage`` block of a response and the one-line summaries people read.

One place for each, so the CLI, the TUI, the Python API and the server never re-derive
them differently.
"""

from __future__ import annotations

from edge_vlm.schema import GenerationStats, Usage


def usage(stats: GenerationStats) -> Usage:
    """The response's ``usage``: prompt, completion and total tokens."""
    return Usage(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                 total_tokens=stats.prompt_tokens + stats.completion_tokens)


def _tiles(n: int) -> str:
    return f"{n} tile{'s' if n != 1 else ''}"


def summary_line(s: GenerationStats) -> str:
    """Every figure on one line (``edge-vlm run --stats``)."""
    parts = [
        f"ttft {s.ttft_ms:.0f} ms",
        f"prompt {s.prompt_tokens} tok ({s.image_tokens} image, {s.prompt_tokens_reused} reused)"
        f" in {s.prompt_eval_ms:.0f} ms",
        f"image decode {s.image_decode_ms:.0f} ms, encode {s.image_encode_ms:.0f} ms",
        f"{s.completion_tokens} tok at {s.decode_tps:.1f} tok/s",
        f"context {s.context_used}/{s.n_ctx}",
        f"peak rss {s.peak_rss_mb:.0f} MiB",
    ]
    for i, im in enumerate(s.images):
        parts.append(f"image {i + 1}: {im.width}x{im.height} detail {im.detail}, "
                     f"{_tiles(im.tiles)} ({im.encoded} encoded), "
                     f"{im.tokens} tok{', cached' if im.cache_hit else ''}")
    return "stats: " + "; ".join(parts)


def short_line(stats: GenerationStats) -> str:
    """The figures a chat shows under an answer.

    ``ttft 120 ms · image 35 ms (low, 1 tile, 64 tok) · 24.1 tok/s · ctx 412/4096``: the
    image part names the detail, tiles and image tokens of a single image; several images
    show their count and total tokens.
    """
    parts = [f"ttft {stats.ttft_ms:.0f} ms"]
    if stats.images:
        cached = sum(1 for im in stats.images if im.cache_hit)
        if len(stats.images) == 1:
            im = stats.images[0]
            what = [im.detail, _tiles(im.tiles)]
        else:
            what = [f"{len(stats.images)} images"]
        what.append(f"{sum(im.tokens for im in stats.images)} tok")
        if cached == len(stats.images):
            what.append("cached")
        elif cached:
            what.append(f"{cached}/{len(stats.images)} cached")
        parts.append(f"image {stats.image_encode_ms:.0f} ms ({', '.join(what)})")
    tps = stats.decode_tps
    parts.append(f"{tps:.0f} tok/s" if tps >= 100 else f"{tps:.1f} tok/s")
    parts.append(f"ctx {stats.context_used}/{stats.n_ctx}")
    return " · ".join(parts)
