"""Facts about the machine and the model that the results depend on.

- memory copy bandwidth (numpy, read + write counted), one thread and two threads;
- the CPU (model name, family/model/stepping, SIMD flags), core count, load;
- the model's weight bytes and KV-cache bytes per context token, which turn a decode
  speed into a fraction of the memory-bandwidth bound.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def copy_bandwidth(threads: int = 1, mib: int = 256, repeats: int = 7) -> float:
    """Best bytes/s moved by ``np.copyto`` (each byte read once and written once).

    ``threads`` copies run at once on disjoint halves (numpy releases the GIL while
    copying large contiguous arrays).
    """
    n = mib * 1024 * 1024 // 8
    src = np.ones(n, np.float64)
    dst = np.zeros(n, np.float64)
    parts = np.array_split(np.arange(n), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b]))
                   for a, b in bounds]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def cpu_info() -> dict[str, Any]:
    """CPU model and features as Linux reports them (best effort elsewhere)."""
    info: dict[str, Any] = {"machine": platform.machine(), "logical_cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        info["model_name"] = platform.processor() or "unknown"
        return info
    first = text.split("\n\n")[0]
    fields = dict(
        (k.strip(), v.strip()) for k, _, v in
        (line.partition(":") for line in first.splitlines()) if k.strip()
    )
    info["model_name"] = fields.get("model name", "unknown")
    for key in ("cpu family", "model", "stepping"):
        if key in fields:
            info[key.replace(" ", "_")] = fields[key]
    flags = set(fields.get("flags", "").split())
    info["simd"] = sorted(f for f in flags if re.fullmatch(r"avx\w*|fma|f16c|sse4_2|amx\w*", f))
    info["hypervisor"] = "hypervisor" in flags
    return info


def cpu_slug(info: dict[str, Any]) -> str:
    """A short folder-friendly CPU name: ``amd-epyc-2c``."""
    name = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*$", "", info.get("model_name", "cpu").lower())
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cpu"
    return f"{name}-{info.get('logical_cpus') or 0}c"


def competing_processes() -> list[str]:
    """Other CPU-heavy work seen now: the shipped model's training, and the load average."""
    found: list[str] = []
    try:
        out = subprocess.run(["pgrep", "-af", "shapes_vlm.train"], capture_output=True,
                             text=True, check=False).stdout
        found += [line for line in out.splitlines() if "pgrep" not in line]
    except OSError:
        pass
    return found


def cpu_busy_seconds() -> float:
    """CPU seconds all CPUs have spent busy since boot (Linux ``/proc/stat``; 0 elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def others_busy_cores(window_s: float = 5.0) -> float:
    """How many CPUs' worth of work other processes do right now (nothing of ours runs)."""
    b0, t0 = cpu_busy_seconds(), time.perf_counter()
    time.sleep(window_s)
    return (cpu_busy_seconds() - b0) / (time.perf_counter() - t0)


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def model_bytes(model: Path) -> dict[str, Any]:
    """Weight bytes and KV bytes per context token of a ``llama``-style GGUF."""
    from edge_vlm.gguf.reader import read_gguf

    info = read_gguf(model)
    md = info.metadata
    arch = str(md.get("general.architecture", "llama"))
    weights = sum(t.nbytes for t in info.tensors.values())

    def num(key: str, default: int) -> int:
        value = md.get(key, default)
        return int(value) if isinstance(value, int | float) else default

    n_layer = num(f"{arch}.block_count", 0)
    n_head = num(f"{arch}.attention.head_count", 1)
    n_head_kv = num(f"{arch}.attention.head_count_kv", n_head)
    n_embd = num(f"{arch}.embedding_length", 0)
    head_dim = n_embd // max(1, n_head)
    # F16 K and V caches (llama.cpp's default type): 2 tensors x 2 bytes per element.
    kv_per_token = n_layer * 2 * n_head_kv * head_dim * 2
    types: dict[str, int] = {}
    for t in info.tensors.values():
        name = getattr(t.ggml_type, "name", str(t.ggml_type))
        types[name] = types.get(name, 0) + 1
    return {"weight_bytes": weights, "kv_bytes_per_ctx_token": kv_per_token,
            "n_layer": n_layer, "n_embd": n_embd, "tensor_types": types,
            "file_bytes": model.stat().st_size}
