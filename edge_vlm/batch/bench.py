"""The batch benchmark entry: N images x 3 prompts through :func:`~edge_vlm.batch.batch`.

For the benchmark suite (which adds the llama-cpp-python ``MTMDChatHandler`` baseline)::

    from edge_vlm.batch.bench import benchmark, make_shapes_images
    paths = make_shapes_images(tmp_dir, 10)
    result = benchmark(vlm, paths)          # result.images_per_min

or from a shell::

    python -m edge_vlm.batch.bench --n 10 --model M.gguf --mmproj P.gguf --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_vlm.api import VLM

#: Three questions of the shapes world, asked of every image.
BENCH_PROMPTS: tuple[str, ...] = (
    "What shapes are in the image?",
    "How many shapes are there?",
    "Describe the image.",
)


@dataclass(frozen=True)
class BenchmarkResult:
    """One timed batch run."""

    images: int
    prompts: int
    answers: int
    failed: int
    seconds: float
    images_per_min: float
    answers_per_min: float
    image_encodes: int
    """Answers that ran the vision encoder (ideally one per image)."""
    cache_hits: int
    """Answers that reused the image's encoding."""
    image_encode_ms: float
    completion_tokens: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def make_shapes_images(folder: str | os.PathLike[str], n: int, *, seed: int = 0,
                       size: tuple[int, int] = (512, 512)) -> list[Path]:
    """Write ``n`` PNG scenes of the shipped model's shapes world into ``folder``."""
    import random

    from edge_vlm.shipped import import_training

    render, sample_scene = import_training("render").render, import_training("world").sample_scene

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        path = out / f"scene-{i:04d}.png"
        render(sample_scene(rng, size=size)).save(path)
        paths.append(path)
    return paths


def benchmark(vlm: VLM, images: Sequence[str | os.PathLike[str]],
              prompts: Sequence[str] = BENCH_PROMPTS, *, max_tokens: int = 32,
              temperature: float = 0.0, cold: bool = True) -> BenchmarkResult:
    """Time one batch over ``images`` x ``prompts`` (no results file is written).

    Args:
        vlm: The loaded model.
        images: Image paths.
        prompts: Questions asked of every image.
        max_tokens: Most tokens per answer.
        temperature: 0: greedy.
        cold: Empty the KV cache and the embedding cache first, so no image starts encoded.
    """
    from edge_vlm.batch.runner import batch

    if cold:
        vlm.engine.reset()
        vlm.engine.cache.clear()
    answers = failed = encodes = hits = tokens = 0
    encode_ms = 0.0
    t0 = time.perf_counter()
    for r in batch(vlm, list(images), prompts, max_tokens=max_tokens, temperature=temperature):
        answers += 1
        failed += r.status == "error"
        if r.timings is not None:
            encode_ms += r.timings.image_encode_ms
            tokens += r.timings.completion_tokens
            if any(im.cache_hit for im in r.timings.images):
                hits += 1
            else:
                encodes += 1
    seconds = time.perf_counter() - t0
    per_min = 60.0 / seconds if seconds > 0 else 0.0
    return BenchmarkResult(
        images=len(images), prompts=len(prompts), answers=answers, failed=failed,
        seconds=seconds, images_per_min=len(images) * per_min, answers_per_min=answers * per_min,
        image_encodes=encodes, cache_hits=hits, image_encode_ms=encode_ms,
        completion_tokens=tokens,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_vlm.batch.bench``: print images/min of a batch run."""
    import edge_vlm

    ap = argparse.ArgumentParser(prog="python -m edge_vlm.batch.bench",
                                 description="Time edge-vlm batch: N images x 3 prompts.")
    ap.add_argument("--n", type=int, default=10, help="images (generated shapes scenes)")
    ap.add_argument("--images", help="a folder of images to use instead of generated ones")
    ap.add_argument("--model", "-m", default="default")
    ap.add_argument("--mmproj")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated scenes")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp, \
            edge_vlm.load(args.model, args.mmproj, threads=args.threads) as vlm:
        if args.images:
            from edge_vlm.batch.inputs import discover

            paths = [it.path for it in discover([args.images])][: args.n]
        else:
            paths = make_shapes_images(tmp, args.n, seed=args.seed)
        result = benchmark(vlm, paths, max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"{result.images} images x {result.prompts} prompts in {result.seconds:.1f} s: "
              f"{result.images_per_min:.1f} images/min ({result.image_encodes} encodes, "
              f"{result.cache_hits} reuses, {result.failed} failed)")
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
