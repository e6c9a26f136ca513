"""Start-up (issue 17): ``edge-vlm --help``, and the shipped model's first token from a cold
process, wall clock from exec to the first character on stdout.

    python benchmarks/startup.py --reps 5

Targets: ``--help`` under 0.15 s; first token under 1 s. Each run is a fresh process of the
installed ``edge-vlm`` console script (the interpreter start, the imports, the settings, the
model load and the child-process load check as a user meets them); the check's result is
remembered per model pair after its first run, so the first repetition of a new home pays
for it once and is reported apart (``first_run``). Writes
``benchmarks/results/<date>-<cpu>/startup.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import sysinfo  # noqa: E402

SAMPLE = ROOT / "models" / "shapes-vlm" / "samples" / "red-circle-blue-square.png"
QUESTION = "What shapes are in the picture?"


def edge_vlm_command() -> list[str]:
    """The console script next to this interpreter (else ``python -m edge_vlm.cli``)."""
    script = Path(sys.executable).with_name("edge-vlm")
    if script.exists():
        return [str(script)]
    found = shutil.which("edge-vlm")
    return [found] if found else [sys.executable, "-m", "edge_vlm.cli"]


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd``; seconds to its first stdout byte and to its exit, and its peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest = proc.stdout.read()
    err = proc.stderr.read() if proc.stderr is not None else b""
    _, status, usage = os.wait4(proc.pid, 0)
    t_end = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}: {err.decode()[-800:]}")
    return {"first_byte_s": t_first if first else None, "exit_s": t_end,
            "peak_rss_mb": usage.ru_maxrss / 1024.0,
            "output": (first + rest).decode(errors="replace")[:200]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--image", type=Path, default=SAMPLE)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)

    base = edge_vlm_command()
    home = Path(tempfile.mkdtemp(prefix="edge-vlm-startup-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_VLM_")}
    env.update(EDGE_VLM_HOME=str(home / "home"), EDGE_VLM_CONFIG=str(home / "none.toml"),
               XDG_CACHE_HOME=str(home / "cache"))
    # An installed package has its bytecode compiled; a checkout run with this set would
    # compile every module on every start (~0.1 s): let the first run write the caches.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    run = [*base, "run", "--image", str(args.image), "--max-tokens", str(args.max_tokens),
           QUESTION]
    others = sysinfo.others_busy_cores(2.0)
    try:
        first_run = timed(run, env)
        helps = [timed([*base, "--help"], env) for _ in range(args.reps)]
        runs = [timed(run, env) for _ in range(args.reps)]
    finally:
        shutil.rmtree(home, ignore_errors=True)
    help_s = statistics.median(h["exit_s"] for h in helps)
    ttft_s = statistics.median(r["first_byte_s"] for r in runs if r["first_byte_s"])
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": sysinfo.cpu_info(), "others_cores_before": others,
        "command": run, "first_run": first_run, "help": helps, "runs": runs,
        "help_median_s": help_s, "first_token_median_s": ttft_s,
        "targets": {"help_under_0.15_s": help_s < 0.15, "first_token_under_1_s": ttft_s < 1.0},
    }
    out_dir = args.results / f"{dt.date.today().isoformat()}-{sysinfo.cpu_slug(result['cpu'])}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "startup.json").write_text(json.dumps(result, indent=1))
    loaded = others > 0.15
    md = "\n".join([
        "# Start-up", "",
        f"- {result['date']}; {result['cpu']['model_name']}; medians of {args.reps}"
        + (f"; **other processes used {others:.2f} CPUs: not valid results**" if loaded
           else ""), "",
        "| what | median s | target | met |", "|---|---|---|---|",
        f"| `edge-vlm --help` | {help_s:.3f} | < 0.15 | {'yes' if help_s < 0.15 else '**no**'} |",
        f"| `edge-vlm run` (shipped model, {args.image.name}): exec to first character "
        f"| {ttft_s:.3f} | < 1 | {'yes' if ttft_s < 1.0 else '**no**'} |",
        f"| the same, first run of a new home (includes the one-time load check) "
        f"| {first_run['first_byte_s']:.3f} | | |",
        f"| peak RSS of `edge-vlm run` (MB) "
        f"| {statistics.median(r['peak_rss_mb'] for r in runs):.0f} | | |", ""])
    (out_dir / "startup.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
