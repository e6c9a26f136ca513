"""Batch runs: many images, several prompts each, results as JSON lines, resumable.

```python
import edge_vlm
from edge_vlm.batch import batch, discover

with edge_vlm.load("default") as vlm:
    items = discover(["photos/"], recursive=True)
    for r in batch(vlm, items, ["Describe the image."], out="captions.jsonl", resume=True):
        print(r.path, r.answer if r.ok else r.error)
```

The names below are imported lazily, so ``edge-vlm --help`` does not pay for Pillow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_vlm.batch.bench import BenchmarkResult, benchmark
    from edge_vlm.batch.inputs import BatchInputError, BatchItem, discover, read_manifest
    from edge_vlm.batch.output import BatchOutputError, ResultWriter
    from edge_vlm.batch.runner import BatchError, BatchResult, batch
    from edge_vlm.batch.summary import BatchSummary, Tally

_LAZY = {
    "batch": "edge_vlm.batch.runner",
    "BatchResult": "edge_vlm.batch.runner",
    "BatchError": "edge_vlm.batch.runner",
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
    "BatchError", "BatchInputError", "BatchItem", "BatchOutputError", "BatchResult",
    "BatchSummary", "BenchmarkResult", "ResultWriter", "Tally", "batch", "benchmark",
    "discover", "read_manifest",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_vlm.batch' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
