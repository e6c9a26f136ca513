"""Evaluate ``shapes-vlm`` through the public Python API (llama.cpp underneath).

``python -m shapes_vlm.evaluate [--quant f16 q8_0 q4_k_m] [--variants png jpeg70 ...]``

Fresh scenes are drawn with a seed that training never uses (training derives its scenes
from ``random.Random(seed * 1_000_003 + i)`` with small seeds; evaluation uses
``random.Random(f"eval-{seed}-{i}")``). Every scene gets one question of every type that
applies to it ("What shape is in the image?" only for one-shape scenes), asked in a fresh
single-turn conversation, greedy decoding. The score is exact match of the reply (stripped
of surrounding whitespace) with the canonical answer, per question type and overall.

Variants: ``png`` (sizes with short side 160-480 px and aspect 3:4..4:3, PNG), ``jpeg70``
(the same scenes re-encoded as JPEG quality 70), ``640x360`` and ``300x500`` (non-square
images of exactly that size).

No torch here.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from shapes_vlm import render, world

MODEL_DIR = Path(__file__).resolve().parents[2]  # models/shapes-vlm, beside training/
VARIANTS = ("png", "jpeg70", "640x360", "300x500")
QUANTS = ("f16", "q8_0", "q4_k_m")


def scene_for(seed: int, i: int, variant: str) -> world.Scene:
    rng = random.Random(f"eval-{seed}-{i}")
    if variant in ("640x360", "300x500"):
        w, h = (int(v) for v in variant.split("x"))
        return world.sample_scene(rng, size=(w, h))
    return world.sample_scene(rng)


def questions_for(seed: int, i: int, scene: world.Scene) -> list[world.QA]:
    rng = random.Random(f"eval-q-{seed}-{i}")
    return [
        world.sample_question(rng, scene, t)
        for t in world.QUESTION_TYPES
        if t != "shape" or len(scene.shapes) == 1
    ]


def save_image(scene: world.Scene, variant: str, path: Path) -> str:
    img = render.render(scene)
    if variant == "jpeg70":
        p = path.with_suffix(".jpg")
        img.save(p, format="JPEG", quality=70)
    else:
        p = path.with_suffix(".png")
        img.save(p)
    return str(p)


def ask(vlm: Any, image: str, question: str, max_tokens: int = 48) -> str:
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "text", "text": question},
            ],
        }
    ]
    reply = vlm.chat(msgs, max_tokens=max_tokens, temperature=0)
    return (reply.choices[0].message.content or "").strip()


def evaluate(
    vlm: Any,
    *,
    n_scenes: int = 100,
    seed: int = 7,
    variant: str = "png",
    failures: list | None = None,
) -> dict[str, tuple[int, int]]:
    """Ask every question type about ``n_scenes`` fresh scenes.

    Returns:
        ``{question type: (correct, total)}`` plus an ``"overall"`` entry.
    """
    score: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n_scenes):
            scene = scene_for(seed, i, variant)
            image = save_image(scene, variant, Path(tmp) / f"s{i}")
            for qa in questions_for(seed, i, scene):
                got = ask(vlm, image, qa.question)
                ok = got == qa.answer
                for key in (qa.qtype, "overall"):
                    score[key][0] += ok
                    score[key][1] += 1
                if not ok and failures is not None:
                    failures.append((variant, i, qa.question, qa.answer, got))
    return {k: (v[0], v[1]) for k, v in score.items()}


def format_table(results: dict[str, dict[str, tuple[int, int]]]) -> str:
    """Markdown table: one row per run, one column per question type + overall."""
    cols = [*world.QUESTION_TYPES, "overall"]
    lines = ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, res in results.items():
        cells = []
        for c in cols:
            ok, n = res.get(c, (0, 0))
            cells.append(f"{100 * ok / n:.1f}" if n else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dir", type=Path, default=MODEL_DIR, help="folder with the GGUF files")
    p.add_argument("--quant", nargs="+", default=list(QUANTS), choices=QUANTS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--scenes", type=int, default=100, help="scenes per run (~6.5 questions each)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--show-failures", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    args = p.parse_args(argv)

    import edge_vlm

    results: dict[str, dict[str, tuple[int, int]]] = {}
    for q in args.quant:
        vlm = edge_vlm.load(
            model=str(args.dir / f"model-{q}.gguf"),
            mmproj=str(args.dir / "mmproj-f16.gguf"),
            threads=args.threads,
        )
        try:
            for v in args.variants:
                t = time.time()
                fails: list = []
                res = evaluate(vlm, n_scenes=args.scenes, seed=args.seed, variant=v, failures=fails)
                results[f"{q} {v}"] = res
                ok, n = res["overall"]
                print(
                    f"{q} {v}: {100 * ok / n:.1f}% of {n} ({time.time() - t:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                for f in fails[: args.show_failures]:
                    print("   ", f, file=sys.stderr)
        finally:
            vlm.close()
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
