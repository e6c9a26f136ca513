"""Turning the runs of one suite into medians, same-run ratios, targets, a table and a chart.

Every ratio is computed within one repetition (the systems ran back to back, interleaved)
and the median over repetitions is reported, so slow drifts of the machine cancel out.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from scenarios import SCENARIOS, SYSTEM_NAMES, SYSTEMS

Run = dict[str, Any]
METRICS = ("ttft_ms", "total_ms", "pre_ms", "encode_ms", "passes", "prefill_ms",
           "prefill_tokens", "prefill_tps", "decode_tps", "completion_tokens", "image_tokens",
           "tokens_reused", "cache_hits")


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def headline(run: Run) -> dict[str, Any]:
    """The figures a run stands for: the main request, or the mean of turns 2-4 (c)."""
    reqs = run.get("requests") or {}
    if run["scenario"] == "c":
        turns = [reqs[k] for k in ("turn2", "turn3", "turn4") if k in reqs]
        out = {m: statistics.fmean(t[m] for t in turns) for m in METRICS
               if turns and all(m in t for t in turns)}
        if "turn1" in reqs:
            out["cold_ttft_ms"] = reqs["turn1"]["ttft_ms"]
        return out
    out = dict(reqs.get("main") or {})
    if "cold" in reqs:
        out["cold_ttft_ms"] = reqs["cold"]["ttft_ms"]
    return out


def _by(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """Successful runs by (scenario, system); only the clean ones where there are some
    (a run is not clean when other processes used the CPUs while it ran)."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        if r.get("error") is None:
            groups.setdefault((r["scenario"], r["system"]), []).append(r)
    for key, group in groups.items():
        clean = [r for r in group if not r.get("under_load")]
        groups[key] = clean or group
    return groups


def summarize(runs: list[Run]) -> dict[str, dict[str, dict[str, Any]]]:
    """``summary[scenario][system]``: median of each figure over repetitions."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (scenario, system), group in _by(runs).items():
        heads = [headline(r) for r in group]
        keys = sorted({k for h in heads for k, v in h.items() if isinstance(v, int | float)})
        fig = {k: median(h.get(k) for h in heads) for k in keys}
        fig["peak_rss_mb"] = median(r.get("peak_rss_mb") for r in group)
        fig["reps"] = len(group)
        fig["under_load"] = any(r.get("under_load") for r in group)
        out.setdefault(scenario, {})[system] = fig
    return out


def note_load(meta: dict[str, Any], runs: list[Run], discarded: list[Run],
              summary: dict[str, dict[str, dict[str, Any]]], limit: float) -> None:
    """Record in ``meta`` which figures (if any) rest on measurements made under load."""
    meta.pop("under_load", None)
    meta.pop("load_note", None)
    loaded = [r for r in runs if r.get("under_load")]
    affected = [f"({sc}) {SYSTEM_NAMES[sy]}" for sc, row in summary.items()
                for sy, fig in row.items() if fig.get("under_load")]
    if affected:
        meta["under_load"] = (f"other processes used more than {limit} CPUs during every "
                              f"measurement of: {', '.join(affected)}")
    if loaded or discarded:
        meta["load_note"] = (f"{len(discarded)} measurement(s) made while other processes used "
                             f"the CPUs were redone; {len(loaded)} kept, marked, and left out "
                             "of the medians wherever a clean repetition exists")


def _rep(runs: list[Run], rep: int, scenario: str, system: str) -> Run | None:
    for r in runs:
        if (r["rep"], r["scenario"], r["system"]) == (rep, scenario, system) \
                and r.get("error") is None:
            return r
    return None


# A ratio: (numerator scenario, system, figure), (denominator scenario, system, figure).
_Term = tuple[str, str, str]


def _same_run(runs: list[Run], num: _Term, den: _Term) -> float | None:
    """``num / den`` computed within each repetition, then the median over repetitions
    (over the clean repetitions only, where there are some)."""
    clean: list[float | None] = []
    loaded: list[float | None] = []
    for rep in sorted({r["rep"] for r in runs}):
        rn, rd = _rep(runs, rep, num[0], num[1]), _rep(runs, rep, den[0], den[1])
        if rn is None or rd is None:
            continue
        a, b = headline(rn).get(num[2]), headline(rd).get(den[2])
        value = a / b if a is not None and b else None
        (loaded if rn.get("under_load") or rd.get("under_load") else clean).append(value)
    return median(clean) if any(v is not None for v in clean) else median(loaded)


def ratios(runs: list[Run]) -> dict[str, float | None]:
    """Same-run ratios, median over repetitions. ``*_speedup`` > 1: edge-vlm is faster."""
    specs: dict[str, tuple[_Term, _Term]] = {}
    for sc in ("a", "b", "c", "d", "e"):
        for anchor in ("handler", "cli"):
            specs[f"{sc}.ttft_speedup_vs_{anchor}"] = ((sc, anchor, "ttft_ms"),
                                                       (sc, "edge", "ttft_ms"))
            specs[f"{sc}.total_speedup_vs_{anchor}"] = ((sc, anchor, "total_ms"),
                                                        (sc, "edge", "total_ms"))
            specs[f"{sc}.decode_ratio_vs_{anchor}"] = ((sc, "edge", "decode_tps"),
                                                       (sc, anchor, "decode_tps"))
    # (d): the follow-up conversation against the cold first one, within each system's run.
    for system in ("edge", "handler"):
        specs[f"d.warm_over_cold_{system}"] = (("d", system, "ttft_ms"),
                                               ("d", system, "cold_ttft_ms"))
    specs["batch.images_per_min_ratio"] = (("batch", "edge", "images_per_min"),
                                           ("batch", "handler", "images_per_min"))
    # Issue 9: edge-vlm's detail levels against the anchors' defaults on the same image.
    for img in ("a", "b"):
        for level in ("low", "auto"):
            for anchor in ("handler", "cli"):
                for fig in ("ttft", "total"):
                    specs[f"{img}-{level}.{fig}_speedup_vs_{anchor}"] = (
                        (img, anchor, f"{fig}_ms"), (f"{img}-{level}", "edge", f"{fig}_ms"))
    out = {name: _same_run(runs, num, den) for name, (num, den) in specs.items()}
    return {k: v for k, v in out.items() if v is not None}


def bandwidth_fraction(decode_tps: float | None, bytes_per_token: float,
                       bandwidth: float) -> float | None:
    """Decode speed as a fraction of ``bandwidth / bytes read per token``."""
    if not decode_tps or not bandwidth:
        return None
    return decode_tps * bytes_per_token / bandwidth


def targets(summary: dict[str, Any], rat: dict[str, float | None],
            meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 4/8/9 targets: value, target, met?"""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: float, higher_better: bool = True,
            note: str = "") -> None:
        met = None if value is None else (value >= target if higher_better else value <= target)
        rows.append({"target": name, "value": value, "goal": target,
                     "higher_is_better": higher_better, "met": met, "note": note})

    add("(a) TTFT, llama-mtmd-cli / edge-vlm (detail=high)",
        rat.get("a.ttft_speedup_vs_cli"), 0.97)
    add("(a) decode tok/s, edge-vlm / llama-mtmd-cli", rat.get("a.decode_ratio_vs_cli"), 0.97)
    add("(b) end to end, MTMDChatHandler / edge-vlm at its default (detail=auto)",
        rat.get("b-auto.total_speedup_vs_handler"), 2.0,
        note=_tokens_note(summary, "b-auto", "b"))
    add("(b) end to end, MTMDChatHandler / edge-vlm, same tokens (detail=high)",
        rat.get("b.total_speedup_vs_handler"), 2.0, note="like for like, for reference")
    add("(c) follow-up TTFT, edge-vlm / MTMDChatHandler",
        _inv(rat.get("c.ttft_speedup_vs_handler")), 0.1, higher_better=False)
    add("(d) TTFT of a new conversation about a seen image / cold TTFT (edge-vlm)",
        rat.get("d.warm_over_cold_edge"), 1 / 3, higher_better=False)
    for sc, label in (("d-sys", "(d-sys) new conversation, same system prompt and image, "
                                "TTFT s (issue 17; 500M shape, full detail)"),
                      ("alt", "(alt) two conversations alternating: slowest follow-up TTFT s "
                              "(issue 17)")):
        ttft = (summary.get(sc, {}).get("edge") or {}).get("ttft_ms")
        add(label, None if ttft is None else ttft / 1000.0, 1.0, higher_better=False)
    bw = meta.get("bandwidth", {}).get("two_threads_bytes_s", 0.0)
    wb = meta.get("model", {}).get("weight_bytes", 0)
    dec = (summary.get("a", {}).get("edge") or {}).get("decode_tps")
    add("decode, fraction of the memory-bandwidth bound (edge-vlm, (a))",
        bandwidth_fraction(dec, wb, bw), 0.70, note="weights only, 2-thread copy bandwidth")
    add("batch images/min, edge-vlm / MTMDChatHandler loop (issue 8)",
        rat.get("batch.images_per_min_ratio"), 2.5)
    for img, label in (("a", "512x512 PNG"), ("b", "4032x3024 JPEG")):
        for anchor in ("handler", "cli"):
            add(f"detail=low TTFT speedup vs {SYSTEM_NAMES[anchor]}, {label} (issue 9)",
                rat.get(f"{img}-low.ttft_speedup_vs_{anchor}"), 10.0)
    for anchor in ("handler", "cli"):
        add(f"detail=auto TTFT speedup vs {SYSTEM_NAMES[anchor]}, 4032x3024 JPEG (issue 9)",
            rat.get(f"b-auto.ttft_speedup_vs_{anchor}"), 3.0)
    return rows


def _inv(x: float | None) -> float | None:
    return 1.0 / x if x else None


def _tokens_note(summary: dict[str, Any], edge_sc: str, anchor_sc: str) -> str:
    e = (summary.get(edge_sc, {}).get("edge") or {}).get("prefill_tokens")
    h = (summary.get(anchor_sc, {}).get("handler") or {}).get("prefill_tokens")
    if e is None or h is None:
        return ""
    return f"prompt tokens {e:.0f} vs {h:.0f}"


# -- Markdown ------------------------------------------------------------------------------


def _s(ms: float | None) -> str:
    return "–" if ms is None else f"{ms / 1000:.2f}"


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def markdown(meta: dict[str, Any], summary: dict[str, Any], rat: dict[str, float | None],
             tgt: list[dict[str, Any]]) -> str:
    """The results as Markdown: setup, per-scenario table, ratios, targets."""
    m = meta
    bw = m["bandwidth"]
    model = m["model"]
    kv = model["kv_bytes_per_ctx_token"]
    lines = [
        f"# edge-vlm benchmark: {m['model_label']}",
        "",
        f"- date: {m['date']}; CPU: {m['cpu']['model_name']} (family {m['cpu'].get('cpu_family')}"
        f" model {m['cpu'].get('model')}), {m['cpu']['logical_cpus']} logical CPUs;"
        f" threads: {m['args']['threads']}",
        f"- llama-cpp-python {m['versions'].get('llama_cpp_python')}; "
        f"llama-mtmd-cli: {_short_path(m['cli']) or 'not built (column skipped)'}",
        f"- model: {model['file_bytes'] / 1e6:.1f} MB text ({_types(model)}), "
        f"mmproj {m['mmproj_bytes'] / 1e6:.1f} MB; "
        f"weights read per token {model['weight_bytes'] / 1e6:.1f} MB, "
        f"KV cache {kv / 1024:.1f} KiB per context token",
        f"- memory copy bandwidth (numpy, read+write): {bw['one_thread_bytes_s'] / 1e9:.1f} GB/s "
        f"one thread, {bw['two_threads_bytes_s'] / 1e9:.1f} GB/s two threads → decode bound "
        f"{bw['two_threads_bytes_s'] / model['weight_bytes']:.0f} tok/s (weights only)",
        f"- {m['args']['reps']} repetition(s), medians; systems interleaved; "
        f"max_tokens {m['args']['max_tokens']} greedy; each system in its own process",
    ]
    if bw.get("remeasured"):
        lines.append(f"- bandwidth re-measured {bw['remeasured']}")
    if m.get("note"):
        lines.append(f"- note: {m['note']}")
    if m.get("under_load"):
        lines.append(f"- **measured under load**: {m['under_load']}")
    if m.get("load_note"):
        lines.append(f"- {m['load_note']}")
    lines += [
        "",
        "Times in seconds. TTFT = request to first generated token (images unread at the "
        "start); pre = image read/decode/preprocess; encode = vision encoder; prefill = "
        "language model over the prompt (text + image embeddings); decode tok/s over the "
        "tokens generated, and as a % of the bandwidth bound (weights + KV cache read per token).",
        "",
        "| scenario | system | TTFT | pre | encode (passes) | prefill (tokens, tok/s) "
        "| decode tok/s (% bound) | total | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    bwb = bw["two_threads_bytes_s"]
    for key, sc in SCENARIOS.items():
        if key == "batch" or key not in summary:
            continue
        for system in SYSTEMS:
            f = summary[key].get(system)
            if system not in sc.systems:
                continue
            name = SYSTEM_NAMES[system] + (f" [{sc.detail}]" if system == "edge" else "")
            if f is None:
                lines.append(f"| ({key}) {sc.title} | {name} | n/a | | | | | | |")
                continue
            if f.get("under_load"):
                name += " (under load)"
            ctx = (f.get("prefill_tokens") or 0) + (f.get("tokens_reused") or 0)
            frac = bandwidth_fraction(f.get("decode_tps"),
                                      model["weight_bytes"] + kv * ctx, bwb)
            lines.append(
                f"| ({key}) {sc.title} | {name} | {_s(f.get('ttft_ms'))} | {_s(f.get('pre_ms'))} "
                f"| {_s(f.get('encode_ms'))} ({_f(f.get('passes'), '{:.0f}')}) "
                f"| {_s(f.get('prefill_ms'))} ({_f(f.get('prefill_tokens'), '{:.0f}')}, "
                f"{_f(f.get('prefill_tps'), '{:.0f}')}) "
                f"| {_f(f.get('decode_tps'))} ({_pct(frac)}) "
                f"| {_s(f.get('total_ms'))} | {_f(f.get('peak_rss_mb'), '{:.0f}')} |")
    if "batch" in summary:
        lines += ["", f"Batch (issue 8): {m['args']['batch_images']} images x 3 prompts, "
                  f"{m['args']['batch_max_tokens']} tokens per answer, detail=high.", "",
                  "| system | images/min | seconds | answers that ran the encoder | via "
                  "| peak RSS MB |",
                  "|---|---|---|---|---|---|"]
        for system in ("edge", "handler"):
            f = summary["batch"].get(system)
            if f:
                lines.append(
                    f"| {SYSTEM_NAMES[system]} | {_f(f.get('images_per_min'), '{:.2f}')} "
                    f"| {_f(f.get('seconds'))} | {_f(f.get('answers_that_encoded'), '{:.0f}')} "
                    f"| {m.get('batch_via', {}).get(system, '')} "
                    f"| {_f(f.get('peak_rss_mb'), '{:.0f}')} |")
    lines += ["", "Same-run ratios (median over repetitions; > 1: edge-vlm faster):", "",
              "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in rat.items() if v is not None]
    lines += ["", "Targets:", "", "| target | value | goal | met |", "|---|---|---|---|"]
    for t in tgt:
        op = "≥" if t["higher_is_better"] else "≤"
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"| {t['target']}{note} | {_f(t['value'], '{:.3f}')} | {op} {t['goal']:.3g} "
                     f"| {met} |")
    return "\n".join(lines) + "\n"


def _short_path(path: str | None) -> str | None:
    """A path relative to the repository when it is inside it."""
    if not path:
        return None
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return path


def _pct(frac: float | None) -> str:
    return "–" if frac is None else f"{100 * frac:.0f}%"


def _types(model: dict[str, Any]) -> str:
    return ", ".join(f"{n}x{k}" for k, n in sorted(model["tensor_types"].items()))


# -- chart ---------------------------------------------------------------------------------


def chart(summary: dict[str, Any], path: Path, title: str) -> Path | None:
    """Bars per scenario and system: TTFT (left) and decode tokens/s (right)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = [k for k in SCENARIOS if k in summary and k != "batch"]
    colors = {"edge": "#2a9d8f", "handler": "#e76f51", "cli": "#264653"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.27
    for ax, metric, label, scale in ((axes[0], "ttft_ms", "time to first token (s)", 1000.0),
                                     (axes[1], "decode_tps", "decode (tokens/s)", 1.0)):
        for i, system in enumerate(SYSTEMS):
            xs, ys = [], []
            for j, k in enumerate(keys):
                f = summary[k].get(system)
                if f and f.get(metric) is not None:
                    xs.append(j + (i - 1) * width)
                    ys.append(f[metric] / scale)
            if not ys:
                continue
            bars = ax.bar(xs, ys, width, label=SYSTEM_NAMES[system], color=colors[system])
            ax.bar_label(bars, fmt="%.1f" if metric == "ttft_ms" else "%.0f", fontsize=7)
        if metric == "ttft_ms":
            ax.set_yscale("log")
        ax.set_xticks(range(len(keys)), [f"({k})" for k in keys], rotation=30)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
