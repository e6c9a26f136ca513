"""The benchmark suite: every scenario, three systems, interleaved, ``--reps`` repetitions.

    python benchmarks/run.py --like smolvlm-256m --quant Q8_0 --reps 3

(see benchmarks/README.md). Each (repetition, scenario, system) runs in a fresh worker
process (benchmarks/worker.py), so every system starts cold and its peak RSS is its own;
the order of the systems rotates from one repetition to the next. Writes
``benchmarks/results/<date>-<cpu>/<model>.json`` (every request of every run, the machine,
the medians, same-run ratios and targets), ``<model>.md`` (the tables) and ``<model>.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
import sysinfo  # noqa: E402
from inputs import make_inputs  # noqa: E402
from mtmd_cli import default_cli_path  # noqa: E402
from scenarios import SCENARIOS, SYSTEM_NAMES, SYSTEMS  # noqa: E402


def _clock() -> str:
    return time.strftime("%H:%M:%S")


def say(msg: str) -> None:
    print(f"[{_clock()}] {msg}", flush=True)


def resolve_models(args: argparse.Namespace) -> tuple[Path, Path, str]:
    """The model pair to measure, generating a shape-alike pair on first use."""
    if args.model:
        if not args.mmproj:
            raise SystemExit("--model needs --mmproj")
        return args.model, args.mmproj, args.label or args.model.parent.name
    if not args.like:
        raise SystemExit("give --like (and --quant) or --model and --mmproj")
    folder = HERE / "models" / f"{args.like}-{args.quant}"
    model, mmproj = folder / "model.gguf", folder / "mmproj.gguf"
    if not (model.exists() and mmproj.exists()):
        say(f"generating the {args.like} {args.quant} shape-alike model into {folder}")
        subprocess.run([sys.executable, str(HERE / "make_models.py"), "--like", args.like,
                        "--quant", args.quant, "--out", str(folder)], check=True)
    return model, mmproj, args.label or f"{args.like}-{args.quant}"


def run_worker(args: argparse.Namespace, system: str, scenario: str, model: Path,
               mmproj: Path, inputs_dir: Path, cli: Path | None,
               out_file: Path) -> dict[str, Any]:
    """One worker process; returns its result with wall time and peak RSS."""
    cmd = [sys.executable, str(HERE / "worker.py"), "--system", system, "--scenario", scenario,
           "--model", str(model), "--mmproj", str(mmproj), "--inputs", str(inputs_dir),
           "--out", str(out_file), "--threads", str(args.threads), "--n-ctx", str(args.n_ctx),
           "--max-tokens", str(args.max_tokens), "--batch-images", str(args.batch_images),
           "--batch-max-tokens", str(args.batch_max_tokens),
           "--edge-flash-attn", args.edge_flash_attn,
           "--handler-flash-attn", args.handler_flash_attn]
    if cli is not None:
        cmd += ["--cli", str(cli)]
    out_file.unlink(missing_ok=True)
    load_before = sysinfo.load_average()
    competing = sysinfo.competing_processes()
    busy0 = sysinfo.cpu_busy_seconds()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    # CPU time of everything else while the worker ran: all busy time minus the worker's
    # (its rusage includes the llama-mtmd-cli it waited for).
    mine = usage.ru_utime + usage.ru_stime
    others = max(0.0, sysinfo.cpu_busy_seconds() - busy0 - mine) / wall
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not out_file.exists():
        return {"system": system, "scenario": scenario, "error": f"worker exited with {code}",
                "wall_s": wall}
    result: dict[str, Any] = json.loads(out_file.read_text())
    result["wall_s"] = wall
    result.setdefault("peak_rss_mb", usage.ru_maxrss / 1024.0)  # the CLI reports its own
    result["load_avg_before"] = load_before
    result["load_avg_after"] = sysinfo.load_average()
    result["worker_cpu_cores"] = mine / wall
    result["others_cpu_cores"] = others
    competing += sysinfo.competing_processes()
    result["under_load"] = bool(competing) or others > OTHERS_LIMIT
    result["error"] = None
    return result


#: Other processes using more than this many CPUs during a measurement: "under load".
OTHERS_LIMIT = 0.15


def wait_idle(max_s: float) -> None:
    """Wait (at most ``max_s``) until other processes leave the CPUs alone."""
    t0 = time.perf_counter()
    announced = False
    while time.perf_counter() - t0 < max_s:
        others = sysinfo.others_busy_cores(5.0)
        if others < OTHERS_LIMIT:
            return
        if not announced:
            say(f"waiting up to {max_s / 60:.0f} min for the CPUs to be free (other "
                f"processes use {others:.1f} CPUs)")
            announced = True
    say("still busy: measuring anyway (marked as under load)")


def write_results(result: dict[str, Any], out_dir: Path, label: str) -> list[Path]:
    """The JSON, Markdown and PNG files of one suite."""
    meta, summary = result["meta"], result["summary"]
    json_path = out_dir / f"{label}.json"
    json_path.write_text(json.dumps(result, indent=1))
    md_path = out_dir / f"{label}.md"
    md_path.write_text(report.markdown(meta, summary, result["ratios"], result["targets"]))
    cpu = meta["cpu"]
    png = report.chart(summary, out_dir / f"{label}.png",
                       f"{label} on {cpu['model_name']} ({cpu['logical_cpus']} CPUs), "
                       f"{meta['args']['threads']} threads, medians of {meta['args']['reps']}"
                       + (" (under load)" if meta.get("under_load") else ""))
    return [json_path, md_path] + ([png] if png else [])


def render(json_path: Path) -> int:
    """Recompute the summary, ratios, targets, table and chart of a results JSON."""
    result = json.loads(json_path.read_text())
    runs = result["runs"]
    result["summary"] = report.summarize(runs)
    report.note_load(result["meta"], runs, result.get("discarded_under_load", []),
                     result["summary"], OTHERS_LIMIT)
    result["ratios"] = report.ratios(runs)
    result["targets"] = report.targets(result["summary"], result["ratios"], result["meta"])
    files = write_results(result, json_path.parent, json_path.stem)
    say("rewrote " + ", ".join(str(f) for f in files))
    return 0


def progress_line(rep: int, reps: int, r: dict[str, Any]) -> str:
    head = f"rep {rep + 1}/{reps} ({r['scenario']}) {SYSTEM_NAMES[r['system']]}:"
    if r.get("error"):
        return f"{head} FAILED: {r['error']}"
    h = report.headline(r)
    if r["scenario"] == "batch":
        body = (f"{h['images_per_min']:.2f} images/min ({h['answers']} answers in "
                f"{h['seconds']:.1f} s)")
    else:
        body = (f"TTFT {h.get('ttft_ms', 0) / 1000:.2f} s "
                f"(encode {h.get('encode_ms', 0) / 1000:.2f} s in {h.get('passes', 0):.0f} "
                f"passes, prefill {h.get('prefill_ms', 0) / 1000:.2f} s), "
                f"decode {h.get('decode_tps', 0):.1f} tok/s over "
                f"{h.get('completion_tokens', 0):.0f}")
        if "cold_ttft_ms" in h:
            body += f"; cold TTFT {h['cold_ttft_ms'] / 1000:.2f} s"
    load = (f"; UNDER LOAD (others used {r['others_cpu_cores']:.2f} CPUs)"
            if r.get("under_load") else "")
    return f"{head} {body}; RSS {r['peak_rss_mb']:.0f} MB [{r['wall_s']:.0f} s]{load}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="edge-vlm benchmark suite (issue 4, 8, 9).")
    src = ap.add_argument_group("model")
    src.add_argument("--like", choices=("smolvlm-256m", "smolvlm-500m", "tiny-idefics3",
                                        "qwen2.5-vl-3b", "gemma-3-4b"),
                     help="generate (once) and measure a shape-alike model")
    src.add_argument("--quant", default="Q8_0", choices=("F16", "Q8_0", "Q4_0", "Q4_K"))
    src.add_argument("--model", type=Path, help="or: a text model GGUF ...")
    src.add_argument("--mmproj", type=Path, help="... and its mmproj")
    src.add_argument("--label", help="name of the results files (default: from the model)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-images", type=int, default=3)
    ap.add_argument("--batch-max-tokens", type=int, default=32)
    ap.add_argument("--edge-flash-attn", default="auto", choices=("auto", "on", "off"),
                    help="edge-vlm's flash_attn (default: its own default, auto)")
    ap.add_argument("--handler-flash-attn", default="off", choices=("on", "off"),
                    help="Llama(flash_attn=...) (default: llama-cpp-python's default, off)")
    ap.add_argument("--cli", type=Path, help="llama-mtmd-cli (default: the one "
                    "build_mtmd_cli.sh built under benchmarks/.cache)")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--note", default="", help="free text stored with the results")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each measurement, wait up to this long for other CPU-heavy "
                         "work (the shipped model's training, a high load) to finish")
    ap.add_argument("--retry-loaded", type=int, default=0, metavar="N",
                    help="redo a measurement up to N times when other processes used the "
                         "CPUs while it ran (the discarded ones stay in the JSON)")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only rebuild the tables and chart of an earlier results JSON")
    args = ap.parse_args(argv)
    if args.render:
        return render(args.render)

    scenarios = [s for s in args.scenarios.split(",") if s]
    systems = [s for s in args.systems.split(",") if s]
    for s in scenarios:
        if s not in SCENARIOS:
            raise SystemExit(f"unknown scenario {s!r}")
    cli = args.cli or default_cli_path()
    if "cli" in systems and cli is None:
        say("llama-mtmd-cli is not built (bash benchmarks/build_mtmd_cli.sh): "
            "skipping its column")
        systems.remove("cli")

    model, mmproj, label = resolve_models(args)
    cpu = sysinfo.cpu_info()
    date = dt.date.today().isoformat()
    out_dir = args.results / f"{date}-{sysinfo.cpu_slug(cpu)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs_dir = HERE / ".cache" / "inputs"
    make_inputs(inputs_dir, batch_images=args.batch_images)
    scratch = out_dir / f".{label}-workers"
    scratch.mkdir(exist_ok=True)

    if args.wait_idle:
        wait_idle(args.wait_idle)
    competing = sysinfo.competing_processes()
    say("measuring memory copy bandwidth...")
    # In a child process: the workers forked later must not inherit a large parent RSS.
    bandwidth = json.loads(subprocess.run(
        [sys.executable, "-c", "import json, sysinfo; print(json.dumps({"
         "'one_thread_bytes_s': sysinfo.copy_bandwidth(1), "
         "'two_threads_bytes_s': sysinfo.copy_bandwidth(2)}))"],
        cwd=HERE, check=True, capture_output=True, text=True).stdout)
    bandwidth["others_cpu_cores"] = sysinfo.others_busy_cores(2.0)
    say(f"  {bandwidth['one_thread_bytes_s'] / 1e9:.1f} GB/s one thread, "
        f"{bandwidth['two_threads_bytes_s'] / 1e9:.1f} GB/s two threads")
    from importlib.metadata import version

    meta: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "model_label": label,
        "model_path": str(model), "mmproj_path": str(mmproj),
        "model": sysinfo.model_bytes(model), "mmproj_bytes": mmproj.stat().st_size,
        "cpu": cpu, "bandwidth": bandwidth, "cli": str(cli) if cli else None,
        "versions": {"llama_cpp_python": version("llama-cpp-python"),
                     "edge_vlm": version("edge-vlm"), "python": sys.version.split()[0]},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "systems": systems, "scenarios": scenarios, "note": args.note,
        "load_avg_start": sysinfo.load_average(),
    }
    if competing and not args.wait_idle:
        say(f"WARNING: other CPU work is running, results are measured under load: {competing}")

    runs: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []  # measurements redone because of other CPU work
    t_suite = time.perf_counter()
    for rep in range(args.reps):
        for scenario in scenarios:
            order = [s for s in systems if s in SCENARIOS[scenario].systems]
            shift = rep % len(order) if order else 0
            for system in order[shift:] + order[:shift]:
                if args.wait_idle:
                    wait_idle(args.wait_idle)
                say(f"rep {rep + 1}/{args.reps} ({scenario}) {SCENARIOS[scenario].title}: "
                    f"{SYSTEM_NAMES[system]}...")
                for attempt in range(args.retry_loaded + 1):
                    r = run_worker(args, system, scenario, model, mmproj, inputs_dir, cli,
                                   scratch / f"{rep}-{scenario}-{system}.json")
                    r["rep"] = rep
                    say(progress_line(rep, args.reps, r))
                    if not r.get("under_load") or attempt == args.retry_loaded:
                        break
                    discarded.append(r)
                    say("  measured under load: measuring again")
                    if args.wait_idle:
                        wait_idle(args.wait_idle)
                runs.append(r)
    meta["load_avg_end"] = sysinfo.load_average()
    meta["suite_s"] = time.perf_counter() - t_suite
    meta["batch_via"] = {r["system"]: r["requests"]["main"].get("via") for r in runs
                         if r["scenario"] == "batch" and not r.get("error")}

    summary = report.summarize(runs)
    report.note_load(meta, runs, discarded, summary, OTHERS_LIMIT)
    rat = report.ratios(runs)
    tgt = report.targets(summary, rat, meta)
    result = {"meta": meta, "summary": summary, "ratios": rat, "targets": tgt, "runs": runs,
              "discarded_under_load": discarded}
    files = write_results(result, out_dir, label)
    for f in scratch.glob("*.json"):
        f.unlink()
    scratch.rmdir()
    say(f"done in {meta['suite_s'] / 60:.1f} min: " + ", ".join(str(f) for f in files)
        + ("" if len(files) == 3 else " (no chart: pip install matplotlib)"))
    print()
    print(files[1].read_text())
    return 0 if all(r.get("error") is None for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
