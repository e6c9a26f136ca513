"""Where decode time goes: llama.cpp's token loop on two model sizes, one and two threads.

    python benchmarks/decode_scaling.py --like smolvlm-256m smolvlm-500m --quant Q8_0 --reps 5

The issue-4 target "decode at 70% of the memory-bandwidth bound" is a statement about
llama.cpp's CPU backend, which edge-vlm and ``llama-mtmd-cli`` share (the suite measures them
within a few percent of each other). This script measures that backend directly, text only,
with the context the suite's scenario (a) has (~1170 tokens), and answers two questions:

- **Is decode memory-bound here?** If it were, one thread (whose copy bandwidth is nearly
  that of two on small machines) would decode about as fast as two.
- **What is fixed per token?** With two model sizes, ``seconds/token = c + bytes/B``: ``c`` is
  the per-token cost that does not depend on the weights (graph build, ~1,300 graph nodes with
  a thread barrier each, logits), ``B`` the bandwidth the weights are actually streamed at.

Prints a Markdown table; ``--json`` also writes the raw numbers. Random prompt tokens, greedy;
llama.cpp's own low-level API (no sampling chain), so nothing but the model's forward is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sysinfo

HERE = Path(__file__).resolve().parent
_QUIET: Any = None


def decode_speed(model: Any, threads: int, n_prompt: int, n_gen: int) -> float:
    """Tokens/s of ``n_gen`` single-token decodes after an ``n_prompt``-token prompt."""
    import llama_cpp
    import numpy as np

    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 2048, 512, 512
    cp.n_threads, cp.n_threads_batch = threads, 2
    ctx = llama_cpp.llama_init_from_model(model, cp)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    try:
        tokens = [(i * 7919) % (n_vocab - 200) + 100 for i in range(n_prompt)]
        pos = 0
        for start in range(0, n_prompt, 512):
            part = tokens[start : start + 512]
            batch.n_tokens = len(part)
            for j, tok in enumerate(part):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = tok, pos + j, 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = start + j == n_prompt - 1
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed on the prompt")
            pos += len(part)
        tok = tokens[-1]
        t0 = time.perf_counter()
        for _ in range(n_gen):
            batch.n_tokens = 1
            batch.token[0], batch.pos[0], batch.n_seq_id[0] = tok, pos, 1
            batch.seq_id[0][0], batch.logits[0] = 0, True
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed while generating")
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, 0), (n_vocab,))
            tok = int(logits.argmax())
            pos += 1
        return n_gen / (time.perf_counter() - t0)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--like", nargs=2, default=["smolvlm-256m", "smolvlm-500m"],
                    help="two shape-alike models (benchmarks/make_models.py)")
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--models-dir", type=Path, default=HERE / "models")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=1170, help="context before decoding")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import llama_cpp

    global _QUIET  # ctypes must keep the callback alive for as long as llama.cpp may call it
    _QUIET = llama_cpp.llama_log_callback(lambda *a: None)
    llama_cpp.llama_log_set(_QUIET, None)
    llama_cpp.llama_backend_init()
    paths = [args.models_dir / f"{like}-{args.quant}" / "model.gguf" for like in args.like]
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"missing {', '.join(map(str, missing))}: make them with "
              f"python benchmarks/make_models.py --like NAME --quant {args.quant} --out DIR",
              file=sys.stderr)
        return 2
    bw = sysinfo.copy_bandwidth(2)
    rows: list[dict[str, Any]] = []
    for path in paths:
        info = sysinfo.model_bytes(path)
        per_token = info["weight_bytes"] + info["kv_bytes_per_ctx_token"] * args.prompt
        model = llama_cpp.llama_model_load_from_file(
            str(path).encode(), llama_cpp.llama_model_default_params())
        speeds: dict[int, list[float]] = {1: [], 2: []}
        for rep in range(args.reps):
            for threads in (2, 1):  # interleaved, so drift hits both alike
                speeds[threads].append(decode_speed(model, threads, args.prompt, args.tokens))
            print(f"{path.parent.name} rep {rep + 1}/{args.reps}: "
                  f"{speeds[2][-1]:.1f} / {speeds[1][-1]:.1f} tok/s (2 / 1 threads)",
                  file=sys.stderr, flush=True)
        llama_cpp.llama_model_free(model)
        rows.append({"model": path.parent.name, "bytes_per_token": per_token,
                     "two": statistics.median(speeds[2]), "one": statistics.median(speeds[1]),
                     "raw": speeds})
    (a, b) = rows
    # seconds/token = c + bytes / B, through the two models' two-thread medians
    slope = (1 / b["two"] - 1 / a["two"]) / (b["bytes_per_token"] - a["bytes_per_token"])
    fixed = 1 / a["two"] - slope * a["bytes_per_token"]
    print(f"\ncopy bandwidth (numpy, two threads): {bw / 1e9:.1f} GB/s; medians of {args.reps}; "
          f"{args.tokens} tokens after {args.prompt}\n")
    print("| model | MB read per token | decode tok/s, 2 threads | 1 thread | 2 / 1 "
          "| % of bandwidth bound (2 threads) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['bytes_per_token'] / 1e6:.0f} | {r['two']:.1f} | "
              f"{r['one']:.1f} | {r['two'] / r['one']:.2f} | "
              f"{100 * r['two'] * r['bytes_per_token'] / bw:.0f}% |")
    print(f"\nfit seconds/token = c + bytes/B: c = {fixed * 1e3:.1f} ms per token, "
          f"B = {1 / slope / 1e9:.1f} GB/s ({100 / slope / bw:.0f}% of copy bandwidth)")
    if args.json:
        args.json.write_text(json.dumps({"bandwidth": bw, "rows": rows, "fixed_s": fixed,
                                         "stream_bytes_s": 1 / slope}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
