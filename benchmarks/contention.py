"""Speed that holds under load (issue 17): the same request on an idle machine, with one busy
core and with two, for edge-vlm and the two anchors; and two edge-vlm processes at once
against one after the other.

    python benchmarks/contention.py --like smolvlm-256m --quant Q8_0 --reps 3

The busy cores are ``yes > /dev/null`` processes this script starts before a measurement
and stops after it (they are its children; nothing else is touched). Every measurement is
one fresh worker process (``worker.py``), as in the main suite, so peak RSS is per process.

Systems (``--systems``):

- ``edge``: edge-vlm as shipped (``runtime.threads`` unset: it follows the load);
- ``edge-t1``, ``edge-t2``: edge-vlm with ``threads`` fixed at 1 and 2 (the references of
  the targets: its idle single-thread speed, the better of the two thread counts);
- ``cli``: ``llama-mtmd-cli -t 0`` (every hardware thread: its default on a machine without
  SMT siblings);
- ``handler``: llama-cpp-python's ``Llama`` + ``MTMDChatHandler``, its default threads.

edge-vlm answers at ``--detail`` (default ``low``: one tile, where thread choice matters
most and a run is short); the anchors always tile fully, so compare their decode speed,
not their time to first token. ``--omp passive`` / ``--omp 20000`` run the edge-vlm workers
with ``OMP_WAIT_POLICY=passive`` / ``GOMP_SPINCOUNT=20000`` (``--omp default``: libgomp's
own 300,000 spins), to compare how llama.cpp's waiting threads behave.

Writes ``benchmarks/results/<date>-<cpu>/contention-<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sysinfo  # noqa: E402
from inputs import make_inputs  # noqa: E402
from mtmd_cli import default_cli_path  # noqa: E402

SYSTEMS = {
    "edge": ("edge", 0, "edge-vlm (follows the load)"),
    "edge-t1": ("edge", 1, "edge-vlm, threads=1"),
    "edge-t2": ("edge", 2, "edge-vlm, threads=2"),
    "cli": ("cli", 0, "llama-mtmd-cli (-t 0)"),
    "handler": ("handler", 0, "MTMDChatHandler (default threads)"),
}
OMP = {
    "builtin": {},
    "default": {"GOMP_SPINCOUNT": "300000"},
    "passive": {"OMP_WAIT_POLICY": "passive"},
}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class BusyCores:
    """``n`` busy-looping ``yes`` processes while the block runs."""

    def __init__(self, n: int, settle_s: float = 1.0) -> None:
        self.n = n
        self.settle_s = settle_s
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> BusyCores:
        self.procs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
                      for _ in range(self.n)]
        if self.n:
            time.sleep(self.settle_s)  # let the scheduler see them as steady load
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait()
        self.procs = []


def worker_cmd(args: argparse.Namespace, system: str, model: Path, mmproj: Path,
               inputs: Path, out: Path, cli: Path | None) -> list[str]:
    kind, threads, _ = SYSTEMS[system]
    scenario = {"edge": f"a-{args.detail}" if args.detail != "high" else "a"}.get(kind, "a")
    cmd = [sys.executable, str(HERE / "worker.py"), "--system", kind, "--scenario", scenario,
           "--model", str(model), "--mmproj", str(mmproj), "--inputs", str(inputs),
           "--out", str(out), "--threads", str(threads), "--n-ctx", str(args.n_ctx),
           "--max-tokens", str(args.max_tokens)]
    if cli is not None:
        cmd += ["--cli", str(cli)]
    return cmd


def worker_env(system: str, omp: str) -> dict[str, str]:
    env = dict(os.environ)
    if SYSTEMS[system][0] == "edge":
        env.update(OMP.get(omp, {"GOMP_SPINCOUNT": omp}))
    return env


def finish(proc: subprocess.Popen[bytes], out: Path, t0: float, busy0: float) -> dict[str, Any]:
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not out.exists():
        return {"error": f"worker exited with {code}", "wall_s": wall}
    r: dict[str, Any] = json.loads(out.read_text())
    r.setdefault("peak_rss_mb", usage.ru_maxrss / 1024.0)
    r["wall_s"] = wall
    r["worker_cpu_cores"] = (usage.ru_utime + usage.ru_stime) / wall
    r["machine_busy_cores"] = (sysinfo.cpu_busy_seconds() - busy0) / wall
    r["error"] = None
    return r


def run_one(args: argparse.Namespace, system: str, *paths: Any) -> dict[str, Any]:
    model, mmproj, inputs, out, cli = paths
    out.unlink(missing_ok=True)
    busy0 = sysinfo.cpu_busy_seconds()
    t0 = time.perf_counter()
    proc = subprocess.Popen(worker_cmd(args, system, model, mmproj, inputs, out, cli),
                            env=worker_env(system, args.omp))
    return finish(proc, out, t0, busy0)


def run_pair(args: argparse.Namespace, model: Path, mmproj: Path, inputs: Path,
             scratch: Path) -> dict[str, Any]:
    """Two edge-vlm workers (defaults) started together, then the same two one by one."""
    outs = [scratch / "pair-0.json", scratch / "pair-1.json"]
    for o in outs:
        o.unlink(missing_ok=True)
    busy0 = sysinfo.cpu_busy_seconds()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(worker_cmd(args, "edge", model, mmproj, inputs, o, None),
                              env=worker_env("edge", args.omp)) for o in outs]
    together = [finish(p, o, t0, busy0) for p, o in zip(procs, outs, strict=True)]
    span_together = time.perf_counter() - t0
    t1 = time.perf_counter()
    apart = [run_one(args, "edge", model, mmproj, inputs, o, None) for o in outs]
    span_apart = time.perf_counter() - t1
    return {"together": together, "apart": apart, "span_together_s": span_together,
            "span_apart_s": span_apart}


def headline(r: dict[str, Any]) -> dict[str, Any]:
    req = (r.get("requests") or {}).get("main") or {}
    return {"ttft_ms": req.get("ttft_ms"), "decode_tps": req.get("decode_tps"),
            "total_ms": req.get("total_ms"), "peak_rss_mb": r.get("peak_rss_mb"),
            "threads_at_end": req.get("threads_at_end"),
            "others_cores_seen": req.get("others_cores_seen")}


def med(values: list[Any]) -> float | None:
    vals = [v for v in values if isinstance(v, int | float)]
    return statistics.median(vals) if vals else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for load in sorted({r["busy"] for r in runs}):
        for system in SYSTEMS:
            group = [headline(r) for r in runs
                     if r["busy"] == load and r["system"] == system and not r.get("error")]
            if group:
                row = {k: med([g[k] for g in group])
                       for k in ("ttft_ms", "decode_tps", "total_ms", "peak_rss_mb")}
                row["threads_at_end"] = [g["threads_at_end"] for g in group]
                row["reps"] = len(group)
                out.setdefault(str(load), {})[system] = row
    return out


def targets(summary: dict[str, Any], pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def fig(load: int, system: str, key: str) -> float | None:
        v = summary.get(str(load), {}).get(system, {}).get(key)
        return v if isinstance(v, int | float) else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: float, higher: bool = True) -> None:
        met = None if value is None else (value >= goal if higher else value <= goal)
        rows.append({"target": name, "value": value, "goal": goal,
                     "higher_is_better": higher, "met": met})

    add("one busy core: decode / idle single-thread decode (edge-vlm)",
        ratio(fig(1, "edge", "decode_tps"), fig(0, "edge-t1", "decode_tps")), 0.8)
    add("one busy core: decode, edge-vlm / llama-mtmd-cli",
        ratio(fig(1, "edge", "decode_tps"), fig(1, "cli", "decode_tps")), 2.0)
    best = [v for v in (fig(1, "edge-t1", "ttft_ms"), fig(1, "edge-t2", "ttft_ms")) if v]
    add("one busy core: TTFT / the better of threads=1 and threads=2",
        ratio(fig(1, "edge", "ttft_ms"), min(best) if best else None), 1.3, higher=False)
    add("idle: TTFT / threads=2 TTFT (unchanged: ~1)",
        ratio(fig(0, "edge", "ttft_ms"), fig(0, "edge-t2", "ttft_ms")), 1.05, higher=False)
    add("idle: decode / threads=2 decode (unchanged: ~1)",
        ratio(fig(0, "edge", "decode_tps"), fig(0, "edge-t2", "decode_tps")), 0.95)
    if pairs:
        add("two processes at once: time for both / one after the other",
            med([p["span_together_s"] / p["span_apart_s"] for p in pairs]), 1.0, higher=False)
    return rows


def markdown(meta: dict[str, Any], summary: dict[str, Any], pairs: list[dict[str, Any]],
             tgt: list[dict[str, Any]]) -> str:
    def s(ms: Any) -> str:
        return "–" if ms is None else f"{ms / 1000:.2f}"

    def f(x: Any, fmt: str = "{:.1f}") -> str:
        return "–" if x is None else fmt.format(x)

    lines = [f"# Contention: {meta['model_label']}", "",
             f"- {meta['date']}; {meta['cpu']['model_name']}, {meta['cpu']['logical_cpus']} "
             f"logical CPUs; {meta['args']['reps']} repetition(s), medians; edge-vlm at "
             f"detail={meta['args']['detail']}, {meta['args']['max_tokens']} tokens; "
             f"OpenMP waits for edge-vlm: {meta['args']['omp']}",
             f"- machine before the suite: other processes used "
             f"{meta['others_cores_start']:.2f} CPUs" + (" (**not idle: figures are not valid "
                                                         "results**)" if meta[
                 'others_cores_start'] > 0.15 else ""),
             "", "| busy cores | system | TTFT s | decode tok/s | total s | threads "
             "(llama, vision) at the end | peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for load, row in summary.items():
        for system, fig in row.items():
            lines.append(f"| {load} | {SYSTEMS[system][2]} | {s(fig['ttft_ms'])} "
                         f"| {f(fig['decode_tps'])} | {s(fig['total_ms'])} "
                         f"| {fig['threads_at_end'] if SYSTEMS[system][0] == 'edge' else ''} "
                         f"| {f(fig['peak_rss_mb'], '{:.0f}')} |")
    if pairs:
        lines += ["", "Two edge-vlm processes (defaults), same request:", "",
                  "| rep | together: span s | TTFTs s | decode tok/s | one after the other: "
                  "span s | TTFTs s | decode tok/s |", "|---|---|---|---|---|---|---|"]
        for i, p in enumerate(pairs):
            tog = [headline(r) for r in p["together"]]
            apa = [headline(r) for r in p["apart"]]
            lines.append(
                f"| {i + 1} | {p['span_together_s']:.1f} | "
                f"{', '.join(s(h['ttft_ms']) for h in tog)} | "
                f"{', '.join(f(h['decode_tps']) for h in tog)} | {p['span_apart_s']:.1f} | "
                f"{', '.join(s(h['ttft_ms']) for h in apa)} | "
                f"{', '.join(f(h['decode_tps']) for h in apa)} |")
    lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    for t in tgt:
        op = "≥" if t["higher_is_better"] else "≤"
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {f(t['value'], '{:.3f}')} | {op} {t['goal']:.3g} "
                     f"| {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--like", default="smolvlm-256m",
                    choices=("smolvlm-256m", "smolvlm-500m", "tiny-idefics3"))
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--mmproj", type=Path)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--busy", default="0,1,2", help="busy cores to measure under")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--pair", action=argparse.BooleanOptionalAction, default=True,
                    help="also two edge-vlm processes at once vs one after the other")
    ap.add_argument("--detail", default="low", choices=("low", "auto", "high"))
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--omp", default="builtin",
                    help="edge-vlm's OpenMP waiting: builtin (its own choice), default "
                         "(libgomp's), passive, or a GOMP_SPINCOUNT number")
    ap.add_argument("--cli", type=Path)
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--label")
    args = ap.parse_args(argv)

    systems = [s for s in args.systems.split(",") if s]
    for s in systems:
        if s not in SYSTEMS:
            raise SystemExit(f"unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
    cli = args.cli or default_cli_path()
    if "cli" in systems and cli is None:
        say("llama-mtmd-cli is not built (bash benchmarks/build_mtmd_cli.sh): skipping it")
        systems.remove("cli")
    if args.model:
        model, mmproj, label = args.model, args.mmproj, args.label or args.model.parent.name
    else:
        folder = HERE / "models" / f"{args.like}-{args.quant}"
        model, mmproj = folder / "model.gguf", folder / "mmproj.gguf"
        if not model.exists():
            subprocess.run([sys.executable, str(HERE / "make_models.py"), "--like", args.like,
                            "--quant", args.quant, "--out", str(folder)], check=True)
        label = args.label or f"{args.like}-{args.quant}"
    cpu = sysinfo.cpu_info()
    out_dir = args.results / f"{dt.date.today().isoformat()}-{sysinfo.cpu_slug(cpu)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = HERE / ".cache" / "inputs"
    make_inputs(inputs, batch_images=1)
    scratch = out_dir / f".contention-{label}"
    scratch.mkdir(exist_ok=True)
    others = sysinfo.others_busy_cores(2.0)
    if others > 0.15:
        say(f"WARNING: other processes use {others:.2f} CPUs: these are not valid results")
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "model_label": label,
            "cpu": cpu, "args": {k: str(v) if isinstance(v, Path) else v
                                 for k, v in vars(args).items()},
            "others_cores_start": others}
    runs: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    loads = [int(x) for x in args.busy.split(",") if x]
    for rep in range(args.reps):
        for n_busy in loads:
            shift = rep % len(systems)
            for system in systems[shift:] + systems[:shift]:
                with BusyCores(n_busy):
                    r = run_one(args, system, model, mmproj, inputs,
                                scratch / f"{system}.json", cli)
                r.update(rep=rep, busy=n_busy, system=system)
                runs.append(r)
                h = headline(r)
                say(f"rep {rep + 1} busy {n_busy} {SYSTEMS[system][2]}: " + (
                    f"FAILED {r['error']}" if r.get("error") else
                    f"TTFT {(h['ttft_ms'] or 0) / 1000:.2f} s, decode "
                    f"{h['decode_tps'] or 0:.1f} tok/s, threads {h['threads_at_end']}, "
                    f"RSS {h['peak_rss_mb'] or 0:.0f} MB"))
        if args.pair:
            p = run_pair(args, model, mmproj, inputs, scratch)
            pairs.append(p)
            say(f"rep {rep + 1} two edge-vlm processes: together {p['span_together_s']:.1f} s, "
                f"one after the other {p['span_apart_s']:.1f} s")
    summary = summarize(runs)
    tgt = targets(summary, pairs)
    result = {"meta": meta, "summary": summary, "targets": tgt, "runs": runs, "pairs": pairs}
    stem = f"contention-{label}" + ("" if args.omp == "builtin" else f"-omp-{args.omp}")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    md = markdown(meta, summary, pairs, tgt)
    (out_dir / f"{stem}.md").write_text(md)
    for f in scratch.glob("*.json"):
        f.unlink()
    scratch.rmdir()
    print(md)
    say(f"wrote {out_dir / stem}.json and .md")
    return 0 if all(not r.get("error") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
