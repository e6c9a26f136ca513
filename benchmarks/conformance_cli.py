"""Does edge-vlm answer exactly what llama.cpp's own ``llama-mtmd-cli`` answers?

For every family of ``edge_vlm.testing`` (or ``--families a,b``): write its tiny pair,
ask edge-vlm one question about one image (greedy, ``detail: high`` so both sides use
libmtmd's default image budget), run ``llama-mtmd-cli -m model.gguf --mmproj mmproj.gguf
--image X -p PROMPT --temp 0 -n N --jinja`` on the same files, and compare the texts. The
CLI prepends the image marker to the prompt, so edge-vlm's message has the image before
the text. The image is drawn at the size edge-vlm hands to the encoder for the family
(no resize on either side before libmtmd). ::

    python benchmarks/conformance_cli.py                 # every family
    python benchmarks/conformance_cli.py --families qwen2.5-vl,gemma-3 -n 24

Needs the CLI built by ``benchmarks/build_mtmd_cli.sh`` (or ``--cli PATH``). Exit status 1
if any family differs. Not run in CI (the CLI takes minutes to build).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from mtmd_cli import default_cli_path
from PIL import Image, ImageDraw

import edge_vlm
from edge_vlm.config import load_settings
from edge_vlm.testing import family_names, tiny_pair

QUESTION = "What is in this image?"


def draw(path: Path, side: int) -> Path:
    img = Image.new("RGB", (side, side), (230, 30, 30))
    ImageDraw.Draw(img).rectangle((side // 8, side // 8, side // 2, side // 2),
                                  fill=(30, 200, 40))
    img.save(path)
    return path


def edge_answer(model: Path, mmproj: Path, image: Path, n: int, threads: int,
                n_ctx: int) -> tuple[str, int]:
    settings = load_settings({"runtime.threads": threads, "runtime.n_ctx": n_ctx,
                              "store.check_load": False, "images.detail": "high"},
                             config_file=model.parent / "no-config.toml")
    with edge_vlm.load(model, mmproj, settings=settings) as vlm:
        r = vlm.chat([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(image)}},
            {"type": "text", "text": QUESTION}]}], max_tokens=n, temperature=0.0)
        return r.choices[0].message.content or "", int(r.timings.image_tokens)


def cli_answer(cli: Path, model: Path, mmproj: Path, image: Path, n: int, threads: int,
               n_ctx: int) -> str:
    cmd = [str(cli), "-m", str(model), "--mmproj", str(mmproj), "--image", str(image),
           "-p", QUESTION, "--temp", "0", "-n", str(n), "--jinja", "-t", str(threads),
           "-c", str(n_ctx), "--seed", "0", "--no-warmup"]
    # The CLI logs through llama.cpp's asynchronous logger, which on this build sometimes
    # loses the end (or all) of its output at exit with status 0: a complete answer ends
    # with the newline printed after generation, so run again until one does.
    for _ in range(8):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"llama-mtmd-cli failed ({proc.returncode}): "
                               f"{proc.stderr[-1500:]}")
        if proc.stdout.strip() and proc.stdout.endswith("\n"):
            return proc.stdout
    raise RuntimeError("llama-mtmd-cli printed no complete answer in 8 runs")


def image_side(model: Path, mmproj: Path) -> int:
    """The longest side edge-vlm hands to the encoder at ``detail: high`` (capped at 512)."""
    from edge_vlm.loader import inspect_pair
    from edge_vlm.resolve import ModelRef

    info = inspect_pair(ModelRef(name="x", model=model, mmproj=mmproj))
    return min(512, info.max_image_side("high"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(f for f in family_names()
                                                    if f != "generic"))
    ap.add_argument("-n", type=int, default=16, help="tokens to generate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--cli", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="keep the pairs here")
    args = ap.parse_args(argv)
    cli = args.cli or default_cli_path()
    if cli is None:
        raise SystemExit("llama-mtmd-cli is not built: run benchmarks/build_mtmd_cli.sh")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        print(f"{'family':12} {'image':>7} {'tokens':>6}  result")
        for name in args.families.split(","):
            d = root / name
            d.mkdir(parents=True, exist_ok=True)
            model, mmproj = tiny_pair(name, d)
            side = image_side(model, mmproj)
            image = draw(d / f"image-{side}.png", side)
            ours, n_img = edge_answer(model, mmproj, image, args.n, args.threads, args.n_ctx)
            theirs = cli_answer(cli, model, mmproj, image, args.n, args.threads, args.n_ctx)
            same = ours.strip() == theirs.strip()
            failures += not same
            print(f"{name:12} {side:>4}px {n_img:>6}  {'same' if same else 'DIFFERENT'}: "
                  f"{ours.strip()!r}" + ("" if same else f" vs CLI {theirs.strip()!r}"),
                  flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
