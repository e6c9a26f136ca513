"""Local batch vs ``edge-vlm batch --ray`` with 1 and 2 workers on the same folder.

    PYTHONPATH=. python benchmarks/batch_ray.py --n 48 --reps 3 --json ray.json

The configurations run interleaved (local, ray x1, ray x2, local, ...) so a machine whose
load changes treats them alike; each is reported as the median of ``--reps`` runs:

* ``wall``: images/min from the call to the last line written, model loading included
  (for Ray: the actors' start and model load; Ray itself is started once, timed apart);
* ``steady``: images/min between the first image's lines and the last one's, i.e. the
  rate a long run settles at;
* Ray's overhead per image: steady seconds per image of ``ray x1`` minus ``local`` (both
  one replica with the same threads).

Every run writes a real results file (fsync per line). ``--writer-lines`` times the driver's
writer alone: typical result lines appended with fsync, lines per second.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edge_vlm.batch import BatchOptions, RayOptions, ResultWriter, run
from edge_vlm.batch.bench import BENCH_PROMPTS, make_shapes_images
from edge_vlm.config import load_settings


def one_run(engine: str, workers: int, paths: list[Path], threads: int, max_tokens: int,
            out: Path) -> dict[str, float]:
    settings = load_settings({"runtime.threads": threads})
    ray = RayOptions(workers=workers, threads_per_worker=threads) if engine == "ray" else None
    t0 = time.perf_counter()
    done: list[float] = []
    for r in run(paths, BENCH_PROMPTS, settings=settings, out=out, engine=engine,  # type: ignore[arg-type]
                 options=BatchOptions(max_tokens=max_tokens, temperature=0), ray=ray):
        if r.status == "error":
            raise SystemExit(f"{r.path}: {r.error}")
        if r.last_for_image:
            done.append(time.perf_counter())
    end = time.perf_counter()
    n = len(paths)
    steady = (n - 1) / (done[-1] - done[0]) * 60.0 if n > 1 and done[-1] > done[0] else 0.0
    return {"wall_images_per_min": n / (end - t0) * 60.0, "steady_images_per_min": steady,
            "seconds": end - t0}


def writer_rate(folder: Path, n: int) -> float:
    """Lines per second of the driver's writer (fsync per line), typical 600-byte lines."""
    record = {"path": "photos/2026/IMG_0001.jpg", "image_sha256": "a" * 64,
              "prompt": "Describe the image.", "prompt_index": 0,
              "answer": "A red circle above a blue square on a white background. " * 3,
              "finish_reason": "stop", "usage": {"prompt_tokens": 90, "completion_tokens": 40,
                                                  "total_tokens": 130},
              "timings": None, "model": "smolvlm-500m", "settings": "0" * 16, "key": "k" * 32,
              "error": None}
    with ResultWriter.open(folder / "writer.jsonl", overwrite=True) as w:
        t0 = time.perf_counter()
        for _ in range(n):
            w.write(record)
        return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=48, help="images (generated shapes scenes)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads per replica")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--writer-lines", type=int, default=2000)
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args(argv)

    import ray

    configs = [("local", "local", 1), ("ray x1", "ray", 1), ("ray x2", "ray", 2)]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = make_shapes_images(folder / "imgs", args.n)
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=2 * args.threads + 1, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR)
        ray_start = time.perf_counter() - t0
        try:
            for rep in range(args.reps):
                for name, engine, workers in configs:
                    out = folder / f"{engine}-{workers}-{rep}.jsonl"
                    result = one_run(engine, workers, paths, args.threads, args.max_tokens, out)
                    runs[name].append(result)
                    print(f"rep {rep + 1} {name:7s} {result['wall_images_per_min']:8.1f} "
                          f"images/min wall, {result['steady_images_per_min']:8.1f} steady",
                          file=sys.stderr)
        finally:
            ray.shutdown()
        lines_per_s = writer_rate(folder, args.writer_lines)

    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for name, rs in runs.items()}
    per_image = {name: 60.0 / m["steady_images_per_min"] for name, m in med.items()}
    report: dict[str, Any] = {
        "images": args.n, "prompts": len(BENCH_PROMPTS), "reps": args.reps,
        "threads_per_replica": args.threads, "max_tokens": args.max_tokens,
        "ray_start_s": ray_start, "medians": med, "runs": runs,
        "ray_overhead_s_per_image": per_image["ray x1"] - per_image["local"],
        "writer_lines_per_s_fsync": lines_per_s,
    }
    print("| | local | ray x1 | ray x2 |\n|---|---|---|---|")
    for key, label in (("wall_images_per_min", "images/min (wall, load included)"),
                       ("steady_images_per_min", "images/min (steady)")):
        print(f"| {label} | " + " | ".join(f"{med[n][key]:.1f}" for n, _, _ in configs) + " |")
    print(f"\nRay start-up {ray_start:.1f} s (once); Ray's overhead per image "
          f"{report['ray_overhead_s_per_image'] * 1000:.0f} ms (steady, x1 vs local); "
          f"driver writer {lines_per_s:.0f} lines/s with fsync")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
