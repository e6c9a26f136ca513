"""Compare the memory estimate with a real load: ``python -m edge_vlm.preflight.memcheck``.

Loads a pair in a fresh child process, answers one question about an image of the given
size, and prints the child's peak resident memory next to :func:`estimate_files` for the
same settings (``EDGE_VLM_*`` variables apply to both, e.g. ``EDGE_VLM_IMAGES__DETAIL``)::

    python -m edge_vlm.preflight.memcheck MODEL.gguf MMPROJ.gguf --n-ctx 2048 --image 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys
import edge_vlm
from PIL import Image
from edge_vlm.preflight.probe import _peak_rss
model, mmproj, n_ctx, side, image = sys.argv[1:]
Image.new("RGB", (int(side), int(side)), (120, 30, 200)).save(image)
with edge_vlm.load(model, mmproj, n_ctx=int(n_ctx)) as vlm:
    loaded = _peak_rss()
    vlm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
             {"type": "text", "text": "What is this?"}]}], max_tokens=8, temperature=0)
print(json.dumps({"after_load": loaded, "peak": _peak_rss()}))
"""


def measure(model: Path, mmproj: Path, n_ctx: int, image_side: int) -> dict[str, float]:
    """Peak RSS of a real load and answer vs the estimate, in MiB, and the error in %."""
    from edge_vlm.config import load_settings
    from edge_vlm.preflight.memory import MiB, estimate_files

    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(model), str(mmproj), str(n_ctx),
             str(image_side), str(Path(tmp) / "image.png")],
            capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"the measuring child failed:\n{out.stderr[-2000:]}")
    real = json.loads(out.stdout.strip().splitlines()[-1])
    est = estimate_files(model, mmproj, load_settings({"runtime.n_ctx": n_ctx}))
    result = {
        "measured_peak_mib": round(real["peak"] / MiB, 1),
        "measured_after_load_mib": round(real["after_load"] / MiB, 1),
        "estimate_mib": round(est.total / MiB, 1),
        "error_pct": round(100 * (est.total - real["peak"]) / real["peak"], 1),
    }
    result.update({f"part {k}": round(v / MiB, 1) for k, v in est.breakdown()})
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(prog="python -m edge_vlm.preflight.memcheck",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("model", type=Path)
    ap.add_argument("mmproj", type=Path)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--image", type=int, default=512, help="side of the square test image")
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.model, args.mmproj, args.n_ctx, args.image), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
