"""Batch runs: many images, several prompts each, results as JSON lines, resumable.

```python
from edge_vlm.batch import BatchOptions, RayOptions, discover, run

items = discover(["photos/"], recursive=True)
for r in run(items, ["Describe the image."], out="captions.jsonl", resume=True,
             options=BatchOptions(max_tokens=64)):          # engine="local"
    print(r.path, r.answer if r.ok else r.error)
# the same on Ray Data (pip install 'edge-vlm[ray]'): a local Ray, or RayOptions("auto")
for r in run(items, ["Describe the image."], out="captions.jsonl", resume=True,
             engine="ray", ray=RayOptions(workers=4, threads_per_worker=2)):
    print(r.path, r.answer if r.ok else r.error)
```

With a model already loaded, :func:`batch` (or ``vlm.batch(...)``) runs the local engine.

The names below are imported lazily, so ``edge-vlm --help`` does not pay for Pillow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_vlm.batch.bench import BenchmarkResult, benchmark
    from edge_vlm.batch.engines import run
    from edge_vlm.batch.inputs import BatchInputError, BatchItem, discover, read_manifest
    from edge_vlm.batch.options import BatchOptions
    from edge_vlm.batch.output import BatchOutputError, ResultWriter
    from edge_vlm.batch.raydata import RayOptions
    from edge_vlm.batch.results import BatchError, BatchResult
    from edge_vlm.batch.runner import batch
    from edge_vlm.batch.summary import BatchSummary, Tally

_LAZY = {
    "run": "edge_vlm.batch.engines",
    "batch": "edge_vlm.batch.runner",
    "BatchOptions": "edge_vlm.batch.options",
    "RayOptions": "edge_vlm.batch.raydata",
    "BatchResult": "edge_vlm.batch.results",
    "BatchError": "edge_vlm.batch.results",
    "BatchItem": "edge_vlm.batch.inputs",
    "BatchInputError": "edge_vlm.batch.inputs",
    "discover": "edge_vlm.batch.inputs",
    "read_manifest": "edge_vlm.batch.inputs",
    "ResultWriter": "edge_vlm.batch.output",
    "BatchOutputError": "edge_vlm.batch.output",
    "BatchSummary": "edge_vlm.batch.summary",
    "Tally": "edge_vlm.batch.summary",
    "benchmark": "edge_vlm.batch.bench",
    "BenchmarkResult": "edge_vlm.batch.bench",
}

__all__ = [
    "BatchError", "BatchInputError", "BatchItem", "BatchOptions", "BatchOutputError",
    "BatchResult", "BatchSummary", "BenchmarkResult", "RayOptions", "ResultWriter", "Tally",
    "batch", "benchmark", "discover", "read_manifest", "run",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_vlm.batch' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
